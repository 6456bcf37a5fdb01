"""Hook jobs of a lab's rules, passed from the daemon to that lab's runner
through the filesystem: no socket, no database.

    state/                         the service user's; others may only pass through
      hooks/labs/<lab>/            service user, the hook user's group, 0750
        jobs/<id>.json             the daemon's, 0640: what to run (setgid 2750)
        results/<id>.json          the runner's (the lab's hook user), 0640:
                                   running, failed, done or gave up, with times
        results/runner.json        the runner's heartbeat
                                   (results/ is 3770: setgid, sticky)

The runner (`dicom-watcher hooks --lab`) runs as the lab's hook user, which
may read `jobs/` through its own group (which holds only it and the service
user) and write its own files in `results/`. It takes a job only if the
service user (the owner of state/) wrote it and nobody else could have; the
daemon takes a result only if the lab's hook user wrote it. So neither
another lab, nor a member of the lab or of the service group, can make a job
run or fake its outcome. The daemon brings each study's manifest up to date
from the results, then removes the finished job (a job given up is kept
in state/hooks/failed/).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import signal
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from watcher.errors import ConfigError
from watcher.hooks import HookJob, OnChange, Outcome, hook_record
from watcher.logs import kv
from watcher.placement import TEMP_PREFIX
from watcher.rules import Lab
from watcher.state import FILE_MODE, atomic_write, make_private

log = logging.getLogger(__name__)

JOBS_MODE = 0o2750
RESULTS_MODE = 0o3770
#: A job or result larger than this is not read.
MAX_FILE_BYTES = 1 << 20
#: The runner writes its heartbeat this often; older than STALE it is not alive.
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0
FINAL = ("done", "gave_up")
#: `_read_trusted`'s reason when there is no file.
MISSING = "no such file"


@dataclass
class Result:
    """What a runner did with one job."""

    id: str
    state: str  # running, failed (a retry follows), done, gave_up
    attempts: int = 0
    retries_left: int = 0
    next_try: float = 0.0
    exit_status: int | None = None
    reason: str = ""
    started: float | None = None
    finished: float | None = None
    #: The running hook's process group and its start time (from /proc), so
    #: that a restarted runner can end what its predecessor left running.
    pid: int | None = None
    pid_started: int | None = None


@dataclass
class Mailbox:
    """One lab's folders under state/hooks/labs/."""

    state: Path
    lab: str
    folder: Path = field(init=False)
    jobs: Path = field(init=False)
    results: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = self.state / "hooks" / "labs" / self.lab
        self.jobs = self.folder / "jobs"
        self.results = self.folder / "results"

    @property
    def heartbeat(self) -> Path:
        return self.results / "runner.json"


# --- the daemon's side -----------------------------------------------------------


def hook_group(lab_group: int | None, hook_user: str | None) -> int | None:
    """The group through which a lab's runner reads its jobs and the daemon
    its results: the hook user's own group, which holds only it and the
    service user (so the lab's other members can neither read the jobs nor
    write results); the lab's group if the hook user is unknown here."""
    if hook_user:
        try:
            return pwd.getpwnam(hook_user).pw_gid
        except KeyError:
            pass
    return lab_group


def prepare(mailbox: Mailbox, group: int | None) -> None:
    """Make the lab's folders with their owners and modes (the daemon, at
    start). state/ and the folders down to the lab's become passable (0751,
    0711) so the runner can reach its own; each folder is made on its own
    (never with looser parents), and a link where one should be is refused."""
    for folder in (mailbox.state, mailbox.state / "hooks", mailbox.folder.parent):
        make_private(folder)
        _group_and_mode(folder, None, 0o711 if folder != mailbox.state else 0o751)
    # All made first, so that jobs can be posted (and wait) even when the
    # group cannot be given yet.
    for folder in (mailbox.folder, mailbox.jobs, mailbox.results):
        make_private(folder)
    for folder, mode in (
        (mailbox.folder, 0o750),
        (mailbox.jobs, JOBS_MODE),
        (mailbox.results, RESULTS_MODE),
    ):
        _group_and_mode(folder, group, mode)


def _group_and_mode(folder: Path, group: int | None, mode: int) -> None:
    """Give `folder` (never a link) `group` and `mode`, through a handle."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if group is not None and info.st_gid != group:
            try:
                os.fchown(fd, -1, group)
            except PermissionError as error:
                raise ConfigError(
                    f"cannot give {folder} the group {_group_name(group)}: the service user "
                    "must be a member of the lab's hook user's group"
                ) from error
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def post(mailbox: Mailbox, job: HookJob) -> Path:
    """Write the job where the lab's runner finds it."""
    path = mailbox.jobs / f"{job.id}.json"
    atomic_write(path, json.dumps(asdict(job), ensure_ascii=False))
    return path


