"""Running the real daemon as a subprocess on temporary folders (or in this
process, by an injected clock), and the accounting check that every file
that entered the inbox is somewhere safe."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from watcher.config import Config
from watcher.daemon import Daemon
from watcher.placement import TEMP_PREFIX


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """True when something accepts connections on this loopback port."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


REPO = Path(__file__).resolve().parent.parent
#: The AE title the test receivers answer to.
AE_TITLE = "DICOMWATCHER"


def storescp_command(port: int, inbox: Path) -> list[str]:
    """scripts/storescp.sh (dcmtk's storescp) receiving into `inbox`."""
    return [
        str(REPO / "scripts" / "storescp.sh"),
        "-p",
        str(port),
        "-a",
        AE_TITLE,
        "-o",
        str(inbox),
    ]


def send_command(port: int, *folders: Path) -> list[str]:
    """scripts/send.sh (dcmtk's storescu) sending `folders` to the receiver on `port`."""
    return [str(REPO / "scripts" / "send.sh"), "-p", str(port), "-a", AE_TITLE, *map(str, folders)]


def skip_or_fail(reason: str) -> None:
    """Skip with a reason on a user's machine; fail in CI (CI=true), where
    every tool and permission the suite needs must be present."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


FAST_SETTINGS = {
    "quiet_seconds": 1.0,
    "settle_seconds": 0.3,
    "quarantine_after_seconds": 2.0,
    "rescan_seconds": 1.0,
    "rules_check_seconds": 0.3,
    "park_first_seconds": 1.0,
    "park_max_seconds": 2.0,
    "retry_attempts": 2,
    "retry_max_seconds": 2.0,
}


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "", every: float = 0.05
) -> object:
    """Poll `predicate` every `every` seconds until it returns something
    true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(every)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def is_manifest(path: Path) -> bool:
    """A study manifest or its lock: written by the daemon beside the instances."""
    return path.name == ".manifest.lock" or (
        path.suffix == ".json" and path.name.startswith("manifest")
    )


def lab_files(folder: Path) -> list[Path]:
    """The instances in a lab tree: every file but the study manifests."""
    return [p for p in files_under(folder) if not is_manifest(p)]


class DaemonProcess:
    """`dicom-watcher run` in a subprocess, with JSON logs in a file."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.rules = root / "rules"
        self.state = root / "state"
        self.log_path = root / "daemon.log"
        self.config_path = root / "dicom-watcher.yaml"
        for folder in (self.inbox, self.rules):
            folder.mkdir(parents=True, exist_ok=True)
        config = {"inbox": "inbox", "rules": "rules", "state": "state", **FAST_SETTINGS, **settings}
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def add_rule(
        self,
        name: str,
        destination: Path,
        match: dict[str, str] | None = None,
        path: str = "{PatientID}/{StudyDescription}/{SeriesNumber:03d}_{SeriesDescription}/"
        "{InstanceNumber:05d}.dcm",
        **extra: object,
    ) -> Path:
        """Write rules/<name>.yaml; a name `lab/rule` goes into that lab's folder."""
        rule = {"match": match or {}, "destination": str(destination), "path": path, **extra}
        file = self.rules / f"{name}.yaml"
        file.parent.mkdir(exist_ok=True)
        file.write_text(yaml.safe_dump(rule))
        return file

    def start(
        self, *args: str, env: dict[str, str] | None = None, new_session: bool = False
    ) -> DaemonProcess:
        """Start the daemon; `new_session`: as its own session's leader, as
        systemd starts it (not in the test's session)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watcher",
                "run",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
                *args,
            ],
            stdout=log,
            stderr=log,
            cwd=self.root,
            env={**os.environ, **(env or {})},
            start_new_session=new_session,
        )
        log.close()
        return self

    def logs(self, event: str | None = None) -> list[dict[str, str]]:
        if not self.log_path.exists():
            return []
        lines = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "raw", "message": line}
            if event is None or record.get("event") == event:
                lines.append(record)
        return lines

    def wait_event(self, event: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, str]]:
        return wait_for(
            lambda: len(self.logs(event)) >= count and self.logs(event),
            timeout,
            f"{count} x {event} in {self.log_path}",
        )  # type: ignore[return-value]

    def inbox_files(self) -> list[Path]:
        return [p for p in files_under(self.inbox) if not p.name.startswith(TEMP_PREFIX)]

    def wait_drained(self, timeout: float = 60.0) -> None:
        wait_for(lambda: not self.inbox_files(), timeout, "the inbox to drain")

    def wait_settled(self, timeout: float = 60.0) -> None:
        """The inbox drained, and a status written since then shows no call
        on a destination (a manifest, say) still unanswered."""
        self.wait_drained(timeout)
        drained = time.time()

        def settled() -> bool:
            status = self.status()
            return float(status.get("updated", 0)) > drained and not status.get(  # type: ignore[arg-type]
                "destination_calls"
            )

        wait_for(settled, timeout, "the daemon's calls on destinations to end", every=0.2)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def status(self) -> dict[str, object]:
        """`status --json`, or {} while the daemon has not published one yet."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "watcher",
                "status",
                "--config",
                str(self.config_path),
                "--json",
            ],
            capture_output=True,
            cwd=self.root,
            timeout=30,  # (it must answer whatever a lab's share does)
        )
        return json.loads(out.stdout) if out.returncode == 0 else {}


