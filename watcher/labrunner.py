"""`dicom-watcher hooks --lab NAME`: one lab's runner, under that lab's own
account (`labs.<lab>.hook_user`), so a lab's jobs can do anything to its own
tree and nothing to another lab's or to the daemon's state.

It takes the jobs the daemon posted for the lab (see `watcher.labjobs`),
runs them as the daemon runs the operator's (argument lists, `DW_*`
environment, timeout with the process group killed, `hook_concurrency`,
retries with a doubling wait) and records each one's progress in the lab's
results/ folder, where the daemon reads it into the study's manifest. A job
interrupted by a crash of the runner is run again at its next start (after
ending what the crashed runner left running): a hook may run twice then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time

from watcher.config import Config
from watcher.errors import WatcherError
from watcher.hooks import HookRunner
from watcher.labjobs import (
    FINAL,
    HEARTBEAT_SECONDS,
    Mailbox,
    ResultStore,
    end_leftover,
    load_job,
    pending_jobs,
    user_name,
)
from watcher.logs import kv
from watcher.stopping import StopRequest

log = logging.getLogger(__name__)

#: How often the jobs folder is looked at for new jobs.
POLL_SECONDS = 0.5
#: How often a runner that started before the daemon looks for its folder.
WAIT_SECONDS = 2.0


def run_lab_hooks(config: Config, lab_name: str, once: bool, stop: StopRequest) -> int:
    """Run `lab_name`'s jobs until `stop` is set (or, with `once`, until
    none is waiting or running)."""
    _check_account(config, lab_name)
    found = _wait_for_jobs(config, lab_name, stop)
    if found is None:
        return 0
    mailbox, service = found
    store = ResultStore(mailbox)
    runner = HookRunner(
        store,
        concurrency=config.hook_concurrency,
        retry_seconds=config.hook_retry_seconds,
        clock=time.time,
    )
    log.info(kv("runner_started", lab=lab_name, user=user_name(), jobs=mailbox.jobs))
    settled: set[str] = set()  # finished or refused: not looked at again
    next_beat = 0.0
    while not stop.is_set():
        _take_new(mailbox, service, store, runner, settled)
        runner.poll()
        now = time.time()
        if now >= next_beat:
            next_beat = now + HEARTBEAT_SECONDS
            try:
                store.beat()
            except OSError as error:
                log.warning(kv("runner_heartbeat_failed", lab=lab_name, error=error))
        if once and not runner.busy:
            break
        stop.wait(POLL_SECONDS)
    if runner.running:
        log.info(kv("runner_stopping", lab=lab_name, interrupted=len(runner.running)))
        runner.terminate()
    log.info(kv("runner_stopped", lab=lab_name, waiting=len(runner.waiting)))
    return 0


def _check_account(config: Config, lab_name: str) -> None:
    """Refuse to run as root, or as any account but the lab's hook user."""
    lab = (config.labs or {}).get(lab_name)
    if lab is None:
        raise WatcherError(f"no lab {lab_name!r} in the config's labs:")
    if not lab.hook_user:
        raise WatcherError(
            f"labs.{lab_name}.hook_user is not set: the daemon hands this lab's jobs to no runner"
        )
    if os.geteuid() == 0:
        raise WatcherError(
            f"refusing to run lab {lab_name}'s hooks as root: run as {lab.hook_user}"
        )
    with contextlib.suppress(OSError):
        if os.stat(config.state).st_uid == os.geteuid():
            raise WatcherError(
                f"refusing to run lab {lab_name}'s hooks as the service user {user_name()}: "
                f"run as {lab.hook_user}"
            )
    if user_name() != lab.hook_user:
        raise WatcherError(f"lab {lab_name}'s hooks run as {lab.hook_user}, not as {user_name()}")


def _wait_for_jobs(config: Config, lab_name: str, stop: StopRequest) -> tuple[Mailbox, int] | None:
    """The lab's mailbox and the service user's uid, once the daemon has made
    the lab's jobs folder (a runner may start first) and it is the daemon's
    alone; None if stopped while waiting."""
    mailbox = Mailbox(config.state, lab_name)
    told = False
    while True:
        try:
            service = os.stat(config.state).st_uid
            jobs = os.lstat(mailbox.jobs)
            break
        except OSError as error:
            if not told:
                told = True
                log.warning(
                    kv(
                        "runner_waiting",
                        lab=lab_name,
                        folder=mailbox.jobs,
                        error=error.strerror,
                        hint="the daemon makes it at start, with the lab's group: is "
                        f"{user_name()} in it?",
                    )
                )
            if stop.wait(WAIT_SECONDS):
                return None
    if os.geteuid() == service:
        raise WatcherError(f"refusing to run lab {lab_name}'s hooks as the service user")
    if (
        not stat.S_ISDIR(jobs.st_mode)
        or jobs.st_uid != service
        or stat.S_IMODE(jobs.st_mode) & 0o022
    ):
        raise WatcherError(
            f"{mailbox.jobs} is not the daemon's alone (owner uid {jobs.st_uid}, mode "
            f"{stat.S_IMODE(jobs.st_mode):04o}): its jobs are not run"
        )
    return mailbox, service


def _take_new(
    mailbox: Mailbox, service: int, store: ResultStore, runner: HookRunner, settled: set[str]
) -> None:
    """Queue the posted jobs not queued yet, with what an earlier run of
    this runner recorded of them."""
    posted = pending_jobs(mailbox)
    settled.intersection_update(posted)  # the daemon removed the others
    for job_id in posted:
        if job_id in settled or runner.known(job_id):
            continue
        result = store.load(job_id)
        if result is not None and result.state in FINAL:
            settled.add(job_id)  # the daemon removes it once it has read the result
            continue
        job = load_job(mailbox, job_id, owner=service)
        if job is None:
            settled.add(job_id)
            continue
        if result is not None:
            store.results[job_id] = result
            job.attempt, job.retries_left = result.attempts, result.retries_left
            job.next_try = result.next_try
            if result.state == "running":
                # This runner was killed during the job: end what it left
                # running, then run the job again (that attempt did not end).
                ended = end_leftover(result)
                job.attempt, job.next_try = max(result.attempts - 1, 0), 0.0
                log.warning(
                    kv(
                        "hook_interrupted",
                        hook=job.label,
                        lab=job.lab,
                        study=job.study,
                        leftover_ended=ended,
                        action="run again",
                    )
                )
        runner.add(job)
        log.info(kv("hook_taken", hook=job.label, lab=job.lab, study=job.study, id=job.id))
