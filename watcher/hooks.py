"""Post-processing hooks: the one module that starts other programs.

A hook is an argument list (never a shell line). Its placeholders are
replaced inside single arguments, so a header value can neither become shell
code nor split into extra arguments; values that come from a header are also
made safe (no control characters, never a leading `-` that a program would
read as an option). The same values are given as `DW_*` environment variables.

Jobs wait in `state/hooks/` until they end, so a restart runs again what was
pending; only files the daemon's own user wrote are taken up. Jobs of a lab's
rules are never run here: they wait in `state/hooks/labs/<lab>/` for that
lab's runner. A limited number run at once, each in its own session with a
timeout (then the whole process group is killed); output goes to the log; a
failed job is retried a bounded number of times, with a growing wait, and is
then kept in `state/hooks/failed/` for the operator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from watcher.logs import kv
from watcher.placement import TEMP_PREFIX
from watcher.rules import Hook
from watcher.state import atomic_write, make_private, trusted
from watcher.template import safe_component

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
OUTPUT_LINES = 40
OUTPUT_LINE_LENGTH = 300
KILL_GRACE_SECONDS = 5.0


def hook_values(
    *,
    study_folder: Path,
    lab: str,
    rule: str,
    patient: str,
    study_uid: str,
    files: int,
    manifest: Path | None,
    destination: Path,
) -> dict[str, str]:
    """The values hooks may use. Header values are made safe first."""
    return {
        "study_folder": str(study_folder),
        "lab": lab,
        "rule": rule,
        "patient": _from_header(patient),
        "study_uid": _from_header(study_uid),
        "files": str(files),
        "manifest": str(manifest) if manifest else "",
        "destination": str(destination),
    }


def _from_header(value: str) -> str:
    """One path component: never empty, never `.` or `..`, never an option.

    A value that is never empty and never starts with a dot cannot make a `.`
    or `..` component however an argument joins it to others.
    """
    return safe_component(value)


def substitute(command: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """Each argument with its placeholders replaced; one argument stays one."""
    return [PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in command]


@dataclass
class HookJob:
    """One hook to run for one placed study (or late addition)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    timeout: float
    retries_left: int
    label: str
    lab: str
    study: str
    attempt: int = 0
    next_try: float = 0.0
    id: str = field(default_factory=lambda: secrets.token_hex(6))


def make_job(hook: Hook, values: Mapping[str, str], cwd: Path) -> HookJob:
    env = {f"DW_{key.upper()}": value for key, value in values.items()}
    return HookJob(
        argv=substitute(hook.command, values),
        env=env,
        cwd=str(cwd),
        timeout=hook.timeout,
        retries_left=hook.retries,
        label=hook.label,
        lab=values["lab"],
        study=values["study_uid"],
    )


@dataclass(frozen=True)
class Outcome:
    job: HookJob
    status: int | None  # exit status; None when it timed out or could not start
    reason: str


