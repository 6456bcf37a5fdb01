"""The deployment files: the systemd units (checked by systemd-analyze), the
example config, and the storescp.sh + send.sh pairing run for real over
loopback with dcmtk.

A missing tool (systemd-analyze, storescp, storescu) skips its tests, except
when the environment variable CI is true: there a missing tool is a failure,
so that a CI image without dcmtk cannot pass silently.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pydicom
import pytest
from harness import free_port, skip_or_fail

from watcher.config import Config, load_config
from watcher.delivery import STOP_MANIFEST_SECONDS
from watcher.synthetic import StudySpec, write_study

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SYSTEMD = ROOT / "systemd"
UNITS = ("storescp.service", "dicom-watcher.service", "dicom-watcher-web.service")
#: The lab runner's template unit, verified as one of its instances.
HOOKS_UNIT = "dicom-watcher-hooks@.service"
HOOKS_INSTANCE = "dicom-watcher-hooks@smithlab.service"

#: Where the units expect the installed programs (docs/operators.md, "Installing as services").
INSTALLED_STORESCP_SH = "/opt/dicom-watcher/scripts/storescp.sh"
INSTALLED_DICOM_WATCHER = "/opt/dicom-watcher/venv/bin/dicom-watcher"


def require_tool(name: str, package: str) -> str:
    """The tool's path; skip when it is missing, or fail when CI is true."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} not found on PATH (Debian: apt-get install {package})")
    assert path is not None
    return path


# -- systemd units -------------------------------------------------------------


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting of a unit file, in order."""
    settings, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def values(text: str, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_settings(text) if s == section and k == key]


def dicom_watcher_command() -> str:
    """The command line that starts this checkout's `dicom-watcher`."""
    beside_python = Path(sys.executable).with_name("dicom-watcher")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("dicom-watcher")
    return found if found else f"{sys.executable} -m watcher"


def install_units(folder: Path, storescp_sh: str | None = None) -> dict[str, Path]:
    """Copy the units into `folder`, ExecStart= pointing at programs that
    exist here instead of the /opt/dicom-watcher ones, as verify requires."""
    replacements = {
        "storescp.service": (INSTALLED_STORESCP_SH, storescp_sh or str(SCRIPTS / "storescp.sh")),
        "dicom-watcher.service": (INSTALLED_DICOM_WATCHER, dicom_watcher_command()),
        "dicom-watcher-web.service": (INSTALLED_DICOM_WATCHER, dicom_watcher_command()),
    }
    copies = {}
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        installed, here = replacements[name]
        (start,) = values(text, "ExecStart")
        assert start.split()[0] == installed, f"{name}: ExecStart= should run {installed}"
        text = re.sub(rf"^ExecStart={re.escape(installed)}", f"ExecStart={here}", text, flags=re.M)
        copies[name] = folder / name
        copies[name].write_text(text, encoding="utf-8")
    text = (SYSTEMD / HOOKS_UNIT).read_text(encoding="utf-8")
    (start,) = values(text, "ExecStart")
    assert start.split()[0] == INSTALLED_DICOM_WATCHER, f"{HOOKS_UNIT}: ExecStart="
    text = text.replace(
        f"ExecStart={INSTALLED_DICOM_WATCHER}", f"ExecStart={dicom_watcher_command()}"
    )
    copies[HOOKS_UNIT] = folder / HOOKS_INSTANCE
    copies[HOOKS_UNIT].write_text(text, encoding="utf-8")
    return copies


#: The `dicom-watcher` account exists on a server, not on a test machine.
#: (systemd 252 does not check User=/Group= in verify; should a version do
#: so, that line alone is not a problem of the unit.)
MISSING_ACCOUNT = re.compile(
    r"\b(user|group)\b.*\bdicom-watcher\b.*(not found|no such|does not exist|unknown|resolve)",
    re.IGNORECASE,
)


def verify_problems(units: list[Path]) -> list[str]:
    """What `systemd-analyze verify` says about these unit files.

    verify exits 0 even for an unknown key or a bad value ("..., ignoring"),
    so every line it prints about one of our units counts as a problem; lines
    about the host's own units (which verify loads too) are not ours."""
    analyze = require_tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units[0].parent,
    )
    output = (result.stdout + result.stderr).splitlines()
    ours = [
        line
        for line in output
        if any(unit.name in line or str(unit.parent) in line for unit in units)
        and not MISSING_ACCOUNT.search(line)
    ]
    if result.returncode != 0 and not ours:
        ours = [f"systemd-analyze verify failed ({result.returncode}):", *output]
    return ours


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = install_units(tmp_path)
    problems = verify_problems(list(units.values()))
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)


