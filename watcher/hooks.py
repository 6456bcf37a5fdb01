"""Post-processing hooks: the one module that starts other programs.

A hook is an argument list (never a shell line). Its placeholders are
replaced inside single arguments, so a header value can neither become shell
code nor split into extra arguments; values that come from a header are also
made safe (no control characters, never a leading `-` that a program would
read as an option). The same values are given as `DW_*` environment variables.

`HookRunner` runs jobs, at most a number at once, each in its own session
with a timeout (then the whole process group is killed), output to the log;
a failed job is retried a bounded number of times with a doubling wait. Where
it keeps their progress is its store's business: the daemon runs its
operator rules' jobs with `DaemonStore` (a file each in `state/hooks/` while
pending, so a restart runs them again, and `state/hooks/failed/` once given
up; only files the daemon's own user wrote are taken up), a lab's runner
(`watcher.labrunner`) runs that lab's with the results store of
`watcher.labjobs`. Every change of a job's state is told to the daemon's
`on_change`, which records it in the study's manifest.
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
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from watcher.logs import kv
from watcher.placement import TEMP_PREFIX
from watcher.rules import Hook
from watcher.state import atomic_write, trusted
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
    #: The rule that made it and its study's manifest (which records its state).
    rule: str = ""
    manifest: str = ""
    queued: float = 0.0


def make_job(hook: Hook, values: Mapping[str, str], cwd: Path, now: float = 0.0) -> HookJob:
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
        rule=values.get("rule", ""),
        manifest=values.get("manifest", ""),
        queued=now,
    )


@dataclass(frozen=True)
class Outcome:
    job: HookJob
    status: int | None  # exit status; None when it timed out or could not start
    reason: str


class JobStore(Protocol):
    """Where a runner keeps what it does with its jobs, so that a restart
    takes up what was pending and others can see the results."""

    def running(self, job: HookJob, pid: int) -> None: ...
    def retrying(self, job: HookJob, outcome: Outcome) -> None: ...
    def done(self, job: HookJob, outcome: Outcome) -> None: ...
    def gave_up(self, job: HookJob, outcome: Outcome) -> Path | None: ...


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def hook_record(
    job: HookJob,
    state: str,
    *,
    attempts: int,
    exit_status: int | None = None,
    reason: str = "",
    started: float | None = None,
    finished: float | None = None,
) -> dict[str, object]:
    """A hook job as the study's manifest lists it."""
    return {
        "id": job.id,
        "hook": job.label,
        "rule": job.rule,
        "state": state,
        "exit_status": exit_status,
        "attempts": attempts,
        "reason": reason,
        "queued": _when(job.queued or None),
        "started": _when(started),
        "finished": _when(finished),
    }


#: Told of each change of a job's state, with its manifest record.
OnChange = Callable[["HookJob", dict[str, object]], None]