class HookRunner:
    """Runs hook jobs in the background; `poll` is called from the daemon loop."""

    def __init__(
        self,
        folder: Path,
        *,
        concurrency: int = 2,
        retry_seconds: float = 60.0,
        clock: Callable[[], float],
    ) -> None:
        self.folder = folder
        self.failed_folder = folder / "failed"
        self.concurrency = max(1, concurrency)
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.waiting: list[HookJob] = []
        self.running: dict[str, threading.Thread] = {}
        self.done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.held_folder = folder / "labs"
        self.failed_folder.mkdir(mode=0o750, parents=True, exist_ok=True)

    def resume(self) -> None:
        """Take up the jobs a previous run left pending; a job file that
        someone else than the daemon's user could have written is refused."""
        for path in sorted(self.folder.glob("*.json")):
            if path.name.startswith(TEMP_PREFIX):
                continue
            distrust = trusted(path)
            if distrust is not None:
                log.error(kv("hook_job_refused", path=path, reason=distrust, action="not run"))
                continue
            try:
                job = HookJob(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as error:
                log.warning(kv("hook_job_unreadable", path=path, error=error))
                continue
            self.waiting.append(job)
            log.info(kv("hook_resumed", hook=job.label, lab=job.lab, study=job.study))

    def submit(self, job: HookJob) -> None:
        self._save(job)
        self.waiting.append(job)

    def hold(self, job: HookJob) -> Path:
        """Keep a lab rule's job for that lab's own runner (`dicom-watcher
        hooks --lab`): the daemon never runs a lab's code as the service user."""
        folder = self.held_folder / job.lab
        make_private(folder)
        self._save(job, folder)
        log.info(
            kv(
                "hook_held",
                hook=job.label,
                lab=job.lab,
                study=job.study,
                waits_for=f"dicom-watcher hooks --lab {job.lab}",
            )
        )
        return folder / f"{job.id}.json"

    def poll(self) -> None:
        """Collect finished jobs, then start waiting ones while slots are free."""
        while True:
            try:
                outcome = self.done.get_nowait()
            except queue.Empty:
                break
            self.running.pop(outcome.job.id, None)
            self._finish(outcome)
        now = self.clock()
        for job in sorted(self.waiting, key=lambda j: j.next_try):
            if len(self.running) >= self.concurrency:
                break
            if job.next_try > now:
                continue
            self.waiting.remove(job)
            job.attempt += 1
            thread = threading.Thread(
                target=self._run, args=(job,), daemon=True, name=f"hook-{job.label}"
            )
            self.running[job.id] = thread
            thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def wait(self, timeout: float) -> None:
        """Let running jobs end (used by `run --once` and tests)."""
        for thread in list(self.running.values()):
            thread.join(timeout)
        self.poll()

    def _finish(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.status == 0:
            self._forget(job)
            log.info(
                kv("hook_done", hook=job.label, lab=job.lab, study=job.study, attempt=job.attempt)
            )
            return
        if job.retries_left > 0:
            job.retries_left -= 1
            job.next_try = self.clock() + self.retry_seconds * 2 ** (job.attempt - 1)
            self._save(job)
            self.waiting.append(job)
            log.warning(
                kv(
                    "hook_failed",
                    hook=job.label,
                    lab=job.lab,
                    study=job.study,
                    status=outcome.status,
                    reason=outcome.reason,
                    attempt=job.attempt,
                    next_try_in=round(job.next_try - self.clock()),
                )
            )
            return
        # Kept first, then logged: whoever reads the line finds the job file.
        self._save(job, self.failed_folder)
        self._forget(job)
        log.error(
            kv(
                "hook_gave_up",
                hook=job.label,
                lab=job.lab,
                study=job.study,
                status=outcome.status,
                reason=outcome.reason,
                attempts=job.attempt,
                kept=self.failed_folder / f"{job.id}.json",
            )
        )

    def _run(self, job: HookJob) -> None:
        log.info(
            kv(
                "hook_started",
                hook=job.label,
                lab=job.lab,
                study=job.study,
                attempt=job.attempt,
                argv=json.dumps(job.argv, ensure_ascii=False),
            )
        )
        try:
            process = subprocess.Popen(
                job.argv,
                cwd=job.cwd if os.path.isdir(job.cwd) else None,
                env={**os.environ, **job.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            self.done.put(Outcome(job, None, f"cannot start: {error.strerror or error}"))
            return
        try:
            output, _ = process.communicate(timeout=job.timeout)
            status, reason = process.returncode, f"exit status {process.returncode}"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            try:
                output, _ = process.communicate(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:  # a descendant left its group and kept the pipe
                output = b""
            status, reason = None, f"timed out after {job.timeout:.0f} s (killed)"
        self._log_output(job, output)
        self.done.put(Outcome(job, status, reason))

    def _log_output(self, job: HookJob, output: bytes) -> None:
        lines = output.decode("utf-8", errors="replace").splitlines()
        shown = lines[-OUTPUT_LINES:]
        if len(lines) > len(shown):
            log.info(
                kv(
                    "hook_output",
                    hook=job.label,
                    study=job.study,
                    line=f"... {len(lines) - len(shown)} earlier lines not shown",
                )
            )
        for line in shown:
            log.info(
                kv("hook_output", hook=job.label, study=job.study, line=line[:OUTPUT_LINE_LENGTH])
            )

    def _save(self, job: HookJob, folder: Path | None = None) -> None:
        folder = folder or self.folder
        atomic_write(folder / f"{job.id}.json", json.dumps(asdict(job), ensure_ascii=False))

    def _forget(self, job: HookJob) -> None:
        (self.folder / f"{job.id}.json").unlink(missing_ok=True)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's whole process group, SIGKILL it after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(KILL_GRACE_SECONDS)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
