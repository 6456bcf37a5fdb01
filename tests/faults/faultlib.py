"""Helpers shared by the fault tests (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness import (
    DaemonProcess,
    files_under,
    free_port,
    listening,
    metric_samples,
    send_command,
    skip_or_fail,
    storescp_command,
    wait_for,
)

from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec, write_study

PAGE = 4096


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def pages(paths: list[Path]) -> int:
    """Bytes a tmpfs needs for these files (whole pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in paths)


def fill(folder: Path, leave: int, name: str = "filler.bin") -> Path:
    """Fill the filesystem of `folder` so that `leave` bytes stay free."""
    filler = folder / name
    size = free_bytes(folder) - leave
    assert size > 0, f"{folder} has less than {leave} bytes free"
    with open(filler, "wb") as handle:
        handle.truncate(0)
        remaining = size
        block = b"\0" * (1 << 20)
        while remaining:
            remaining -= handle.write(block[: min(remaining, len(block))])
        handle.flush()
        os.fsync(handle.fileno())
    assert free_bytes(folder) == leave, (free_bytes(folder), leave)
    return filler


def stage(run: DaemonProcess, spec: StudySpec, name: str) -> list[Path]:
    """Write a study into a staging folder of the test (not the inbox)."""
    return write_study(spec, run.root / "staging" / name)


def deliver(run: DaemonProcess, files: list[Path], name: str) -> dict[str, str]:
    """Copy staged files into the inbox; return inbox path -> sha256 (what entered)."""
    entered = {}
    for source in files:
        target = run.inbox / f"{name}.{source.name}"
        data = source.read_bytes()
        target.write_bytes(data)
        entered[str(target)] = hashlib.sha256(data).hexdigest()
    return entered


def write_into(run: DaemonProcess, spec: StudySpec, name: str) -> dict[str, str]:
    """A study written into the inbox; returns what entered."""
    return deliver(run, stage(run, spec, name), name)


def own(run: DaemonProcess) -> list[Path]:
    """What a test itself makes beside a daemon: rules, config, log, staging."""
    return [run.rules, run.config_path, run.log_path, run.root / "staging"]


#: Where the fault tests' daemons write their metrics (config `metrics_file`),
#: inside their state folder, which the accounting allows.
METRICS_FILE = "state/metrics.prom"


def metrics_of(run: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The metrics the daemon last wrote to METRICS_FILE, parsed."""
    return metric_samples((run.root / METRICS_FILE).read_text())


def temporaries(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if p.name.startswith(TEMP_PREFIX)]


def status_study(run: DaemonProcess, uid: str) -> dict[str, object]:
    """The study's entry in status.json (read directly: cheaper than `status`)."""
    try:
        status = json.loads((run.state / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    for study in status.get("studies", []):
        if study["study"] == uid:
            return study
    return {}


def wait_attempts(run: DaemonProcess, uid: str, attempts: int, timeout: float = 30.0) -> None:
    """Wait until the parked study `uid` has been tried `attempts` times."""
    wait_for(
        lambda: int(status_study(run, uid).get("attempts", 0)) >= attempts,
        timeout,
        f"{attempts} attempts at placing study {uid}",
    )


# --- mounts ---------------------------------------------------------------------


class Mounts:
    """tmpfs and bind mounts made by one test, all undone at its end (in
    reverse order, lazily if something still holds them)."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)

    def tmpfs(self, where: Path, size: str) -> Path:
        """A fresh tmpfs of `size` (e.g. "4m") at `where` (created)."""
        if os.geteuid() != 0:
            skip_or_fail("mounting a tmpfs needs root")
        if shutil.which("mount") is None:
            skip_or_fail("no mount command")
        where.mkdir(parents=True, exist_ok=True)
        done = self._run("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
        if done.returncode != 0:
            skip_or_fail(f"cannot mount a tmpfs at {where}: {done.stderr.strip()}")
        self.mounted.append(where)
        return where

    def bind(self, source: Path, where: Path) -> Path:
        done = self._run("--bind", str(source), str(where))
        assert done.returncode == 0, f"mount --bind {source} {where}: {done.stderr.strip()}"
        self.mounted.append(where)
        return where

    def remount(self, where: Path, options: str, timeout: float = 20.0) -> None:
        """`mount -o remount,OPTIONS`; a read-only remount is refused while a
        file is open for writing there (EBUSY), so it is tried again."""
        deadline = time.monotonic() + timeout
        while True:
            done = self._run("-o", f"remount,{options}", str(where))
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, f"remount,{options} {where}: {done.stderr.strip()}"
            time.sleep(0.005)

    def umount(self, where: Path, timeout: float = 20.0) -> None:
        """Unmount `where`, trying again while it is busy (an open file or
        folder of the daemon), as an operator's `umount` would be."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                ["umount", str(where)], capture_output=True, text=True, timeout=30
            )
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, f"umount {where}: {done.stderr.strip()}"
            time.sleep(0.005)
        self.mounted.remove(where)

    def close(self) -> None:
        for where in reversed(self.mounted):
            done = subprocess.run(["umount", str(where)], capture_output=True, timeout=30)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
        self.mounted.clear()


# --- a real Storage SCP -------------------------------------------------------------


class Storescp:
    """dcmtk's storescp through scripts/storescp.sh, writing into `inbox`;
    `send(folder)` starts a storescu sender (scripts/send.sh)."""

    def __init__(self, inbox: Path) -> None:
        if not (shutil.which("storescp") and shutil.which("storescu")):
            skip_or_fail("dcmtk's storescp/storescu are not installed (apt-get install dcmtk)")
        self.inbox = inbox
        self.port = free_port()
        self.senders: list[subprocess.Popen[bytes]] = []
        self.process = subprocess.Popen(
            storescp_command(self.port, inbox),
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: listening(self.port), 20, f"storescp on port {self.port}")
        time.sleep(0.2)
        # Another program may have taken the port first: then ours has exited.
        assert self.process.poll() is None, f"storescp could not listen on port {self.port}"

    def send(self, *folders: Path) -> subprocess.Popen[bytes]:
        sender = subprocess.Popen(
            send_command(self.port, *folders),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        self.senders.append(sender)
        return sender

    def close(self) -> None:
        for process in [*self.senders, self.process]:
            # storescp --fork leaves children; send.sh runs storescu: end each group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
