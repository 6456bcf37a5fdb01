"""`dicom-watcher web`: /metrics and the status page of a running daemon,
read with prometheus-client's parser and a real headless Chromium."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import DaemonProcess, free_port, listening, metric_samples, skip_or_fail, wait_for

from watcher.synthetic import StudySpec, write_study
from watcher.web import STALE_SECONDS

PATIENT_ID = "SUBJ-HIDDEN-4711"


@dataclass
class Scene:
    """A daemon that has placed, parked, quarantined and is still waiting,
    and a web process reading its state."""

    daemon: DaemonProcess
    web: subprocess.Popen[bytes]
    url: str
    placed_files: int
    placed_uids: list[str]
    parked_uid: str
    pending_uid: str


def start_web(daemon: DaemonProcess, port: int) -> subprocess.Popen[bytes]:
    web = subprocess.Popen(
        [sys.executable, "-m", "watcher", "web", "--config", str(daemon.config_path)]
        + ["--listen", f"127.0.0.1:{port}", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=open(daemon.root / "web.log", "ab"),  # noqa: SIM115 - the child holds it
        cwd=daemon.root,
    )
    wait_for(lambda: listening(port) or web.poll() is not None, 30, "the web process to listen")
    assert web.poll() is None, (daemon.root / "web.log").read_text()
    return web


@contextlib.contextmanager
def make_scene(root: Path, **settings: object) -> Iterator[Scene]:
    daemon = DaemonProcess(
        root, quarantine_after_seconds=0.5, park_first_seconds=600, park_max_seconds=600, **settings
    )
    smith = root / "nas" / "smith"
    smith.mkdir(parents=True)
    # (its post-processing fails, once a study: the hooks' failed jobs)
    failing = {"command": ["sh", "-c", "exit 3"], "retries": 0}
    daemon.add_rule("smith", smith, match={"StudyDescription": "^SMITH"}, hooks=[failing])
    daemon.add_rule("jones", root / "nas" / "jones-unmounted", match={"StudyDescription": "^JONES"})
    daemon.add_rule(
        "slow",
        smith,
        match={"StudyDescription": "^SLOW"},
        quiet_seconds=3600,
        path="slow/{SOPInstanceUID}.dcm",
    )
    web = None
    try:
        daemon.start()
        daemon.wait_event("started")
        first = StudySpec(series=1, instances=3, patient_id=PATIENT_ID)
        second = StudySpec(series=2, instances=2, patient_id="SUBJ02")
        parked = StudySpec(series=1, instances=2, description="JONES^Faces")
        pending = StudySpec(series=1, instances=4, description="SLOW^Long")
        for spec in (first, second, parked, pending):
            write_study(spec, daemon.inbox)
        (daemon.inbox / "junk.bin").write_bytes(b"not DICOM at all" * 10)
        daemon.wait_event("study_placed", 2)
        daemon.wait_event("study_parked")
        daemon.wait_event("quarantined")
        wait_for(
            lambda: (
                (s := daemon.status())
                and s.get("quarantine_files") == 1
                and len(s.get("studies", [])) == 2
                and s["hooks"]["operator"]["failed"] == 2  # type: ignore[index]
            ),
            30,
            "a status with the quarantine, the two waiting studies and the failed hooks",
        )
        port = free_port()
        web = start_web(daemon, port)
        yield Scene(
            daemon,
            web,
            f"http://127.0.0.1:{port}",
            3 + 4,
            [first.study_uid, second.study_uid],
            parked.study_uid,
            pending.study_uid,
        )
    finally:
        if web is not None:
            web.terminate()
            web.wait(10)
        daemon.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Iterator[Scene]:
    with make_scene(tmp_path_factory.mktemp("web")) as made:
        yield made


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http only
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_count_what_the_daemon_did(scene):
    status, text = get(scene.url + "/metrics")
    assert status == 200
    found = metric_samples(text)
    assert found[("dicom_watcher_placed_studies_total", (("lab", "smith"),))] == 2
    assert found[("dicom_watcher_placed_files_total", (("lab", "smith"),))] == scene.placed_files
    placed_bytes = sum(
        p.stat().st_size for p in (scene.daemon.root / "nas" / "smith").rglob("*.dcm")
    )
    assert found[("dicom_watcher_placed_bytes_total", (("lab", "smith"),))] == placed_bytes
    assert found[("dicom_watcher_pending_studies", ())] == 2
    assert found[("dicom_watcher_parked_studies", ())] == 1
    assert found[("dicom_watcher_lab_pending_studies", (("lab", "jones"), ("parked", "true")))] == 1
    assert found[("dicom_watcher_lab_pending_studies", (("lab", "slow"), ("parked", "false")))] == 1
    assert found[("dicom_watcher_quarantined_files", ())] == 1
    assert found[("dicom_watcher_unmatched_files", ())] == 0
    unmounted = str(scene.daemon.root / "nas" / "jones-unmounted")
    assert (
        found[
            (
                "dicom_watcher_destination_state",
                (("destination", unmounted), ("state", "unavailable")),
            )
        ]
        == 1
    )
    assert (
        found[
            ("dicom_watcher_destination_state", (("destination", unmounted), ("state", "healthy")))
        ]
        == 0
    )
    # every placement in the histogram, below its +Inf bucket
    count = found[("dicom_watcher_placement_delay_seconds_count", (("lab", "smith"),))]
    assert count == 2
    assert (
        found[("dicom_watcher_placement_delay_seconds_bucket", (("lab", "smith"), ("le", "+Inf")))]
        == 2
    )
    assert 0 <= found[("dicom_watcher_last_loop_turn_age_seconds", ())] < STALE_SECONDS
    failed_jobs = list((scene.daemon.state / "hooks" / "failed").glob("*.json"))
    assert len(failed_jobs) == 2
    operator = (("lab", "(operator)"),)
    assert found[("dicom_watcher_hook_jobs", (*operator, ("state", "failed")))] == len(failed_jobs)
    assert found[("dicom_watcher_hook_jobs", (*operator, ("state", "waiting")))] == 0
    assert PATIENT_ID not in text


def test_the_metrics_file_is_written_for_node_exporter(tmp_path):
    (tmp_path / "metrics").mkdir()
    with make_scene(tmp_path, metrics_file="metrics/dicom-watcher.prom") as scene:
        path = tmp_path / "metrics" / "dicom-watcher.prom"
        text = wait_for(lambda: path.exists() and path.read_text(), 10, "the metrics file")
        found = metric_samples(text)
        assert (
            found[("dicom_watcher_placed_files_total", (("lab", "smith"),))] == scene.placed_files
        )
        assert found[("dicom_watcher_quarantined_files", ())] == 1


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        skip_or_fail("chromium is not installed (apt-get install chromium)")
    return str(found)


def browse(url: str, *args: str) -> str:
    """The page's DOM after its load, as real headless Chromium builds it."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    command = [chromium(), "--headless", "--disable-gpu", "--no-first-run"]
    command.append(f"--user-data-dir={profile}")
    if os.geteuid() == 0:
        command.append("--no-sandbox")  # (Chromium refuses to run as root with it)
    try:
        done = subprocess.run([*command, *args, url], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_shows_the_daemons_studies_in_a_real_browser(scene, tmp_path):
    dom = browse(scene.url + "/", "--dump-dom")
    assert 'data-state="running"' in dom
    pending = dom[dom.index('id="pending"') :]
    pending = pending[: pending.index("</table>")]
    assert scene.pending_uid in pending and scene.parked_uid in pending
    assert "PARKED" in pending
    placed = dom[dom.index('id="placed"') :]
    placed = placed[: placed.index("</table>")]
    assert all(uid in placed for uid in scene.placed_uids)
    assert "not a DICOM file" in dom[dom.index('id="quarantine-reasons"') :]
    assert "jones-unmounted" in dom and "unavailable" in dom
    hooks = dom[dom.index('id="hooks"') :]
    hooks = hooks[: hooks.index("</table>")]
    operator_row = hooks[hooks.index("(operator") :]
    cells = [
        re.sub(r"<[^>]*>", "", cell)
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", operator_row[: operator_row.index("</tr>")])
    ]
    assert cells[:4] == ["0", "0", "", "2"], cells  # waiting, running, retrying, failed
    assert PATIENT_ID not in dom
    screenshot = tmp_path / "status.png"
    browse(scene.url + "/", f"--screenshot={screenshot}", "--window-size=1280,900")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lab_page_shows_that_labs_studies_only(scene):
    dom = browse(scene.url + "/lab/jones", "--dump-dom")
    assert scene.parked_uid in dom
    assert scene.pending_uid not in dom
    assert not any(uid in dom for uid in scene.placed_uids)
    status, _ = get(scene.url + "/lab/nobody")
    assert status == 404


def test_patient_ids_show_only_when_the_config_says_so(tmp_path):
    with make_scene(tmp_path, web_show_patients=True) as scene:
        status, page = get(scene.url + "/")
        assert status == 200
        assert PATIENT_ID in page


def test_a_silent_daemon_shows_as_stale(tmp_path):
    with make_scene(tmp_path) as scene:
        assert scene.daemon.process is not None
        scene.daemon.process.send_signal(signal.SIGSTOP)  # alive, but its loop turns no more
        try:
            dom = wait_for(
                lambda: 'data-state="stale"' in (d := browse(scene.url + "/", "--dump-dom")) and d,
                STALE_SECONDS + 30,
                "the page to call the daemon stale",
                every=2.0,
            )
            assert "STALE" in dom
            found = metric_samples(get(scene.url + "/metrics")[1])
            assert found[("dicom_watcher_last_loop_turn_age_seconds", ())] > STALE_SECONDS
        finally:
            scene.daemon.process.send_signal(signal.SIGCONT)


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_requests_get_4xx_and_the_server_stays_up(scene):
    port = int(scene.url.rsplit(":", 1)[1])
    assert get(scene.url + "/no/such/page")[0] == 404
    assert get(scene.url + "/lab/" + "../" * 5 + "etc/passwd")[0] == 404
    assert get(scene.url + "/" + "x" * 5000)[0] == 414
    answers = [
        raw_request(port, b"GARBAGE\r\n\r\n"),
        raw_request(port, b"GET / HTTP/9.9\r\n\r\n"),
        raw_request(port, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw_request(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"),
        raw_request(port, b"GET /" + b"y" * 70000 + b" HTTP/1.1\r\n\r\n"),
        raw_request(port, b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"),
    ]
    for answer in answers:
        # (an HTTP/0.9-looking request gets its error page without a status line)
        found = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer) or re.search(
            rb"Error code: (\d{3})", answer
        )
        assert found, answer[:200]
        assert 400 <= int(found[1]) < 500, answer[:200]
    # a client that sends nothing holds one thread only: others are answered
    with socket.create_connection(("127.0.0.1", port), timeout=15):
        started = time.monotonic()
        assert get(scene.url + "/metrics")[0] == 200
        assert time.monotonic() - started < 5
    assert scene.web.poll() is None
    assert get(scene.url + "/")[0] == 200


def tcp_listeners(port: int) -> list[str]:
    """The addresses something listens on at `port` (IPv4 and IPv6), from /proc."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # (0A: LISTEN)
                    raw = bytes.fromhex(address)
                    # (the kernel prints each 32-bit word in host order)
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                    found.append(socket.inet_ntop(family, words))
    return found


def test_the_page_listens_on_loopback_only_by_default(tmp_path):
    """With no web_listen nor --listen, nothing beyond this machine reaches
    the page (the reverse proxy in front is the way in)."""
    from watcher.config import Config, parse_listen

    _, port = parse_listen(Config().web_listen, "web_listen")
    daemon = DaemonProcess(tmp_path)
    assert "web_listen" not in daemon.config_path.read_text()
    web = None
    try:
        daemon.start()
        daemon.wait_event("started")
        web = subprocess.Popen(
            [sys.executable, "-m", "watcher", "web", "--config", str(daemon.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "web.log", "ab"),  # noqa: SIM115 - the child holds it
        )
        wait_for(lambda: listening(port) or web.poll() is not None, 30, "the web process")
        assert web.poll() is None, (tmp_path / "web.log").read_text()
        assert tcp_listeners(port) == ["127.0.0.1"]
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        if web is not None:
            web.terminate()
            web.wait(10)
        daemon.close()


def test_header_values_cannot_inject_markup(tmp_path):
    """A study description is the scanner's (or an attacker's) text: it
    reaches the page as text, never as markup."""
    daemon = DaemonProcess(tmp_path)
    lab = tmp_path / "lab"
    lab.mkdir()
    daemon.add_rule("all", lab, quiet_seconds=3600)
    web = None
    try:
        daemon.start()
        daemon.wait_event("started")
        attack = "<script>document.title=1</script>"
        write_study(StudySpec(series=1, instances=1, patient_id=attack), daemon.inbox)
        wait_for(lambda: daemon.status().get("studies"), 30, "the pending study")
        port = free_port()
        (tmp_path / "show.yaml").write_text(
            daemon.config_path.read_text() + "web_show_patients: true\n"
        )
        daemon.config_path = tmp_path / "show.yaml"
        web = start_web(daemon, port)
        dom = browse(f"http://127.0.0.1:{port}/", "--dump-dom")
        assert "<script>document" not in dom
        assert "&lt;script&gt;document.title=1&lt;/script&gt;" in dom
        assert "<title>dicom-watcher</title>" in dom
    finally:
        if web is not None:
            web.terminate()
            web.wait(10)
        daemon.close()


def test_a_page_from_another_site_cannot_read_the_status_by_dns_rebinding(scene):
    """A hostile page whose name is made to point at 127.0.0.1 sends its own
    name as Host: refused; an address or localhost is served."""
    port = int(scene.url.rsplit(":", 1)[1])
    refused = raw_request(port, b"GET /metrics HTTP/1.1\r\nHost: attacker.example\r\n\r\n")
    assert refused.startswith(b"HTTP/1.0 421 "), refused[:100]
    assert b"dicom_watcher" not in refused
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        answer = raw_request(port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.0 200 "), answer[:100]


def test_an_error_naming_a_patients_folder_shows_only_with_patient_ids():
    """A parked study's error names the folder it failed on, which the rule's
    template may have made of the PatientID."""
    from watcher.web import render_page

    study = {
        "study": "1.2.3",
        "patient": PATIENT_ID,
        "labs": ["smith"],
        "parked_since": 1.0,
        "files": 1,
        "age_seconds": 5,
        "next": "parked: next try in 5 s",
        "attempts": 2,
        "last_error": f"not a folder (or a link) ({PATIENT_ID})",
    }
    status = {"updated": 100.0, "pid": 1, "studies": [study]}
    assert PATIENT_ID not in render_page(status, 100.0, False, None)
    assert PATIENT_ID not in render_page(status, 100.0, False, "smith")
    assert PATIENT_ID in render_page(status, 100.0, True, None)


def test_slow_clients_cannot_hold_the_server(scene):
    """More connections than the web process has file descriptors, each
    sending a byte now and then: it refuses those beyond what it serves at
    once, cuts the slow ones at its deadline, and answers again."""
    from watcher.web import REQUEST_DEADLINE

    port = free_port()
    limit = 64

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    web = subprocess.Popen(
        [sys.executable, "-m", "watcher", "web", "--config", str(scene.daemon.config_path)]
        + ["--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=few_descriptors,  # noqa: PLW1509 - only setrlimit, before exec
    )
    slow = []
    stop = threading.Event()
    try:
        wait_for(lambda: listening(port), 30, "the web process to listen")
        for _ in range(limit + 16):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"GET / HTTP/1.1\r\n")
            slow.append(connection)

        def trickle() -> None:  # a byte a second on each: no read ever times out
            while not stop.wait(1.0):
                for connection in slow:
                    with contextlib.suppress(OSError):
                        connection.sendall(b"X")

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        started = time.monotonic()
        while time.monotonic() - started < REQUEST_DEADLINE + 15:
            with contextlib.suppress(OSError):
                if get(f"http://127.0.0.1:{port}/metrics", timeout=3)[0] == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError("the server did not answer while slow clients held it")
        assert web.poll() is None
    finally:
        stop.set()
        for connection in slow:
            connection.close()
        web.terminate()
        web.wait(10)


def test_a_metrics_file_that_cannot_be_written_is_said_once_and_stops_nothing(tmp_path):
    """Its folder missing (node_exporter not installed yet): one warning,
    placements go on, and the file is written once the folder is there."""
    daemon = DaemonProcess(tmp_path, metrics_file="textfile/dicom-watcher.prom")
    lab = tmp_path / "lab"
    lab.mkdir()
    daemon.add_rule("all", lab)
    try:
        daemon.start()
        daemon.wait_event("metrics_write_failed")
        write_study(StudySpec(series=1, instances=2), daemon.inbox)
        daemon.wait_event("study_placed")
        time.sleep(4.5)  # two more status writes, each failing again
        assert len(daemon.logs("metrics_write_failed")) == 1
        (tmp_path / "textfile").mkdir()
        daemon.wait_event("metrics_written_again")
        found = metric_samples((tmp_path / "textfile" / "dicom-watcher.prom").read_text())
        assert found[("dicom_watcher_placed_files_total", (("lab", "all"),))] == 2
    finally:
        daemon.close()