def test_verify_check_catches_mistakes(tmp_path: Path) -> None:
    """The check above is meaningful: a misspelt value, an unknown key and a
    missing program are each reported."""
    units = install_units(tmp_path, storescp_sh=str(tmp_path / "no-such-script.sh"))
    broken = units["dicom-watcher.service"]
    text = broken.read_text(encoding="utf-8")
    text = text.replace("ProtectSystem=strict", "ProtectSystem=stricter")
    text = text.replace("[Service]\n", "[Service]\nRestartt=on-failure\n")
    broken.write_text(text, encoding="utf-8")
    report = "\n".join(verify_problems(list(units.values())))
    assert "stricter" in report
    assert "Restartt" in report
    assert "no-such-script.sh" in report


def test_units_hardening_exposure_is_low(tmp_path: Path) -> None:
    """systemd-analyze security rates every unit "OK" (exposure below 3.0 of 10)."""
    analyze = require_tool("systemd-analyze", "systemd")
    units = install_units(tmp_path)
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            "--threshold=30",
            "--no-pager",
            *map(str, units.values()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert result.returncode == 0, "\n".join(overall) or result.stdout + result.stderr
    assert len(overall) == len(units), result.stdout + result.stderr


def test_units_settings() -> None:
    """What the install guide and the product rely on, whatever verify accepts."""
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        for key, expected in [
            ("User", "dicom-watcher"),
            ("Group", "dicom-watcher"),
            ("Restart", "on-failure"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "true"),
            ("PrivateTmp", "true"),
            ("NoNewPrivileges", "true"),
            ("PrivateDevices", "true"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("SystemCallArchitectures", "native"),
        ]:
            assert values(text, key) == [expected], f"{name}: {key}="
        writable = " ".join(values(text, "ReadWritePaths")).split()
        if name == "dicom-watcher-web.service":  # it only reads the state folder
            assert writable == [], name
            assert values(text, "ReadOnlyPaths") == ["/srv/dicom-watcher/state"]
            continue
        assert "/srv/dicom-watcher/inbox" in writable, name
        assert values(text, "UMask"), f"{name}: UMask="
        if name != "dicom-watcher.service":  # (below)
            assert values(text, "KillMode") in ([], ["control-group"]), (
                f"{name}: storescp's forked children must be stopped with the service"
            )
    storescp = (SYSTEMD / "storescp.service").read_text(encoding="utf-8")
    assert "TCP_NODELAY=1" in values(storescp, "Environment")
    watcher = (SYSTEMD / "dicom-watcher.service").read_text(encoding="utf-8")
    assert values(watcher, "ExecStart") == [
        f"{INSTALLED_DICOM_WATCHER} run --config /etc/dicom-watcher/config.yaml"
    ]
    assert values(watcher, "KillSignal") == ["SIGTERM"]
    # The daemon stops its own placers; it may wait destination_timeout_seconds
    # for them (plus a few seconds of manifests) before it exits.
    assert values(watcher, "KillMode") == ["mixed"]
    timeout = Config().destination_timeout_seconds + STOP_MANIFEST_SECONDS
    assert float(values(watcher, "TimeoutStopSec")[0]) >= timeout + 10
    writable = " ".join(values(watcher, "ReadWritePaths")).split()
    assert {"/srv/dicom-watcher/state", "-/nas"} <= set(writable)
    web = (SYSTEMD / "dicom-watcher-web.service").read_text(encoding="utf-8")
    assert values(web, "ExecStart") == [
        f"{INSTALLED_DICOM_WATCHER} web --config /etc/dicom-watcher/config.yaml"
    ]


def test_the_hooks_unit_runs_one_labs_runner_as_its_account_and_writes_only_its_tree() -> None:
    text = (SYSTEMD / HOOKS_UNIT).read_text(encoding="utf-8")
    assert values(text, "ExecStart") == [
        f"{INSTALLED_DICOM_WATCHER} hooks --lab %i --config /etc/dicom-watcher/config.yaml"
    ]
    assert values(text, "User") == ["dw-%i"]
    assert values(text, "Group") == [], "the hook user's own group, as the daemon expects"
    writable = " ".join(values(text, "ReadWritePaths")).split()
    assert writable == ["-/nas/%i", "/srv/dicom-watcher/state/hooks/labs/%i/results"]
    for key, expected in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "true"),
        ("KillMode", "control-group"),
        ("Restart", "on-failure"),
        ("UMask", "0007"),
    ]:
        assert values(text, key) == [expected], f"{HOOKS_UNIT}: {key}="


