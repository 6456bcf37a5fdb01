"""Delivery of the studies that are due: the daemon's placements and their accounts.

`Delivery` routes a study, splits its batches by destination and hands each
part to that destination's placer (`watcher.placing`); it takes the answers
in later turns of the loop, a batch at a time, into the study's bookkeeping
(`watcher.bookkeeping`), then writes the study's manifests, queues its hooks,
or parks it. No call here touches a destination: the loop (`watcher.daemon`)
stays free whatever a share does. `run --once` places in this process (or
its workers) instead, a study after another (`place_studies`).

One journal (`state/placing.json`) covers a round of placements, from the
first begun until none is left in flight: it names the folders written
into, so that temporary files a crash leaves are removed at the next start.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from watcher import headers
from watcher.bookkeeping import (
    Batch,
    Counts,
    Journal,
    PlaceOutcomes,
    RulePlacement,
    StudyPlacement,
    clean_folders,
    describe,
    plan_folders,
    read_journal,
    write_journal,
)
from watcher.config import Config
from watcher.destinations import Destinations
from watcher.engine import BATCH, RetryPolicy, flush_folders, remove_source
from watcher.errors import DestinationUnavailable
from watcher.hooks import DaemonStore, HookRunner, hook_values, make_job
from watcher.labjobs import Dispatch
from watcher.logs import kv
from watcher.placement import Folder, Placement, place
from watcher.placing import Immediate, PlacerPool, place_part
from watcher.records import Records
from watcher.rules import Route, RuleBook
from watcher.state import atomic_write, trusted
from watcher.stopping import StopRequest
from watcher.studies import Studies, Study
from watcher.template import safe_component

log = logging.getLogger(__name__)

#: On the way out, how long the manifests of studies placed in part may take.
STOP_MANIFEST_SECONDS = 5.0
#: How often the placers are polled while the daemon waits for them to finish.
DRAIN_SECONDS = 0.02
#: Parts of batches handed to one destination's placer at a time.
PLACER_DEPTH = 2


class NotSent(Exception):
    """A part of a batch that a SIGTERM kept from being handed over."""


def _place_moving(batch: Batch, retry: RetryPolicy) -> PlaceOutcomes:
    """Place a batch of a study and remove its sources (in a worker, or not);
    their folders are flushed once for the study, when it ends."""
    return place_part(batch, True, retry)


@dataclass
class Hooks:
    """Where a placed study's hooks go: the operator's rules' to the
    daemon's runner, the labs' rules' to their labs' runners."""

    store: DaemonStore
    runner: HookRunner
    labs: Dispatch


class Delivery:
    """The daemon's placements of due studies, from routing to manifest."""

    def __init__(
        self,
        config: Config,
        *,
        rulebook: RuleBook,
        studies: Studies,
        destinations: Destinations,
        work: PlacerPool | Immediate,
        hooks: Hooks,
        counts: Counts,
        reread: Callable[[Study], None],
        stop: StopRequest,
        clock: Callable[[], float],
        once: bool,
    ) -> None:
        self.config = config
        self.rulebook = rulebook
        self.studies = studies
        self.destinations = destinations
        #: Where calls that touch a destination run: in its placer (the
        #: daemon), or here and at once (`run --once`).
        self.work = work
        self.hook_store, self.hooks, self.lab_jobs = hooks.store, hooks.runner, hooks.labs
        self.counts = counts
        #: Reads a study's files again when the rules need more fields.
        self.reread = reread
        self.stop = stop
        self.clock = clock
        self.once = once
        self.retry = RetryPolicy(
            attempts=config.retry_attempts, max_seconds=config.retry_max_seconds
        )
        self.journal = config.state / "placing.json"
        self.unmatched_dir = config.state / "unmatched"
        self.retry_dir = config.state / "retry"
        #: `run --once`: worker processes forked at its first large burst,
        #: which read headers and place batches until it ends.
        self.workers: Executor | None = None
        #: The studies being placed, by UID, and the journal of this round of
        #: placements (from the first begun until none is left).
        self.in_flight: dict[str, StudyPlacement] = {}
        self._round: Journal | None = None
        self._round_failed = False
        #: Per destination, the parts of batches not handed to its placer yet.
        self._queued: dict[str, collections.deque[tuple[Callable[[Any], None], Batch, bool]]] = {}
        self._pumping = False
        #: The folders with temporary files a cleaning could not remove, as last told.
        self._left_told: set[Folder] = set()
        #: The studies' manifests, and the hook states recorded in them.
        self.records = Records(work, rulebook, clock, lambda: self._round or Journal(self.journal))

    def calls(self) -> int:
        """Calls on destinations (placements, manifests) not answered yet."""
        return self.work.busy() + sum(map(len, self._queued.values()))

    # -- crash cleanup --

    def clean_interrupted(self) -> None:
        """Remove the temporary files left in the journaled folders (each
        destination's in its placer), and keep in the journal only the
        folders where some stay or that cannot be reached now."""
        distrust = trusted(self.journal)
        if self.journal.exists() and distrust is not None:
            log.error(kv("journal_refused", path=self.journal, reason=distrust))
            return
        try:
            folders = read_journal(self.journal)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(kv("journal_unreadable", path=self.journal, error=error))
            folders = set()
        by_root: dict[str, set[Folder]] = {}
        for folder in folders:
            by_root.setdefault(str(folder.root), set()).add(folder)
        tally = _Cleaning(folders, len(by_root))
        if not by_root:
            self._cleaned(tally)
        for root, group in by_root.items():
            self.work.submit(root, partial(self._cleaned, tally, group), clean_folders, group)

    def _cleaned(
        self, tally: _Cleaning, group: set[Folder] | None = None, value: Any = None
    ) -> None:
        """One destination's folders are cleaned (or could not be): when all
        are, say so and write what is left into the journal."""
        if group is not None and isinstance(value, BaseException):
            tally.left |= group  # hung, or its placer died: tried again later
        elif group is not None:
            tally.removed += value[0]
            tally.left |= value[1]
        tally.waiting -= 1
        if tally.waiting > 0:
            return
        left = tally.left
        # Said when something was removed, or when what is left changes (not
        # again at every retry of a study parked on a read-only share).
        if tally.removed or (left and left != self._left_told):
            self._left_told = left
            log.info(
                kv(
                    "cleaned_interrupted_placement",
                    folders=len(tally.folders),
                    temporary_files=tally.removed,
                    folders_left=len(left),
                )
            )
        if self._round is not None:  # placements begun meanwhile keep theirs
            self._round.folders -= tally.folders - left
            kept = self._round.folders
        else:
            kept = left
        if kept:  # a read-only share: kept, and tried again before the next placement
            write_journal(self.journal, kept)
        else:
            self.journal.unlink(missing_ok=True)

    def place_studies(self, due: list[tuple[Study, str]]) -> None:
        """Place the studies that are due, one after another; in the workers
        of `run --once` side by side, the next study's batches begun while
        those of the one before are taken and its manifest written.

        Results are taken in order, and no batch is begun after SIGTERM, nor
        for a study after one of its batches failed; every batch begun is
        taken, since its files may have moved. One journal covers them all:
        when a batch cannot be prepared (its journal or its unmatched files
        not written: the state folder's disk full), no other batch is begun,
        and the error is raised once the batches begun are taken and their
        studies finished; what is not placed of its study stays pending.
        """
        self.clean_interrupted()  # what a failed attempt could not remove
        journal = Journal(self.journal)
        in_flight: collections.deque[tuple[StudyPlacement, Batch, Future[PlaceOutcomes] | None]]
        in_flight = collections.deque()
        placings: list[StudyPlacement] = []
        unjournaled: OSError | None = None

        def queued() -> Iterator[tuple[StudyPlacement, Batch]]:
            nonlocal unjournaled
            for study, why in due:
                if self.stop.is_set():
                    return
                placing = self._prepare_placement(study, why)
                placings.append(placing)
                try:
                    # Routed and journaled a batch at a time: the first is
                    # begun at once, the next routed while the workers place.
                    for batch in self._route_batches(placing, journal):
                        if self.stop.is_set() or placing.error is not None:
                            break
                        yield placing, batch
                except OSError as error:  # the state folder: no other batch is begun
                    unjournaled = error
                    return
                if not placing.begun:  # all of it kept unmatched
                    self._end_placement(placing, journal)

        def start(placing: StudyPlacement, batch: Batch) -> None:
            placing.begun += 1
            future: Future[PlaceOutcomes] | None = None
            if self.workers is not None:
                try:
                    future = self.workers.submit(_place_moving, batch, self.retry)
                except BrokenProcessPool as lost:  # a worker died while idle
                    future = Future()
                    future.set_exception(lost)
            in_flight.append((placing, batch, future))

        batches = queued()
        ahead: tuple[StudyPlacement, Batch] | None = None

        def following() -> tuple[StudyPlacement, Batch] | None:
            nonlocal ahead
            item, ahead = ahead, None
            if item is None or item[0].error is not None or self.stop.is_set():
                item = next(batches, None)  # the queue looks at both again
            return item

        def width() -> int:
            # One batch a worker, and one more handed over while they work (so
            # that no worker waits for the next); a SIGTERM waits for those alone.
            return (os.cpu_count() or 1) + 1 if self.workers is not None else 1

        while len(in_flight) < width() and (item := following()) is not None:
            start(*item)
        while in_flight:
            if ahead is None and self.workers is not None:
                # While the workers place, route the next study (or take the
                # next batch), to begin it as soon as a worker is free.
                ahead = next(batches, None)
            placing, batch, future = in_flight.popleft()
            outcomes = self._outcomes(batch, future)
            error = self._take_placed(placing, batch, outcomes)
            placing.error = placing.error or error
            placing.taken += 1
            if len(in_flight) < width() and (item := following()) is not None:
                start(*item)
            if placing.taken == placing.begun and (ahead is None or ahead[0] is not placing):
                self._end_placement(placing, journal)  # none in flight, none to come
        for placing in placings:  # stopped before its batches were taken
            if not placing.ended:
                self._end_placement(placing, journal)
        # After a failure the journal stays: temporary files that could not
        # be removed (a read-only share) are removed before the next
        # placement, or at the next start after a crash.
        if all(placing.error is None for placing in placings):
            self._close_journal(journal)
        if unjournaled is not None:
            raise unjournaled

    def begin(self, study: Study, why: str) -> None:
        """The daemon: route a study and hand its batches to the placers of
        their destinations; the answers are taken in later turns."""
        if self._round is None:
            self._round, self._round_failed = Journal(self.journal), False
            self.clean_interrupted()  # what a failed round could not remove
        placing = self._prepare_placement(study, why)
        self.in_flight[study.uid] = placing
        try:
            batches = list(self._route_batches(placing, self._round))
        except OSError as error:  # the state folder: the study waits, the loop goes on
            log.error(kv("journal_failed", study=study.uid, error=describe(error)))
            placing.error = f"cannot journal its placement: {describe(error)}"
            batches = []
        for batch in batches:
            self._send(placing, batch)
        if not placing.begun:
            self._end_placement(placing, self._round)

    def _send(self, placing: StudyPlacement, batch: Batch) -> None:
        """Hand one batch to the placers: each destination gets the copies it
        takes. An instance that goes to one destination is moved there; one
        that goes to several is copied into each, and its source removed
        here once every copy is durable (a hung share keeps only its own)."""
        parts: dict[tuple[str, bool], list[int]] = {}
        keys = []
        for index, (_, routes) in enumerate(batch):
            destinations = list(dict.fromkeys(str(r.rule.destination) for r in routes))
            keys.append(destinations)
            for destination in destinations:
                parts.setdefault((destination, len(destinations) == 1), []).append(index)
        sent = _Sent(batch, keys, [{} for _ in batch], len(parts))
        placing.begun += 1
        for (destination, move), indexes in parts.items():
            items = [
                (batch[i][0], [r for r in batch[i][1] if str(r.rule.destination) == destination])
                for i in indexes
            ]
            then = partial(self._part_placed, placing, sent, destination, indexes)
            self._queued.setdefault(destination, collections.deque()).append((then, items, move))
        self.pump()

    def pump(self) -> None:
        """Hand the queued parts to their placers, PLACER_DEPTH at a time per
        destination (one placed, one waiting, so that a placer never idles
        and a SIGTERM waits for little). After SIGTERM none is handed over:
        their files stay in the inbox, and their studies pending."""
        if self._pumping:  # (a part answered at once, from within)
            return
        self._pumping = True
        try:
            for destination, queued in list(self._queued.items()):
                while queued and (self.stop.is_set() or self.work.busy(destination) < PLACER_DEPTH):
                    then, items, move = queued.popleft()
                    if self.stop.is_set():
                        then(NotSent())
                    else:
                        self.work.submit(destination, then, place_part, items, move, self.retry)
                if not queued:
                    self._queued.pop(destination, None)
        finally:
            self._pumping = False

    def _part_placed(
        self,
        placing: StudyPlacement,
        sent: _Sent,
        destination: str,
        indexes: list[int],
        value: list[list[Placement] | BaseException] | BaseException,
    ) -> None:
        """A destination's part of a batch is answered; once all of them are,
        the batch is taken as one."""
        results = [value] * len(indexes) if isinstance(value, BaseException) else value
        for index, result in zip(indexes, results, strict=True):
            sent.pieces[index][destination] = result
        sent.waiting -= 1
        if sent.waiting:
            return
        outcomes = [
            _joined(instance, routes, sent.keys[i], sent.pieces[i])
            for i, (instance, routes) in enumerate(sent.batch)
        ]
        error = self._take_placed(placing, sent.batch, outcomes)
        placing.error = placing.error or error
        placing.taken += 1
        if placing.taken == placing.begun:
            assert self._round is not None
            self._end_placement(placing, self._round)
        self.pump()

    def resume(self, destination: str, now: float) -> None:
        """A hung destination answers again: the studies parked on it are due."""
        mark = f"destination {destination} hung"
        for study in self.studies:
            if study.parked_since is not None and mark in study.last_error:
                study.next_try = now
        self.records.resume(destination)

    def close_round(self) -> None:
        """No placement in flight and no answer awaited: this round's journal
        is closed (dropped, after placements that all went well)."""
        if self._round is None or self.in_flight or self._queued or self.work.busy():
            return
        journal, self._round = self._round, None
        if not self._round_failed:
            self._close_journal(journal)

    def finish(self) -> None:
        """On the way out: the placements in flight are waited for, at most
        `destination_timeout_seconds`, then what is placed in part gets its
        manifest; a placer still busy after that is abandoned (its studies
        stay in the inbox, parked), never waited for."""
        deadline = time.monotonic() + self.config.destination_timeout_seconds
        self.pump()  # (the stop flag is set: what is queued is not handed over)
        self._drain(deadline)
        self.close_round()
        self._record_placed_in_part()
        self._drain(min(deadline, time.monotonic() + STOP_MANIFEST_SECONDS))
        self.work.abandon_all()

    def _drain(self, deadline: float) -> None:
        while self.work.busy() and time.monotonic() < deadline:
            for destination in self.work.poll():
                self.resume(destination, self.clock())
            self.pump()
            time.sleep(DRAIN_SECONDS)

    def _prepare_placement(self, study: Study, why: str) -> StudyPlacement:
        """Begin placing a study: read again what the rules' fields need, and
        say why it is placed when it is not simply quiet."""
        placing = StudyPlacement(study, time.monotonic())
        if study.fields != self.studies.fields:
            self.reread(study)
        if why == "max_age":
            log.warning(
                kv(
                    "study_forced",
                    study=study.uid,
                    files=len(study.instances),
                    reason=f"still receiving after {self.config.max_study_age_seconds:.0f} s",
                )
            )
        elif why == "expected_count":
            log.info(kv("study_complete_by_count", study=study.uid, files=len(study.instances)))
        return placing

    def _route_batches(self, placing: StudyPlacement, journal: Journal) -> Iterator[Batch]:
        """A study's instances with their routes, a batch at a time: the
        folders each batch writes into journaled before it is given out, and
        the instances no rule matches kept in `unmatched/`. Raises `OSError`
        when the journal or an unmatched file cannot be written."""
        study = placing.study
        route = self.rulebook.ruleset.route
        pending = list(study.instances.values())
        for start in range(0, len(pending), BATCH):
            instances = map(study.instance, pending[start : start + BATCH])
            plan = [(instance, route(instance.values)) for instance in instances]
            journal.add(plan_folders(plan, study.uid))
            matched = []
            for instance, routes in plan:
                if routes:
                    matched.append((instance, routes))
                    continue
                kept_back = self._keep_unmatched(instance.path, study.uid)
                if kept_back is not None:  # it stays, and the study waits for it
                    placing.kept_back = placing.kept_back or kept_back
                    continue
                placing.unmatched += 1
                self.studies.remove_path(instance.path)
            if matched:
                yield matched

    def _outcomes(self, batch: Batch, future: Future[PlaceOutcomes] | None) -> PlaceOutcomes:
        """A batch's outcomes: placed here, or taken from its worker."""
        if future is None:
            return _place_moving(batch, self.retry)
        try:
            return future.result()
        except BrokenProcessPool as lost:  # a worker died: go on without them
            self.lose_workers(lost)
            return [lost] * len(batch)

    def _end_placement(self, placing: StudyPlacement, journal: Journal) -> None:
        """A study has no batch left to take: log what was kept unmatched,
        park it after an error, or finish it when all of it is placed."""
        placing.ended = True
        study = placing.study
        self.in_flight.pop(study.uid, None)
        try:
            # The removal of its placed files made durable (once, for all of
            # its batches) before the study is reported placed.
            flush_folders(placing.moved_from)
        except OSError as error:
            log.error(kv("inbox_flush_failed", study=study.uid, error=describe(error)))
        if placing.unmatched:
            self.counts.unmatched += placing.unmatched
            log.warning(
                kv(
                    "study_unmatched",
                    study=study.uid,
                    patient=study.patient,
                    files=placing.unmatched,
                    kept_in=self.unmatched_dir / safe_component(study.uid),
                )
            )
        why = placing.error or placing.kept_back
        if why is not None:
            self._park(study, why)
        elif not study.instances:
            for progress in study.progress.values():
                self._finish_rule(study, progress, journal)
            self._placed(study)

    def lose_workers(self, lost: BrokenProcessPool) -> None:
        """The kept workers' pool broke (a worker was killed): log it once and
        go on without workers."""
        if self.workers is not None:
            log.error(kv("workers_lost", error=lost))
            self.workers.shutdown(wait=False, cancel_futures=True)
            self.workers = None

    def _take_placed(
        self, placing: StudyPlacement, batch: Batch, outcomes: PlaceOutcomes
    ) -> str | None:
        """Account for one placed batch; return the first error, described."""
        study, started = placing.study, placing.started
        error = None
        for (instance, routes), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, NotSent):
                continue  # stopped before it was handed over: still pending
            if isinstance(outcome, FileNotFoundError) and not os.path.exists(instance.path):
                # Removed by someone else (the copies of a placement cut off
                # after the removal are found by the placement).
                log.warning(kv("source_vanished", path=instance.path))
                self.studies.remove_path(instance.path)
                continue
            if isinstance(outcome, DestinationUnavailable):
                self.destinations.unavailable(outcome.destination, outcome.reason)
            if isinstance(outcome, BaseException) and self._round is not None:
                self._round_failed = True
            if isinstance(outcome, BaseException):
                error = error or describe(outcome)
                continue
            for route in routes:
                self.destinations.healthy(str(route.rule.destination))
            self.studies.remove_path(instance.path)
            placing.moved_from.add(os.path.dirname(instance.path) or ".")
            for route, placement in zip(routes, outcome, strict=True):
                progress = study.progress.get(route.rule.name)
                if progress is None:
                    progress = RulePlacement(route, started)
                    study.progress[route.rule.name] = progress
                progress.add(placement, instance)
        return error

    def _finish_rule(self, study: Study, progress: RulePlacement, journal: Journal) -> None:
        """A study (or a late addition to it) is placed for one rule: its
        manifest, its summary line, its hooks."""
        rule = progress.route.rule
        seconds = time.monotonic() - progress.started
        now = self.clock()
        self.counts.placed_files += progress.files
        record = {
            "study": study.uid,
            "patient": study.patient,
            "rule": rule.name,
            "files": progress.files,
            "new": progress.placed,
            "bytes": progress.bytes,
            "seconds": round(seconds, 2),
            "time": now,
            "destination": str(progress.folder),
        }
        self.counts.last_placement = {"lab": rule.lab_name, **record}
        self.counts.placed(rule.lab_name, record, max(now - study.last_arrival, 0.0))
        # The summary line comes last, so that a study logged as placed has
        # its manifest written as well.
        announce = partial(self._announce, study, progress, seconds)
        if rule.manifest:
            self.records.write_manifest(study, progress, journal, announce)
        else:
            announce(None)

    def _announce(
        self, study: Study, progress: RulePlacement, seconds: float, manifest: Path | None
    ) -> None:
        """A study is placed for a rule, its manifest written (or not): its
        summary line, and its hooks queued."""
        rule = progress.route.rule
        log.info(
            kv(
                "study_placed",
                lab=rule.lab_name,
                rule=rule.name,
                patient=study.patient,
                study=study.uid,
                files=progress.files,
                new=progress.placed,
                bytes=progress.bytes,
                seconds=f"{seconds:.2f}",
                destination=progress.folder,
            )
        )
        if rule.hooks:
            values = hook_values(
                study_folder=progress.folder,
                lab=rule.lab_name,
                rule=rule.name,
                patient=study.patient,
                study_uid=study.uid,
                files=progress.files,
                manifest=manifest,
                destination=rule.destination,
            )
            for hook in rule.hooks:
                job = make_job(hook, values, cwd=progress.folder, now=self.clock())
                try:
                    if rule.tenant:
                        self.lab_jobs.post(job)
                    else:
                        self.hook_store.submit(job)
                        self.hooks.add(job)
                except OSError as error:
                    log.error(
                        kv(
                            "hook_not_queued",
                            hook=job.label,
                            lab=job.lab,
                            study=study.uid,
                            error=error,
                        )
                    )

    def _record_placed_in_part(self) -> None:
        """On the way out: a study placed in part (stopped mid-way, or parked
        after some of its files) gets its manifest for what is placed, so that
        the rest, placed after a restart, is added to it rather than listed alone."""
        journal = Journal(self.journal)
        for study in self.studies:
            for progress in study.progress.values():
                if progress.entries:
                    self.records.write_manifest(study, progress, journal)
        if self.once:
            self._close_journal(journal)

    def _close_journal(self, journal: Journal) -> None:
        """After placements that went well: drop the journal, or clean the
        folders it inherited from a failed one (and keep what still stays)."""
        if not journal.folders:
            return  # nothing written: an inherited journal stays as it is
        if journal.inherited:
            self.clean_interrupted()
        else:
            self.journal.unlink(missing_ok=True)

    def _placed(self, study: Study) -> None:
        self.counts.placed_studies += 1
        if study.parked_since is not None:
            log.warning(
                kv(
                    "study_resumed",
                    study=study.uid,
                    attempts=study.attempts,
                    parked_seconds=round(self.clock() - study.parked_since),
                )
            )
        (self.retry_dir / f"{safe_component(study.uid)}.json").unlink(missing_ok=True)

    def _park(self, study: Study, error: str) -> None:
        now = self.clock()
        changed = Studies.park(
            study, error, now, self.config.park_first_seconds, self.config.park_max_seconds
        )
        record = {
            "study": study.uid,
            "attempts": study.attempts,
            "next_try": study.next_try,
            "last_error": error,
            "parked_since": study.parked_since,
            "files": len(study.instances),
        }
        atomic_write(self.retry_dir / f"{safe_component(study.uid)}.json", json.dumps(record))
        if changed:
            log.warning(
                kv(
                    "study_parked",
                    study=study.uid,
                    patient=study.patient,
                    files=len(study.instances),
                    error=error,
                    next_try_in=round(study.next_try - now),
                )
            )
        else:
            log.debug(kv("study_retry_failed", study=study.uid, attempts=study.attempts))

    def _keep_unmatched(self, path: str, study_uid: str) -> str | None:
        """Keep a file no rule matches in `unmatched/`, and remove it from the
        inbox; return why it stays there when it cannot be removed (an inbox
        the daemon may not write in). Raises `OSError` when it cannot be kept."""
        relative = f"{safe_component(study_uid)}/{safe_component(os.path.basename(path))}"
        place(path, self.unmatched_dir, relative, link=True)
        try:
            remove_source(path)
        except FileNotFoundError:  # gone meanwhile (or its folder): it is kept
            pass
        except OSError as error:
            return f"kept in unmatched, but cannot be removed: {describe(error)}"
        return None