def read_results(
    mailbox: Mailbox, job_ids: list[str], hook_uid: int | None, refused: set[str]
) -> dict[str, Result]:
    """The runner's results of the posted jobs `job_ids`. Nothing else in
    results/ is opened. A file the lab's hook user did not write (or that
    others could change), or that is no valid result, is refused and
    reported once; `refused` remembers which were."""
    results: dict[str, Result] = {}
    for job_id in job_ids:
        path = mailbox.results / f"{job_id}.json"
        data, distrust = _read_trusted(path, hook_uid)
        if distrust == MISSING:
            continue
        result = None if distrust is not None else parse_result(data, job_id)
        if result is None:
            if job_id not in refused:
                refused.add(job_id)
                log.error(
                    kv(
                        "hook_result_refused",
                        lab=mailbox.lab,
                        path=path,
                        reason=distrust or "not a valid result of this job",
                    )
                )
            continue
        refused.discard(job_id)
        results[job_id] = result
    return results


#: Longest `reason` a result may carry (it goes into manifests and logs).
MAX_REASON = 1000
#: Times a result may give: from 2000 to 2200.
TIMES = (946684800.0, 7258118400.0)


def parse_result(data: bytes, job_id: str) -> Result | None:
    """A runner's result, if `data` is one for `job_id` with fields of the
    right kinds and sizes; else None (never raises)."""
    try:
        fields = json.loads(data)
        if not isinstance(fields, dict) or fields.get("id") != job_id:
            return None
        result = Result(**fields)
    except Exception:  # noqa: BLE001 - anything a hostile file can make the parser raise
        return None
    if result.state not in ("running", "failed", "done", "gave_up"):
        return None
    for count in (result.attempts, result.retries_left):
        if type(count) is not int or not 0 <= count < 1 << 20:
            return None
    for code in (result.exit_status, result.pid, result.pid_started):
        if code is not None and (type(code) is not int or abs(code) >= 1 << 62):
            return None
    for moment in (result.started, result.finished, result.next_try or None):
        if moment is not None and (
            type(moment) not in (int, float) or not TIMES[0] <= moment <= TIMES[1]
        ):
            return None
    if not isinstance(result.reason, str) or len(result.reason) > MAX_REASON:
        return None
    return result


def pending_jobs(mailbox: Mailbox) -> list[str]:
    """Ids of the jobs posted and not finished yet."""
    try:
        return sorted(
            name[: -len(".json")]
            for name in os.listdir(mailbox.jobs)
            if name.endswith(".json") and not name.startswith(TEMP_PREFIX)
        )
    except OSError:
        return []


def load_job(mailbox: Mailbox, job_id: str, owner: int | None = None) -> HookJob | None:
    """The posted job `job_id`, if the daemon (`owner`, default: us) wrote it."""
    path = mailbox.jobs / f"{job_id}.json"
    data, distrust = _read_trusted(path, os.geteuid() if owner is None else owner)
    if distrust is not None:
        log.error(kv("hook_job_refused", lab=mailbox.lab, path=path, reason=distrust))
        return None
    try:
        job = HookJob(**json.loads(data))
    except Exception as error:  # noqa: BLE001 - anything a bad file can make the parser raise
        log.error(kv("hook_job_refused", lab=mailbox.lab, path=path, reason=f"unreadable: {error}"))
        return None
    if job.id != job_id or job.lab != mailbox.lab:
        log.error(kv("hook_job_refused", lab=mailbox.lab, path=path, reason="not this lab's job"))
        return None
    return job


