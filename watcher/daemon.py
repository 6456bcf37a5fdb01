"""The inbox daemon: the orchestrator of `dicom-watcher run`.

One loop thread does the work; the watchdog observer thread (`inbox`) only
enqueues paths. Each tick: take the events, rescan now and then, read the files that
are complete, place the studies that went quiet, publish the status.

Nothing is kept only in memory that cannot be rebuilt from disk: pending
studies come back from the inbox at start-up, retry schedules from
`state/retry/`, and `state/placing.json` names the folders of a placement in
progress, so that its temporary files are cleaned up after a crash.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING

from watcher import headers, metrics
from watcher.bookkeeping import Completion, Counts, completion, describe
from watcher.config import Config
from watcher.delivery import Delivery, Hooks
from watcher.destinations import Destinations
from watcher.engine import (
    POOL_THRESHOLD,
    RetryPolicy,
    header_pool,
    iter_read,
    remove_source,
)
from watcher.errors import DestinationUnavailable, NotRoutable
from watcher.hooks import DaemonStore, HookJob, HookRunner
from watcher.labjobs import Dispatch
from watcher.logs import kv
from watcher.placement import TEMP_PREFIX, place
from watcher.placing import Immediate, PlacerPool
from watcher.rules import Resolver, RuleBook
from watcher.state import atomic_write, make_private, trusted
from watcher.stopping import StopRequest
from watcher.studies import Arrivals, Studies, Study
from watcher.template import safe_component

if TYPE_CHECKING:
    from watcher.inbox import InboxWatcher

log = logging.getLogger(__name__)


TICK_SECONDS = 0.2
#: Files read per turn of the loop before it looks at the stop flag again.
READ_CHUNK = 256
#: Files ready at once from which the daemon reads them on every core.
DAEMON_POOL_THRESHOLD = 20000
STATUS_SECONDS = 2.0
#: How often the labs' runners' results are taken up.
HOOK_SYNC_SECONDS = 1.0
#: How long a rule reload waits for a lab destination's lookup: milliseconds
#: on a disk or a share that answers; a share that hangs must not stall the
#: loop (the rule waits, its last good version in force).
RESOLVE_SECONDS = 2.0
#: The inbox's folder that kept unmatched files a rule matches now go back to.
REROUTED = "rerouted"


class Daemon:
    """`dicom-watcher run`. `clock` (wall seconds) and `stop` are injectable."""

    def __init__(
        self,
        config: Config,
        *,
        once: bool = False,
        clock: Callable[[], float] = time.time,
        stop: StopRequest | None = None,
        quiet_override: float | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.config = config
        #: The config file it was started with, and that file's signature
        #: then: a change is said once (it applies at the next start).
        self.config_file = config_file
        self._config_seen = _signature(config_file)
        self._config_said = False
        self.once = once
        self.clock = clock
        self.stop = stop or threading.Event()
        self.quiet_override = quiet_override
        self.rulebook = RuleBook(config.rules, config.labs, Resolver(RESOLVE_SECONDS))
        self.arrivals = Arrivals()
        #: Files whose size and mtime were taken in this turn of the loop: not
        #: looked at again before they are read.
        self._fresh: set[str] = set()
        self.studies = Studies(headers.BASE_FIELDS)
        self.tags = headers.tags_for(())
        #: Hash files as they are read, for manifests (while the study is quiet).
        self._digest = True
        self.retry = RetryPolicy(
            attempts=config.retry_attempts, max_seconds=config.retry_max_seconds
        )
        self.watcher: InboxWatcher | None = None
        self.counts = Counts()
        self.state = config.state
        self.quarantine_dir = config.state / "quarantine"
        self.unmatched_dir = config.state / "unmatched"
        self.retry_dir = config.state / "retry"
        self._quarantine_reasons = QuarantineReasons(self.quarantine_dir)
        self._metrics_failed = False
        #: Hook jobs' new states, recorded by the loop's thread: a job's
        #: start is told from the thread that runs it, and the records (and
        #: the placers they write through) belong to the loop.
        self._hook_changes: queue.SimpleQueue[tuple[HookJob, dict[str, object]]] = (
            queue.SimpleQueue()
        )
        self._loop_thread = threading.get_ident()
        self.hook_store = DaemonStore(config.state / "hooks", on_change=self._hook_changed)
        self.hooks = HookRunner(
            self.hook_store,
            concurrency=config.hook_concurrency,
            retry_seconds=config.hook_retry_seconds,
            clock=clock,
        )
        #: Lab rules' jobs go to the labs' own runners (`dicom-watcher hooks`).
        self.lab_jobs = Dispatch(
            config.state, config.labs or {}, self.hook_store.failed_folder, self._hook_changed
        )
        self._next_hook_sync = 0.0
        self.destinations = Destinations(clock)
        #: Calls that touch a destination run in its placer (the daemon), or
        #: here and at once (`run --once`).
        self.work: PlacerPool | Immediate = (
            Immediate()
            if once
            else PlacerPool(
                config.destination_timeout_seconds,
                self.destinations,
                config.park_first_seconds,
                config.park_max_seconds,
            )
        )
        self.delivery = Delivery(
            config,
            rulebook=self.rulebook,
            studies=self.studies,
            destinations=self.destinations,
            work=self.work,
            hooks=Hooks(self.hook_store, self.hooks, self.lab_jobs),
            counts=self.counts,
            reread=self._reread,
            stop=self.stop,
            clock=clock,
            once=once,
        )
        self.saved_retries: dict[str, dict[str, object]] = {}
        self.started = self.clock()
        self._next_rescan = self._next_rules = 0.0
        # `run --once` writes its status on the way out (and every
        # STATUS_SECONDS while it works), not once more just before.
        self._next_status = self.started + STATUS_SECONDS if once else 0.0

    # -- life cycle --

    def run(self) -> int:
        self._prepare()
        self._reload_rules()
        if not self.once:
            from watcher.inbox import InboxWatcher  # (watchdog: not needed by --once)

            self.watcher = InboxWatcher(
                self.config.inbox, self.config.poll, self.config.poll_seconds, self.clock
            )
            self.watcher.start()  # before the first scan: nothing falls between them
        log.info(
            kv(
                "started",
                inbox=self.config.inbox,
                rules=self.config.rules,
                state=self.state,
                quiet_seconds=self.config.quiet_seconds,
                once=self.once,
            )
        )
        try:
            self._reroute_unmatched()
            while not self.stop.is_set():
                self.tick()
                if (
                    self.once
                    and len(self.arrivals) == len(self.arrivals.held())
                    and not self.hooks.busy
                    and all(s.parked_since is not None for s in self.studies)
                ):
                    break
                self.work.wait(TICK_SECONDS, self.stop)
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.delivery.workers is not None:
                self.delivery.workers.shutdown(cancel_futures=True)
                self.delivery.workers = None
            self._record_hook_changes()
            self.delivery.finish()
            self._write_status()
        parked = [s for s in self.studies if s.parked_since is not None]
        held = self.arrivals.held()
        if self.once and (parked or held):
            log.error(
                kv(
                    "once_incomplete",
                    parked_studies=len(parked),
                    files_left=sum(len(s.instances) for s in parked) + len(held),
                    not_quarantined=len(held),
                )
            )
            return 1
        log.info(kv("stopped", pending_studies=len(self.studies), files_waiting=len(self.arrivals)))
        return 0

    def _prepare(self) -> None:
        self.config.inbox.mkdir(parents=True, exist_ok=True)
        for folder in (
            self.config.state,
            self.quarantine_dir,
            self.unmatched_dir,
            self.retry_dir,
            self.hook_store.folder,
            self.hook_store.failed_folder,
        ):
            make_private(folder)
        for job in self.hook_store.resume():
            self.hooks.add(job)
            log.info(kv("hook_resumed", hook=job.label, lab=job.lab, study=job.study))
        self.lab_jobs.prepare()
        self.delivery.clean_interrupted()
        for path in self.retry_dir.glob("*.json"):
            if trusted(path) is not None:
                log.error(kv("retry_state_refused", path=path, reason=trusted(path)))
                continue
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                self.saved_retries[str(saved["study"])] = saved
            except (OSError, ValueError, KeyError) as error:
                log.warning(kv("retry_state_unreadable", path=path, error=error))

    def tick(self) -> None:
        now = self.clock()
        self._fresh.clear()  # (a turn that raised may have left some)
        self._take_events(now)
        if now >= self._next_rescan:
            self._next_rescan = now + self.config.rescan_seconds
            folders = self.scan(self.config.inbox, now)
            if self.watcher is not None:
                self.watcher.check_coverage(folders)
            self._remove_empty_folders()
        if now >= self._next_rules:
            self._next_rules = now + self.config.rules_check_seconds
            if self._reload_rules():
                self._reroute_unmatched()
            self._check_config_file()
        self._read_ready(now)
        self._handle_unroutable(now)
        for destination in self.work.poll():
            self.delivery.resume(destination, now)
        self.delivery.pump()
        self.delivery.close_round()
        due = self.studies.due(
            now, self.config.quiet_seconds, self.config.max_study_age_seconds, self._completion
        )
        due = [(study, why) for study, why in due if study.uid not in self.delivery.in_flight]
        if due and len(self.arrivals):
            # A study counts as quiet only once the files still unread (they may
            # be its own: the daemon yields to the receiver and reads late) are
            # as old as its quiet period.
            unread = self.arrivals.newest_unread(self.clock())
            if unread is not None:
                due = [
                    (study, why)
                    for study, why in due
                    if why != "quiet" or now - unread >= self._completion(study)[0]
                ]
        if due and not self.stop.is_set():
            if self.once:
                self.delivery.place_studies(due)
            else:
                for study, why in due:
                    self.delivery.begin(study, why)
        self.hooks.poll()
        if now >= self._next_hook_sync:
            self._next_hook_sync = now + HOOK_SYNC_SECONDS
            self.lab_jobs.sync()
            self.delivery.records.retry()
        self._record_hook_changes()
        if self.watcher is not None and not self.watcher.healthy() and not self.stop.is_set():
            self.watcher.restart()
            self._next_rescan = 0.0
        if now >= self._next_status:
            self._next_status = now + STATUS_SECONDS
            self._write_status()
        self._fresh.clear()

    def _take_events(self, now: float) -> None:
        """Notice the files the inbox's events name, each as of when its
        event was seen (a long drain would otherwise date the last ones late)."""
        if self.watcher is None:
            return
        while True:
            try:
                kind, path, seen = self.watcher.events.get_nowait()
            except queue.Empty:
                return
            if kind == "dir":
                self.scan(Path(path), now)  # files may predate its watch
            else:
                if path in self.studies:  # rewritten after it was read
                    self.studies.remove_path(path)
                self._observe(path, seen, closed=kind == "closed")

    def scan(self, folder: Path, now: float) -> int:
        """Notice every file under `folder` not known yet; return the number
        of folders seen."""
        folders = 0
        for directory, _, files in os.walk(folder):
            folders += 1
            for name in files:
                path = os.path.join(directory, name)
                if path not in self.arrivals and path not in self.studies:
                    self._observe(path, now)
        return folders

    def _remove_empty_folders(self) -> None:
        """Remove sub-folders of the inbox left empty for a long while (a
        folder a receiver has just made for a new study is kept)."""
        limit = self.clock() - self.config.empty_folder_seconds
        inbox = str(self.config.inbox)
        for directory, _folders, files in os.walk(inbox, topdown=False):
            if directory == inbox or files:
                continue
            try:
                if not os.listdir(directory) and os.stat(directory).st_mtime < limit:
                    os.rmdir(directory)
            except OSError:
                continue  # something arrived meanwhile, or it is gone already

    def _observe(self, path: str, now: float, closed: bool = False) -> None:
        if os.path.basename(path).startswith(TEMP_PREFIX):
            return
        try:
            stat = os.lstat(path)
        except FileNotFoundError:
            self.arrivals.forget(path)
            return
        if not S_ISREG(stat.st_mode):  # folders, links, sockets: not ours to read
            return
        self.arrivals.observe(path, stat.st_size, stat.st_mtime, now, closed)
        self._fresh.add(path)

    def _read_ready(self, now: float) -> None:
        unchanged = []
        for path in self.arrivals.ready(now, self.config.settle_seconds, self.clock()):
            if self._unchanged(path, now):
                unchanged.append(path)
        retry_after = max(self.config.settle_seconds, 1.0)
        pool = self.delivery.workers
        if pool is None and self.once and threading.active_count() == 1:
            # `run --once`, nothing but this thread: workers are forked (cheap)
            # and kept, to place the studies as well.
            if len(unchanged) >= POOL_THRESHOLD:
                pool = self.delivery.workers = header_pool(threads_running=False)
        elif pool is None and len(unchanged) >= DAEMON_POOL_THRESHOLD:
            # Beside the observer thread workers must be spawned, which costs
            # about a second: worth it only for a large burst (a full inbox at
            # start-up), and only for reading.
            pool = header_pool(threads_running=True)
        try:
            # With a pool every read is submitted at once, and the workers go
            # on reading while results are taken here, a chunk at a time.
            writeback = not self.once
            try:
                results = iter_read(unchanged, self.tags, pool, self._digest, writeback)
            except BrokenProcessPool as lost:  # a kept worker died while idle
                self.delivery.lose_workers(lost)
                pool = None
                results = iter_read(unchanged, self.tags, None, self._digest, writeback)
            for start in range(0, len(unchanged), READ_CHUNK):
                if self.stop.is_set():
                    return
                chunk = unchanged[start : start + READ_CHUNK]
                self._take_read(
                    chunk, list(itertools.islice(results, len(chunk))), now, retry_after
                )
        finally:
            if pool is not None and pool is not self.delivery.workers:
                pool.shutdown(cancel_futures=True)  # an idle daemon keeps no workers

    def _take_read(
        self,
        chunk: list[str],
        results: list[headers.Instance | NotRoutable | OSError],
        now: float,
        retry_after: float,
    ) -> None:
        read_at = self.clock()  # (`now` is the turn's start: the read came later)
        for path, result in zip(chunk, results, strict=True):
            if isinstance(result, NotRoutable):
                self.arrivals.failed(path, result.reason, now, retry_after)
            elif isinstance(result, FileNotFoundError) or (
                isinstance(result, OSError) and result.errno == errno.ENOENT
            ):
                self.arrivals.forget(path)
            elif isinstance(result, OSError):
                reason = f"cannot read: {result.strerror or result}"
                log.warning(kv("read_error", path=path, error=reason))
                self.arrivals.failed(path, reason, now, retry_after)
            else:
                candidate = self.arrivals.files.pop(path, None)
                arrived = read_at if candidate is None else candidate.arrived(read_at)
                study = self.studies.add(result, arrived)
                self._apply_saved_retry(study)

    def _apply_saved_retry(self, study: Study) -> None:
        saved = self.saved_retries.pop(study.uid, None)
        if saved is None:
            return
        study.attempts = int(saved.get("attempts", 0))  # type: ignore[call-overload]
        study.next_try = float(saved.get("next_try", 0))  # type: ignore[arg-type]
        study.last_error = str(saved.get("last_error", ""))
        study.parked_since = float(saved.get("parked_since", self.clock()))  # type: ignore[arg-type]
        log.info(
            kv(
                "retry_state_restored",
                study=study.uid,
                attempts=study.attempts,
                next_try_in=round(max(study.next_try - self.clock(), 0)),
            )
        )

    def _handle_unroutable(self, now: float) -> None:
        grace = self.config.settle_seconds if self.once else self.config.quarantine_after_seconds
        for path, reason in self.arrivals.to_quarantine(now, grace):
            if self.stop.is_set():
                return
            # Only writes that end (closing the file) are watched: one that
            # grew since it was last read is read again, not quarantined.
            if self._unchanged(path, now):
                self.quarantine(path, reason)

    def _unchanged(self, path: str, now: float) -> bool:
        """True when a waiting file still has the size and mtime last seen;
        otherwise it is seen anew (or forgotten, when gone)."""
        if path in self._fresh:
            return True
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self.arrivals.forget(path)
            return False
        candidate = self.arrivals.files[path]
        if (stat.st_size, stat.st_mtime) != (candidate.size, candidate.mtime):
            self.arrivals.observe(path, stat.st_size, stat.st_mtime, now)
            return False
        return True

    # -- rules --

    def _check_config_file(self) -> None:
        """Say once that the config file changed since the start: the rules
        are reloaded by themselves, the config (labs: included) only by a
        restart."""
        if self.config_file is None:
            return
        changed = _signature(self.config_file) != self._config_seen
        if changed and not self._config_said:
            log.warning(
                kv(
                    "config_changed",
                    path=self.config_file,
                    action="restart dicom-watcher to apply it (rule files apply by themselves)",
                )
            )
        self._config_said = changed

    def _reload_rules(self) -> bool:
        problems = self.rulebook.refresh()
        if problems is None:
            return False
        for problem in problems:
            log.error(kv("rule_problem", problem=str(problem)))
        ruleset = self.rulebook.ruleset
        for warning in ruleset.warnings:  # (a lab's folder the config does not name)
            log.warning(kv("rules_warning", warning=warning))
        log.info(
            kv(
                "rules_loaded",
                rules=",".join(r.name for r in ruleset.rules) or "(none)",
                problems=len(problems),
            )
        )
        if not ruleset.rules:
            log.warning(
                kv(
                    "no_rules",
                    rules=self.config.rules,
                    action="every study is kept in state/unmatched until a rule file appears",
                )
            )
        self.destinations.known(str(rule.destination) for rule in ruleset.rules)
        fields = tuple(sorted(set(headers.BASE_FIELDS) | ruleset.fields))
        self.tags = headers.tags_for(fields)
        self._digest = any(rule.manifest for rule in ruleset.rules)
        self.studies.fields = fields
        return True

    # -- placing --

    def _completion(self, study: Study) -> tuple[float, bool]:
        return completion(
            study, self.rulebook.ruleset, self.config.quiet_seconds, self.quiet_override
        )

    def _hook_changed(self, job: HookJob, record: dict[str, object]) -> None:
        """A hook job's new state, for its study's manifest (from any thread):
        the loop's own are sent at once, after those queued before them."""
        self._hook_changes.put((job, record))
        if threading.get_ident() == self._loop_thread:
            self._record_hook_changes()

    def _record_hook_changes(self) -> None:
        """The hook jobs' new states go into their studies' manifests, in order."""
        while True:
            try:
                job, record = self._hook_changes.get_nowait()
            except queue.Empty:
                return
            self.delivery.records.hook_changed(job, record)

    def _reread(self, study: Study) -> None:
        for pending in list(study.instances.values()):
            try:
                instance = headers.read_instance(pending.path, self.tags, self._digest)
            except (NotRoutable, OSError):
                continue
            self.studies.add(instance, study.last_arrival)

    # -- quarantine and unmatched --

    def quarantine(self, path: str, reason: str) -> None:
        day = time.strftime("%Y%m%d", time.gmtime(self.clock()))
        name = safe_component(os.path.basename(path))
        folder = self.quarantine_dir / day
        folder.mkdir(parents=True, exist_ok=True)
        try:
            placement = place(path, self.quarantine_dir, f"{day}/{name}", link=True)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
            atomic_write(
                placement.path.with_name(placement.path.name + ".reason.txt"),
                f"{reason}\nfrom: {path}\nat: {stamp}\n",
            )
            remove_source(path)
        except (OSError, DestinationUnavailable) as error:
            why = describe(error)
            first, longest = self.config.park_first_seconds, self.config.park_max_seconds
            now = self.clock()
            attempts, wait = self.arrivals.quarantine_failed(path, why, now, first, longest)
            line = kv(
                "quarantine_failed",
                path=path,
                error=why,
                attempts=attempts,
                next_try_in=round(wait),
            )
            # Said once; the retries (on the doubling schedule) only at debug level.
            log.log(logging.ERROR if attempts <= 1 else logging.DEBUG, line)
            return
        self.arrivals.forget(path)
        self.counts.quarantined += 1
        log.warning(kv("quarantined", path=path, reason=reason, kept_as=placement.path))

    def _reroute_unmatched(self) -> None:
        """Send the kept unmatched files that a rule matches now back into
        the inbox (`rerouted/<study>/`): they are placed as any study is, by
        the placers, with their manifest and hooks. The others stay kept."""
        ruleset = self.rulebook.ruleset
        if not ruleset.rules:
            return
        rerouted: Counter[str] = Counter()
        for folder in sorted(p for p in self.unmatched_dir.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                try:
                    instance = headers.read_instance(path, self.tags)
                except (NotRoutable, OSError):
                    continue
                if not ruleset.route(instance.values):
                    continue
                try:
                    # (unmatched/ and the inbox are local: nothing here can hang)
                    place(
                        str(path),
                        self.config.inbox,
                        f"{REROUTED}/{folder.name}/{path.name}",
                        link=True,
                    )
                    remove_source(str(path))
                except (OSError, DestinationUnavailable) as error:
                    log.warning(kv("unmatched_reroute_failed", path=path, error=describe(error)))
                    continue
                rerouted[folder.name] += 1
            if not any(folder.iterdir()):
                folder.rmdir()
        for study, files in rerouted.items():
            into = self.config.inbox / REROUTED / study
            log.info(kv("unmatched_rerouted", study=study, files=files, into=into))
        if rerouted:
            self._next_rescan = 0.0  # noticed at once, whatever the watcher saw

    # -- status --

    def _write_status(self) -> None:
        now = self.clock()
        studies = []
        for study in self.studies:
            if study.parked_since is not None:
                step = f"parked: next try in {max(study.next_try - now, 0):.0f} s"
            else:
                policy = study.policy
                quiet = (
                    policy.quiet
                    if isinstance(policy, Completion) and policy.quiet is not None
                    else self.config.quiet_seconds
                )
                left = max(quiet - (now - study.last_arrival), 0)
                step = f"complete in {left:.0f} s"
            policy = study.policy
            labs = (
                sorted({rule.lab_name for rule in policy.matched.values()})
                if isinstance(policy, Completion)
                else []
            )
            studies.append(
                {
                    "study": study.uid,
                    "patient": study.patient,
                    "labs": labs,
                    "parked_since": study.parked_since,
                    "files": len(study.instances),
                    "bytes": study.bytes,
                    "age_seconds": round(now - study.first_arrival, 1),
                    "quiet_seconds": round(now - study.last_arrival, 1),
                    "next": step,
                    "attempts": study.attempts,
                    "last_error": study.last_error,
                }
            )
        reasons = self._quarantine_reasons.count()
        status = {
            "pid": os.getpid(),
            "started": self.started,
            "updated": now,
            "inbox": str(self.config.inbox),
            "files_arriving": len(self.arrivals),
            "studies": studies,
            "quarantine_files": sum(reasons.values()),
            "quarantine_reasons": reasons,
            "quarantine_failed": [
                {
                    "path": path,
                    "reason": candidate.reason,
                    "error": candidate.quarantine_error,
                    "attempts": candidate.quarantine_attempts,
                    "next_try_in": round(max(candidate.next_quarantine - now, 0)),
                }
                for path, candidate in self.arrivals.files.items()
                if candidate.quarantine_attempts
            ],
            "unmatched_files": _count_files(self.unmatched_dir),
            "placed_files": self.counts.placed_files,
            "placed_studies": self.counts.placed_studies,
            "last_placement": self.counts.last_placement,
            "labs": {name: counts.as_status() for name, counts in sorted(self.counts.labs.items())},
            "destinations": self.destinations.snapshot(),
            #: Calls on destinations (placements, manifests) not answered yet.
            "destination_calls": self.delivery.calls(),
            "hooks": {
                "operator": {
                    "waiting": len(self.hooks.waiting),
                    "running": len(self.hooks.running),
                    "failed": _count_files(self.hook_store.failed_folder)
                    - sum(self.lab_jobs.gave_up.values()),
                },
                "labs": self.lab_jobs.summary(now),
            },
        }
        try:
            atomic_write(self.state / "status.json", json.dumps(status, indent=1))
        except OSError as error:
            log.warning(kv("status_write_failed", error=error.strerror or error))
        if self.config.metrics_file is not None:
            try:
                atomic_write(self.config.metrics_file, metrics.render(status, now).decode())
            except OSError as error:
                if not self._metrics_failed:  # said once, not every 2 s
                    log.warning(kv("metrics_write_failed", error=error.strerror or error))
                self._metrics_failed = True
            else:
                if self._metrics_failed:
                    log.info(kv("metrics_written_again", path=self.config.metrics_file))
                self._metrics_failed = False


class QuarantineReasons:
    """The quarantined files' reasons (the first line of each reason file,
    one per quarantined file), each file read once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.known: dict[str, str] = {}

    def count(self) -> dict[str, int]:
        seen: dict[str, str] = {}
        for directory, _, files in os.walk(self.folder):
            for name in files:
                if not name.endswith(".reason.txt") or name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(directory, name)
                reason = self.known.get(path)
                if reason is None:
                    try:
                        with open(path, encoding="utf-8", errors="replace") as handle:
                            reason = handle.readline(500).strip() or "(no reason given)"
                    except OSError:
                        reason = "(its reason file cannot be read)"
                seen[path] = reason
        self.known = seen
        return dict(Counter(seen.values()).most_common())


def _count_files(folder: Path, suffix: str = "") -> int:
    total = 0
    for _, _, files in os.walk(folder):
        total += sum(
            1 for name in files if name.endswith(suffix) and not name.startswith(TEMP_PREFIX)
        )
    return total


def _signature(path: Path | None) -> tuple[int, int, int, int] | None:
    """A file's inode, size and change times (a write or a replacement
    changes them; nothing is read), or None if it cannot be looked at."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