@dataclass
class _Sent:
    """A batch handed to the placers: per instance its destinations and the
    answers each gave, and how many destinations' parts are unanswered."""

    batch: Batch
    keys: list[list[str]]
    pieces: list[dict[str, list[Placement] | BaseException]]
    waiting: int


@dataclass
class _Cleaning:
    """Journaled folders being cleaned, a destination at a time."""

    folders: set[Folder]
    waiting: int
    removed: int = 0
    left: set[Folder] = field(default_factory=set)


def _joined(
    instance: headers.Instance,
    routes: list[Route],
    destinations: list[str],
    pieces: dict[str, list[Placement] | BaseException],
) -> list[Placement] | BaseException:
    """One instance's outcome from its destinations' answers: its placements
    in the order of its routes, or the first error. An instance copied into
    several destinations has its source removed here, once all are durable."""
    if len(destinations) == 1:
        return pieces[destinations[0]]
    for destination in destinations:
        if isinstance(pieces[destination], BaseException):
            return pieces[destination]
    placed = {d: iter(p) for d, p in pieces.items() if not isinstance(p, BaseException)}
    outcome = [next(placed[str(route.rule.destination)]) for route in routes]
    try:
        os.unlink(instance.path)
    except FileNotFoundError:
        pass
    except OSError as error:  # (an inbox it may not write): the source stays
        why = f"placed, but cannot be removed: {error.strerror}"
        return OSError(error.errno, why, instance.path)
    return outcome