def finish(mailbox: Mailbox, job: HookJob, result: Result, failed_folder: Path | None) -> None:
    """Remove a finished job and its result; a job given up is kept in
    `failed_folder`, with the result as it was checked, for the operator."""
    if failed_folder is not None:
        kept = {**asdict(job), "result": asdict(result)}
        atomic_write(failed_folder / f"{job.id}.json", json.dumps(kept, ensure_ascii=False))
    for path in (mailbox.jobs / f"{job.id}.json", mailbox.results / f"{job.id}.json"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:  # (a folder put there by the hook user)
            log.warning(kv("hook_file_left", lab=mailbox.lab, path=path, error=error))


def runner_seen(mailbox: Mailbox, hook_uid: int | None) -> float | None:
    """When the lab's runner last wrote its heartbeat, or None."""
    data, distrust = _read_trusted(mailbox.heartbeat, hook_uid)
    if distrust is not None:
        return None
    try:
        updated = json.loads(data)["updated"]
    except Exception:  # noqa: BLE001 - anything a hostile file can make the parser raise
        return None
    if type(updated) not in (int, float) or not TIMES[0] <= updated <= TIMES[1]:
        return None
    return float(updated)


def _read_trusted(path: Path, owner: int | None) -> tuple[bytes, str | None]:
    """The bytes of `path` if it is a regular file of `owner` that nobody
    else may write; else why not. Never follows a link, never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", MISSING
    except OSError as error:
        return b"", error.strerror or str(error)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b"", "not a regular file"
        if owner is None:
            return b"", "the lab has no hook_user in the config"
        if info.st_uid != owner:
            return b"", f"belongs to uid {info.st_uid}, not to uid {owner}"
        if info.st_mode & 0o022:
            return b"", f"writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        if info.st_size > MAX_FILE_BYTES:
            return b"", f"larger than {MAX_FILE_BYTES} bytes"
        return os.read(fd, MAX_FILE_BYTES + 1), None
    finally:
        os.close(fd)


class Dispatch:
    """The daemon's side for all labs: posts their jobs, follows the
    runners' results into the manifests (`on_change`), removes what is
    finished, and counts for the status."""

    def __init__(
        self,
        state: Path,
        labs: Mapping[str, Lab],
        failed_folder: Path,
        on_change: OnChange,
    ) -> None:
        self.failed_folder = failed_folder
        self.on_change = on_change
        self.labs = dict(labs)
        self.mailboxes = {name: Mailbox(state, name) for name in labs}
        self.hook_uids = {name: _uid(lab.hook_user) for name, lab in labs.items()}
        self.usable: dict[str, str | None] = {}
        # By (lab, job id): an id alone could name another lab's job.
        self.jobs: dict[tuple[str, str], HookJob] = {}
        self.seen: dict[tuple[str, str], tuple[str, int]] = {}
        self.posted: dict[str, list[str]] = {name: [] for name in labs}
        self.refused: dict[str, set[str]] = {name: set() for name in labs}
        self.gave_up: dict[str, int] = dict.fromkeys(labs, 0)
        self.latest: dict[str, dict[str, Result]] = {name: {} for name in labs}

    def prepare(self) -> None:
        """Make each lab's folders; a lab whose folders cannot be made is
        reported, and its jobs wait (the other labs are not held up)."""
        for name, lab in self.labs.items():
            try:
                prepare(self.mailboxes[name], hook_group(lab.group, lab.hook_user))
                self.usable[name] = None
            except (ConfigError, OSError) as error:
                self.usable[name] = str(error)
                log.error(kv("lab_jobs_unavailable", lab=name, error=error))
        for path in self.failed_folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                kept = json.loads(path.read_text(encoding="utf-8"))
                if kept.get("lab") in self.gave_up and "result" in kept:  # a lab runner's
                    self.gave_up[kept["lab"]] += 1

    def post(self, job: HookJob) -> None:
        mailbox = self.mailboxes[job.lab]
        post(mailbox, job)
        self.jobs[(job.lab, job.id)] = job
        self.posted[job.lab].append(job.id)
        self.on_change(job, hook_record(job, "pending", attempts=0))
        log.info(
            kv(
                "hook_held",
                hook=job.label,
                lab=job.lab,
                study=job.study,
                waits_for=f"dicom-watcher hooks --lab {job.lab}",
            )
        )

    def sync(self) -> None:
        """Take up the runners' results: a change goes to the manifest, a
        final one also removes the job (a job given up is kept). A lab whose
        files cannot be taken up is reported; the others go on."""
        for name, mailbox in self.mailboxes.items():
            self.posted[name] = pending_jobs(mailbox)
            if self.usable.get(name) is not None:
                continue  # its jobs wait (and are counted)
            try:
                self._sync_lab(name, mailbox)
            except Exception as error:  # noqa: BLE001 - one lab never stops the loop
                log.error(kv("hook_results_failed", lab=name, error=repr(error)))

    def _sync_lab(self, name: str, mailbox: Mailbox) -> None:
        posted = self.posted[name]
        results = read_results(mailbox, posted, self.hook_uids[name], self.refused[name])
        self.latest[name] = results
        for job_id, result in results.items():
            key = (name, job_id)
            if self.seen.get(key) == (result.state, result.attempts):
                continue
            job = self.jobs.get(key) or load_job(mailbox, job_id)
            if job is None or job.lab != name:
                continue
            self.jobs[key] = job
            self.seen[key] = (result.state, result.attempts)
            self.on_change(
                job,
                hook_record(
                    job,
                    result.state,
                    attempts=result.attempts,
                    exit_status=result.exit_status,
                    reason=result.reason,
                    started=result.started,
                    finished=result.finished,
                ),
            )
            log.info(
                kv(
                    "hook_result",
                    hook=job.label,
                    lab=name,
                    study=job.study,
                    state=result.state,
                    exit_status=result.exit_status,
                    attempts=result.attempts,
                )
            )
            if result.state in FINAL:
                gave_up = result.state == "gave_up"
                finish(mailbox, job, result, self.failed_folder if gave_up else None)
                self.gave_up[name] += gave_up
                self.posted[name].remove(job_id)
                self.jobs.pop(key, None)
                self.seen.pop(key, None)

    def summary(self, now: float) -> dict[str, dict[str, object]]:
        """Per lab: jobs waiting, running and failed, and whether its runner lives."""
        labs: dict[str, dict[str, object]] = {}
        for name, mailbox in self.mailboxes.items():
            posted = self.posted[name]  # as the last sync (every second) listed them
            if not posted and not self.gave_up[name] and not self.labs[name].hook_user:
                continue
            latest = self.latest.get(name, {})
            running = sum(1 for i in posted if getattr(latest.get(i), "state", "") == "running")
            retrying = sum(1 for i in posted if getattr(latest.get(i), "state", "") == "failed")
            seen = runner_seen(mailbox, self.hook_uids[name])
            alive = seen is not None and now - seen < STALE_SECONDS
            labs[name] = {
                "waiting": len(posted) - running,
                "running": running,
                "retrying": retrying,
                "failed": self.gave_up[name],
                "runner": "alive" if alive else ("stale" if seen is not None else "never seen"),
                "runner_seen": seen,
                "hook_user": self.labs[name].hook_user,
                "problem": self.usable.get(name),
            }
        return labs


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _uid(user: str | None) -> int | None:
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


# --- the runner's side -----------------------------------------------------------


class ResultStore:
    """A lab runner's `JobStore`: its results in the lab's results/ folder."""

    def __init__(self, mailbox: Mailbox, clock: Callable[[], float] = time.time) -> None:
        self.mailbox = mailbox
        self.clock = clock
        self.results: dict[str, Result] = {}

    def load(self, job_id: str) -> Result | None:
        data, distrust = _read_trusted(self.mailbox.results / f"{job_id}.json", os.geteuid())
        return None if distrust is not None else parse_result(data, job_id)

    def running(self, job: HookJob, pid: int) -> None:
        self._write(
            job,
            "running",
            started=self.clock(),
            pid=pid,
            pid_started=process_start(pid),
        )

    def retrying(self, job: HookJob, outcome: Outcome) -> None:
        self._write(job, "failed", outcome=outcome)

    def done(self, job: HookJob, outcome: Outcome) -> None:
        self._write(job, "done", outcome=outcome)

    def gave_up(self, job: HookJob, outcome: Outcome) -> Path:
        self._write(job, "gave_up", outcome=outcome)
        return self.mailbox.results / f"{job.id}.json"

    def _write(
        self, job: HookJob, state: str, outcome: Outcome | None = None, **extra: object
    ) -> None:
        earlier = self.results.get(job.id)
        result = Result(
            id=job.id,
            state=state,
            attempts=job.attempt,
            retries_left=job.retries_left,
            next_try=job.next_try,
            started=earlier.started if earlier else None,
        )
        if outcome is not None:
            result.exit_status, result.reason = outcome.status, outcome.reason
            result.finished = self.clock()
        for key, value in extra.items():
            setattr(result, key, value)
        self.results[job.id] = result
        write_own(self.mailbox.results / f"{job.id}.json", json.dumps(asdict(result)))

    def beat(self) -> None:
        write_own(
            self.mailbox.heartbeat,
            json.dumps({"pid": os.getpid(), "user": user_name(), "updated": self.clock()}),
        )


def write_own(path: Path, text: str) -> None:
    """Replace our own file `path` atomically, mode 0640 (in the sticky
    results/ folder, only its owner may replace it)."""
    atomic_write(path, text)
    if stat.S_IMODE(os.stat(path).st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), to tell it
    from a later process given the same number."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def end_leftover(result: Result) -> bool:
    """End the process group a killed runner left running for `result`, if
    it is still that process (same start time, our own); True if one was."""
    if result.pid is None or result.pid_started is None:
        return False
    if process_start(result.pid) != result.pid_started:
        return False
    try:
        if os.stat(f"/proc/{result.pid}").st_uid != os.geteuid():
            return False
        os.killpg(result.pid, signal.SIGKILL)
    except OSError:
        return False
    return True


def user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