def assert_accounted(
    entered: dict[str, str],
    labs: Iterable[Path],
    state: Path | Iterable[Path],
    inbox: Path | None = None,
    *,
    root: Path | None = None,
    before: set[str] | None = None,
    allowed: Iterable[Path] = (),
    exact: bool = False,
    unique_uids: bool = False,
    belongs: dict[str, Iterable[Path]] | None = None,
) -> dict[str, int]:
    """Every file that entered the inbox (path -> sha256) is, by content, in a
    lab tree, in quarantine or in unmatched (a byte-identical duplicate of
    another entered file counts with it); no temporary file is left in a lab
    tree; no content is placed twice under one lab. Returns counts.

    `state` may be several state folders (several daemons). The stricter
    checks are asked for by keyword:

    - `root` and `before` (from `paths_under(root)` taken at the start):
      nothing new exists under `root` outside the labs, the state folders, the
      inbox and the `allowed` folders (the test's own files);
    - `exact`: every instance file in a lab tree (manifests aside) has the
      bytes of a file that entered: nothing partial, foreign or altered is
      visible there;
    - `unique_uids`: no SOPInstanceUID is placed twice in one lab (even
      under another name or with other bytes);
    - `belongs` (entered path -> the lab trees it belongs to): each placed
      file is in those trees and in no other.
    """
    labs = list(labs)
    states = [state] if isinstance(state, (str, os.PathLike)) else list(state)
    entered_hashes = set(entered.values())
    where: dict[str, set[str]] = {}
    lab_file_count = 0
    for lab in labs:
        files = files_under(lab)
        temporaries = [p for p in files if p.name.startswith(TEMP_PREFIX)]
        assert not temporaries, f"temporary files left in {lab}: {temporaries}"
        instances = [p for p in files if not is_manifest(p)]
        lab_file_count += len(instances)
        hashes = [sha256(p) for p in instances]
        duplicates = {h for h, n in Counter(hashes).items() if n > 1}
        assert not duplicates, f"{len(duplicates)} contents placed twice in {lab}"
        if exact:
            foreign = [
                str(p) for p, h in zip(instances, hashes, strict=True) if h not in entered_hashes
            ]
            assert not foreign, f"{len(foreign)} files in {lab} did not enter: {foreign[:3]}"
        if unique_uids:
            uids = [_sop_instance_uid(p) for p in instances]
            twice = {u for u, n in Counter(uids).items() if n > 1}
            assert not twice, f"{len(twice)} instances placed twice in {lab}: {sorted(twice)[:3]}"
        for digest in hashes:
            where.setdefault(digest, set()).add(str(lab))
    for folder in states:
        for kind in ("quarantine", "unmatched"):
            for path in files_under(Path(folder) / kind):
                if not path.name.endswith(".reason.txt"):
                    where.setdefault(sha256(path), set()).add(kind)
    left = {sha256(p) for p in files_under(inbox)} if inbox else set()
    missing = [p for p, digest in entered.items() if digest not in where and digest not in left]
    assert not missing, f"{len(missing)} files lost, e.g. {missing[:3]}"
    counts = {"entered": len(entered), "still_in_inbox": len(left)}
    for digest in entered_hashes:
        for place in where.get(digest, ()):
            key = place if place in ("quarantine", "unmatched") else "placed"
            counts[key] = counts.get(key, 0) + 1
    for path, trees in (belongs or {}).items():
        digest = entered[path]
        found = {
            place for place in where.get(digest, ()) if place not in ("quarantine", "unmatched")
        }
        wanted = {str(tree) for tree in trees}
        if digest not in left:
            assert found == wanted, f"{path} is in {sorted(found)}, belongs in {sorted(wanted)}"
    counts["distinct_contents"] = len(entered_hashes)
    counts["lab_files"] = lab_file_count
    if root is not None:
        assert before is not None, "give `before=paths_under(root)` with `root`"
        keep = [*labs, *states, *([inbox] if inbox else []), *allowed]
        counts["new_paths_checked"] = assert_nothing_outside(root, before, keep)
    return counts


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text, read with prometheus-client's own parser: (name,
    sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _sop_instance_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID", ""))