# -- example config ------------------------------------------------------------


def test_example_config_loads_and_documents_every_key(tmp_path: Path) -> None:
    example = SYSTEMD / "config.example.yaml"
    config = load_config(example)
    assert config.inbox == Path("/srv/dicom-watcher/inbox")
    assert config.rules == Path("/etc/dicom-watcher/rules")
    assert config.state == Path("/srv/dicom-watcher/state")
    assert config.quiet_seconds == 60
    # The optional keys are commented out with their defaults: uncommented,
    # the file must still load, give the defaults, and name every key.
    text = example.read_text(encoding="utf-8")
    uncommented = re.sub(r"^# ([a-z_]+: \S+)$", r"\1", text, flags=re.M)
    everything = tmp_path / "config.yaml"
    everything.write_text(uncommented, encoding="utf-8")
    assert load_config(everything) == config
    keys = set(re.findall(r"^([a-z_]+):", uncommented, flags=re.M))
    assert keys == {f.name for f in fields(Config)}


# -- scripts -------------------------------------------------------------------


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_storescp_sh_missing_binary_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_script(
        "storescp.sh", STORESCP=str(tmp_path / "storescp"), INBOX=str(tmp_path / "inbox")
    )
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert "apt-get install dcmtk" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"PORT": "70000"}, "PORT"),
        (("-a", "A" * 17), {}, "AE title"),
        (("--bogus",), {}, "unknown argument"),
    ],
)
def test_storescp_sh_bad_settings(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    storescp = tmp_path / "storescp"  # never reached: the settings are checked first
    storescp.write_text("#!/bin/sh\nexit 99\n")
    storescp.chmod(0o755)
    result = run_script(
        "storescp.sh", *args, STORESCP=str(storescp), INBOX=str(tmp_path / "inbox"), **env
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_send_sh_needs_a_folder() -> None:
    result = run_script("send.sh")
    assert result.returncode == 2
    assert "FOLDER" in result.stderr and len(result.stderr.splitlines()) == 1


# -- storescp.sh + send.sh over loopback -----------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreSCP:
    """scripts/storescp.sh in its own process group (storescp --fork children
    outlive their parent and keep the listening socket, so the whole group
    is stopped at the end)."""

    ae_title = "DWTEST"

    def __init__(self, root: Path, per_study: bool = False) -> None:
        self.inbox = root / "inbox"
        self.per_study = per_study
        self.port = free_port()
        self.log_path = root / "storescp.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(SCRIPTS / "storescp.sh")],
                env={
                    **os.environ,
                    "PORT": str(self.port),
                    "INBOX": str(self.inbox),
                    "AE_TITLE": self.ae_title,
                    "STORESCP_LOG_LEVEL": "info",
                    "STORESCP_PER_STUDY": "1" if per_study else "0",
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"storescp.sh exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        pytest.fail(
            f"storescp is not listening on port {self.port} after {timeout} s:\n{self.log()}"
        )

    def stop(self) -> None:
        pgid = self.process.pid  # the session leader: its pid is the group id
        if self.process.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait(10)
        deadline = time.monotonic() + 5
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
        assert not group_alive(pgid), "storescp processes left behind"


@pytest.fixture(params=[False, True], ids=["flat-inbox", "folder-per-study"])
def storescp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSCP]:
    require_tool("storescp", "dcmtk")
    scp = StoreSCP(tmp_path, per_study=request.param)
    try:
        scp.wait_listening()
        yield scp
    finally:
        scp.stop()


@pytest.mark.e2e
def test_storescp_receives_what_send_sh_sends(storescp: StoreSCP, tmp_path: Path) -> None:
    require_tool("storescu", "dcmtk")
    # The script exec'd storescp (signals reach it directly) and gave it TCP_NODELAY.
    proc = Path(f"/proc/{storescp.process.pid}")
    if proc.exists():
        assert (proc / "comm").read_text().strip() == "storescp"
        assert b"TCP_NODELAY=1" in (proc / "environ").read_bytes().split(b"\0")

    sent_files = write_study(StudySpec(series=1, instances=3), tmp_path / "outgoing")
    sent = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sent_files)}
    assert len(sent) == 3

    result = subprocess.run(
        [
            str(SCRIPTS / "send.sh"),
            "-h",
            "127.0.0.1",
            "-p",
            str(storescp.port),
            "-a",
            storescp.ae_title,
            str(tmp_path / "outgoing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = f"send.sh:\n{result.stdout}{result.stderr}\nstorescp:\n{storescp.log()}"
    assert result.returncode == 0, report
    assert "3 stored, 0 failed" in result.stdout, report

    def inbox_files() -> list[Path]:
        return sorted(p for p in storescp.inbox.rglob("*") if p.is_file())

    deadline = time.monotonic() + 20
    while len(inbox_files()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    received_files = inbox_files()
    assert len(received_files) == 3, report

    received = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, received_files)}
    assert set(received) == set(sent)
    (study_uid,) = {ds.StudyInstanceUID for ds in sent.values()}
    folders = {p.parent.relative_to(storescp.inbox).as_posix() for p in received_files}
    assert folders == ({f"study_{study_uid}"} if storescp.per_study else {"."})
    for uid, dataset in received.items():
        assert dataset == sent[uid], f"instance {uid} changed on the way"
        assert dataset.file_meta.TransferSyntaxUID == sent[uid].file_meta.TransferSyntaxUID

    # SIGTERM stops it at once (it is storescp itself, not a shell around it).
    storescp.process.terminate()
    assert storescp.process.wait(10) == -signal.SIGTERM


# -- the install of docs/operators.md's "Installing as services" ---------------


def manual_install_commands() -> list[str]:
    """The pip lines of docs/operators.md's step "3. The program", as written there."""
    manual = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    step = manual.split("### 3. The program", 1)[1].split("\n### ", 1)[0]
    block = step.split("```sh\n", 1)[1].split("```", 1)[0]
    return [
        line.split("  #", 1)[0].strip()
        for line in block.splitlines()
        if line.startswith("/opt/dicom-watcher/venv/bin/pip ")
    ]


def lock_pins(lock: Path) -> dict[str, str]:
    """name -> version of every requirement in a pip-compile lock file."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


@pytest.mark.slow
def test_the_manuals_service_install_is_exactly_the_app_lock(tmp_path: Path) -> None:
    commands = manual_install_commands()
    assert len(commands) == 2 and all("install" in c for c in commands), commands
    assert "--require-hashes -r requirements/app.lock" in commands[0]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    for command in commands:
        argv = command.replace("/opt/dicom-watcher/venv", str(venv)).split()
        subprocess.run([*argv, "--quiet"], cwd=ROOT, check=True, timeout=600)
    freeze = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=freeze", "--exclude", "pip"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = dict(line.split("==") for line in freeze.split())
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in installed.items()}
    from watcher import __version__

    assert installed == {
        **lock_pins(ROOT / "requirements" / "app.lock"),
        "dicom-watcher": __version__,
    }
    version = subprocess.run(
        [str(venv / "bin" / "dicom-watcher"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert __version__ in version.stdout


# -- Prometheus alert rules ----------------------------------------------------


def test_alert_rules_pass_promtool_and_fire_as_their_tests_expect() -> None:
    """`promtool check rules` on the example rules, and `promtool test rules`
    (tests/alerts.test.yml): each alert fires on what should page."""
    promtool = require_tool("promtool", "prometheus")
    rules = SYSTEMD / "dicom-watcher.rules.yml"
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT / "tests",
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert of the file is exercised by the unit tests
    alerts = set(re.findall(r"^\s+- alert: (\w+)", rules.read_text(), flags=re.M))
    exercised = set(
        re.findall(r"alertname: (\w+)", (ROOT / "tests" / "alerts.test.yml").read_text())
    )
    assert alerts <= exercised, alerts - exercised


def test_alert_rules_name_only_metrics_the_web_process_serves() -> None:
    """A renamed metric would leave its alert silent forever."""
    from watcher import metrics

    status = {
        "labs": {"smith": {"delay_buckets": [[5.0, 1], ["+Inf", 0]]}},
        "destinations": [{"destination": "/nas", "state": "hung", "since": 0}],
        "hooks": {"labs": {"smith": {"runner": "alive"}}},
    }
    served = set(
        re.findall(r"^(dicom_watcher_\w+)", metrics.render(status, 0).decode(), flags=re.M)
    )
    used = set(
        re.findall(r"\b(dicom_watcher_\w+)", (SYSTEMD / "dicom-watcher.rules.yml").read_text())
    )
    assert used and used <= served, used - served