class DaemonStore:
    """The daemon's own jobs (operator rules): one file each in state/hooks/
    while pending, kept in state/hooks/failed/ when given up."""

    def __init__(self, folder: Path, on_change: OnChange | None = None) -> None:
        self.folder = folder
        self.failed_folder = folder / "failed"
        self.on_change: OnChange = on_change or (lambda job, record: None)
        self._started: dict[str, float] = {}

    def submit(self, job: HookJob) -> None:
        self._save(job)
        self.on_change(job, hook_record(job, "pending", attempts=job.attempt))

    def _told(self, job: HookJob, state: str, outcome: Outcome | None = None) -> None:
        started = self._started.get(job.id)
        if outcome is None:
            record = hook_record(job, state, attempts=job.attempt, started=started)
        else:
            record = hook_record(
                job,
                state,
                attempts=job.attempt,
                exit_status=outcome.status,
                reason=outcome.reason,
                started=started,
                finished=time.time(),
            )
        self.on_change(job, record)

    def resume(self) -> list[HookJob]:
        """The jobs a previous run left pending; a job file that someone else
        than the daemon's user could have written is refused."""
        jobs = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name.startswith(TEMP_PREFIX):
                continue
            distrust = trusted(path)
            if distrust is not None:
                log.error(kv("hook_job_refused", path=path, reason=distrust, action="not run"))
                continue
            try:
                jobs.append(HookJob(**json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError) as error:
                log.warning(kv("hook_job_unreadable", path=path, error=error))
        return jobs

    def running(self, job: HookJob, pid: int) -> None:
        self._started[job.id] = time.time()
        self._save(job)
        self._told(job, "running")

    def retrying(self, job: HookJob, outcome: Outcome) -> None:
        self._save(job)
        self._told(job, "failed", outcome)

    def done(self, job: HookJob, outcome: Outcome) -> None:
        (self.folder / f"{job.id}.json").unlink(missing_ok=True)
        self._told(job, "done", outcome)
        self._started.pop(job.id, None)

    def gave_up(self, job: HookJob, outcome: Outcome) -> Path:
        self._save(job, self.failed_folder)
        (self.folder / f"{job.id}.json").unlink(missing_ok=True)
        self._told(job, "gave_up", outcome)
        self._started.pop(job.id, None)
        return self.failed_folder / f"{job.id}.json"

    def _save(self, job: HookJob, folder: Path | None = None) -> None:
        folder = folder or self.folder
        atomic_write(folder / f"{job.id}.json", json.dumps(asdict(job), ensure_ascii=False))


class HookRunner:
    """Runs hook jobs in the background, at most `concurrency` at once;
    `poll` is called from the owner's loop. The daemon runs its operator
    rules' jobs with it, a lab's runner (`dicom-watcher hooks`) that lab's."""

    def __init__(
        self,
        store: JobStore,
        *,
        concurrency: int = 2,
        retry_seconds: float = 60.0,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.concurrency = max(1, concurrency)
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.waiting: list[HookJob] = []
        self.running: dict[str, threading.Thread] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()

    def add(self, job: HookJob) -> None:
        self.waiting.append(job)

    def known(self, job_id: str) -> bool:
        return job_id in self.running or any(job.id == job_id for job in self.waiting)

    def poll(self) -> None:
        """Collect finished jobs, then start waiting ones while slots are free."""
        while True:
            try:
                outcome = self.done.get_nowait()
            except queue.Empty:
                break
            self.running.pop(outcome.job.id, None)
            self.processes.pop(outcome.job.id, None)
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

    def terminate(self) -> None:
        """End the running jobs' process groups (a runner that stops); their
        jobs stay marked running, so the next start runs them again."""
        for process in list(self.processes.values()):
            _kill_group(process)
        for thread in list(self.running.values()):
            thread.join(KILL_GRACE_SECONDS)
        self.running.clear()

    def _finish(self, outcome: Outcome) -> None:
        try:
            self._record(outcome)
        except OSError as error:  # where results are kept is full, read-only, or taken
            log.error(
                kv(
                    "hook_state_unsaved",
                    hook=outcome.job.label,
                    lab=outcome.job.lab,
                    study=outcome.job.study,
                    error=error,
                )
            )

    def _record(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.status == 0:
            self.store.done(job, outcome)
            log.info(
                kv("hook_done", hook=job.label, lab=job.lab, study=job.study, attempt=job.attempt)
            )
            return
        if job.retries_left > 0:
            job.retries_left -= 1
            job.next_try = self.clock() + self.retry_seconds * 2 ** (job.attempt - 1)
            self.store.retrying(job, outcome)
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
        kept = self.store.gave_up(job, outcome)
        log.error(
            kv(
                "hook_gave_up",
                hook=job.label,
                lab=job.lab,
                study=job.study,
                status=outcome.status,
                reason=outcome.reason,
                attempts=job.attempt,
                kept=kept or "",
            )
        )

    def _run(self, job: HookJob) -> None:
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
        self.processes[job.id] = process
        try:
            # Recorded with its process group before anything else, so that a
            # runner restarted after a crash can end what this one started.
            self.store.running(job, process.pid)
        except OSError as error:  # its state cannot be kept: the job still runs
            log.warning(kv("hook_state_unsaved", hook=job.label, study=job.study, error=error))
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