def paths_under(root: Path) -> set[str]:
    """Every file, folder and link under `root` (links not followed)."""
    found = set()
    for parent, folders, names in os.walk(root):
        found.update(os.path.join(parent, name) for name in folders + names)
    return found


def assert_nothing_outside(root: Path, before: set[str], allowed: Iterable[Path]) -> int:
    """Nothing new under `root` since `before`, except inside (or being) one of
    the `allowed` folders; returns how many new paths were checked."""
    keep = [os.path.realpath(p) for p in allowed]
    new = paths_under(root) - before

    def inside(path: str) -> bool:
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        return any(real == k or real.startswith(k + os.sep) for k in keep)

    outside = sorted(p for p in new if not inside(p))
    assert not outside, f"{len(outside)} new paths outside destinations and state: {outside[:5]}"
    return len(new)


def snapshot(folder: Path) -> dict[str, str]:
    """path -> sha256 of every file under `folder`."""
    return {str(p): sha256(p) for p in files_under(folder)}


def write_in_chunks(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Write `data` as a slow sender would: open, several writes with pauses, close."""
    step = max(1, len(data) // chunks)
    with open(path, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(pause)


class FakeClock:
    """Wall seconds that move only when a test moves them."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def in_process_daemon(
    tmp_path: Path,
    clock: FakeClock,
    rule: dict[str, object] | None = None,
    once: bool = False,
    **settings: object,
) -> tuple[SettledDaemon, Path]:
    """A daemon on tmp_path's inbox/, state/ and rules/, with one rule (its
    other keys from `rule`) that takes everything into lab/; `settings` are
    the config's. `once`: as `run --once` (placing in this process, or in
    the workers it is given)."""
    lab = tmp_path / "lab"
    lab.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    template = "{PatientID}/{SeriesNumber}/{InstanceNumber}.dcm"
    lab_rule = {"match": {}, "destination": str(lab), "path": template, **(rule or {})}
    (rules / "lab.yaml").write_text(yaml.safe_dump(lab_rule))
    config = Config(
        inbox=tmp_path / "inbox",
        rules=rules,
        state=tmp_path / "state",
        settle_seconds=0,
        **settings,
    )  # type: ignore[arg-type]
    daemon = SettledDaemon(config, once=once, clock=clock, stop=threading.Event())
    daemon._prepare()
    daemon.settle()
    daemon._reload_rules()
    return daemon, lab


class SettledDaemon(Daemon):
    """A daemon whose `tick()` waits for its placers' answers: a test's turn
    of the loop places what is due, in the placers' real processes."""

    def tick(self) -> None:
        super().tick()
        self.settle()

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until no placement is in flight and every answer is taken."""
        deadline = time.monotonic() + timeout
        while self.delivery.in_flight or self.work.busy():
            if time.monotonic() > deadline:
                raise AssertionError(f"placers still busy after {timeout} s")
            time.sleep(0.005)
            for destination in self.work.poll():
                self.delivery.resume(destination, self.clock())
            self.delivery.close_round()


def prepare(config: Config) -> SettledDaemon:
    """A daemon that has done its start-up work (crash cleanup included)."""
    daemon = SettledDaemon(config, stop=threading.Event())
    daemon._prepare()
    daemon.settle()
    return daemon
