"""The manifests of placed studies, and the hook states recorded in them.

Both are written in their destination's placer (`watcher.placing`), never
in the loop. A manifest cut off by a hung destination is written when it
answers again, and one whose folder a lab keeps locked on a doubling
schedule; a hook state that cannot be written now is tried again at the
next hook sync, up to `HOOK_RECORD_TRIES` times (the waits of a hung
destination not counted).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from watcher.bookkeeping import Journal, RulePlacement, describe
from watcher.errors import DestinationHung
from watcher.hooks import HookJob
from watcher.logs import kv
from watcher.manifest import ManifestRefused, manifest_path
from watcher.placers import CutOff
from watcher.placing import Immediate, PlacerPool, update_hooks_in, write_manifest_in
from watcher.rules import RuleBook
from watcher.studies import Study

log = logging.getLogger(__name__)

#: How many hook syncs a hook state waits for its manifest before it is dropped.
HOOK_RECORD_TRIES = 60
#: A manifest whose folder a lab keeps locked is tried again after 1 s, then
#: after twice as long each time up to a minute, for at most an hour.
LOCKED_FIRST_SECONDS = 1.0
LOCKED_LONGEST_SECONDS = 60.0
LOCKED_MANIFEST_SECONDS = 3600.0


@dataclass
class _Locked:
    """A manifest not written because its folder was locked, and its schedule."""

    study: Study
    progress: RulePlacement
    since: float
    wait: float = LOCKED_FIRST_SECONDS
    next_try: float = 0.0


class Records:
    """Writes manifests and hook states into the lab trees, by their placers."""

    def __init__(
        self,
        work: PlacerPool | Immediate,
        rulebook: RuleBook,
        clock: Callable[[], float],
        journal: Callable[[], Journal],
    ) -> None:
        self.work = work
        #: The journal a manifest written now is journaled in.
        self.journal = journal
        self.rulebook = rulebook
        self.clock = clock
        #: Hook states not written into their manifests yet, with the tries so far.
        self._hook_backlog: dict[tuple[str, str], tuple[HookJob, dict[str, object], int]] = {}
        #: Each job's newest state not written yet: an older one still on its
        #: way to a placer is dropped when it fails, never tried again after it.
        self._newest: dict[tuple[str, str], dict[str, object]] = {}
        #: Manifests cut off by a hung destination, per destination: written
        #: when it answers again.
        self._manifest_backlog: dict[str, list[tuple[Study, RulePlacement]]] = {}
        #: Manifests whose folder a lab held locked, on their schedules.
        self._locked: list[_Locked] = []

    def resume(self, destination: str) -> None:
        """A hung destination answers again: the manifests cut off are written."""
        for study, progress in self._manifest_backlog.pop(destination, []):
            self.write_manifest(study, progress, self.journal())

    def hook_changed(self, job: HookJob, record: dict[str, object]) -> None:
        """A hook job's new state goes into its study's manifest (in the
        destination's placer); one that cannot be written now is tried again
        at the next hook sync, unless a newer state of the job supersedes it."""
        if not job.manifest:
            return
        self._newest[(job.lab, job.id)] = record
        self._hook_backlog.pop((job.lab, job.id), None)
        self._record_hook(job, record, 0, quiet=False)

    def retry(self) -> None:
        """At a hook sync: the hook states and the locked manifests due again."""
        now = self.clock()
        for locked in [item for item in self._locked if now >= item.next_try]:
            self._locked.remove(locked)
            self.write_manifest(locked.study, locked.progress, self.journal(), locked=locked)
        for key, (job, record, tries) in list(self._hook_backlog.items()):
            del self._hook_backlog[key]
            if tries + 1 >= HOOK_RECORD_TRIES:
                self._newest.pop(key, None)
                log.error(
                    kv("hook_state_dropped", hook=job.label, study=job.study, state=record["state"])
                )
            else:
                self._record_hook(job, record, tries + 1, quiet=True)

    def _record_hook(
        self, job: HookJob, record: dict[str, object], tries: int, quiet: bool
    ) -> None:
        """Write `record` into the job's manifest."""
        rule = next((r for r in self.rulebook.ruleset.rules if r.name == job.rule), None)
        if rule is None:
            self._newest.pop((job.lab, job.id), None)
            log.warning(
                kv("hook_state_unrecorded", hook=job.label, study=job.study, reason="rule gone")
            )
            return
        then = partial(self._hook_recorded, job, record, tries, quiet)
        self.work.submit(
            str(rule.destination), then, update_hooks_in, Path(job.manifest), rule, [record]
        )

    def _hook_recorded(
        self, job: HookJob, record: dict[str, object], tries: int, quiet: bool, value: Any
    ) -> None:
        key = (job.lab, job.id)
        if self._newest.get(key) is not record:
            return  # a newer state was sent after it, and is written (or kept) alone
        if not isinstance(value, BaseException) or isinstance(value, ValueError):
            del self._newest[key]  # written, or never will be
        if isinstance(value, ValueError):  # the rule's destination moved since the job was made
            log.warning(kv("hook_state_unrecorded", hook=job.label, study=job.study, error=value))
        elif isinstance(value, BaseException):
            if not quiet:
                log.warning(
                    kv(
                        "hook_state_unrecorded",
                        hook=job.label,
                        study=job.study,
                        error=value,
                        action="tried again",
                    )
                )
            # A hung destination's wait does not count against the tries.
            tries = tries - 1 if isinstance(value, DestinationHung) else tries
            self._hook_backlog[key] = (job, record, max(tries, 0))

    def write_manifest(
        self,
        study: Study,
        progress: RulePlacement,
        journal: Journal,
        then: Callable[[Path | None], None] | None = None,
        locked: _Locked | None = None,
    ) -> None:
        """Write (or bring up to date) the study's manifest for one rule with
        what it placed, in its destination's placer; `then` gets its path, or
        None when it could not be written. `locked`: a retry's schedule."""
        rule = progress.route.rule
        manifest = manifest_path(rule, progress.route.relative_path, study.uid)
        try:
            # Journaled like a placement: the temporary manifest of a write
            # that a crash interrupts is removed at the next start.
            journal.add({rule.folder(manifest.parent)})
        except OSError as error:
            self._manifest_written(study, progress, manifest, then, locked, error)
            return
        answer = partial(self._manifest_written, study, progress, manifest, then, locked)
        self.work.submit(
            str(rule.destination),
            answer,
            write_manifest_in,
            manifest,
            study.uid,
            rule,
            study.patient,
            list(progress.entries),
            self.clock(),
        )

    def _manifest_written(
        self,
        study: Study,
        progress: RulePlacement,
        manifest: Path,
        then: Callable[[Path | None], None] | None,
        locked: _Locked | None,
        value: Any,
    ) -> None:
        rule = progress.route.rule
        if isinstance(value, BaseException):
            if _is_lock(value) and self._again_when_unlocked(study, progress, locked):
                if then is not None:
                    then(None)
                return
            log.error(
                kv(
                    "manifest_failed",
                    lab=rule.lab_name,
                    study=study.uid,
                    path=manifest,
                    error=describe(value),
                )
            )
            if isinstance(value, (DestinationHung, CutOff)):
                # Written when the destination answers again (or at the next start).
                self._manifest_backlog.setdefault(str(rule.destination), []).append(
                    (study, progress)
                )
            if then is not None:
                then(None)
            return
        log.info(
            kv(
                "manifest_written",
                lab=rule.lab_name,
                study=study.uid,
                files=value["files"],
                path=manifest,
            )
        )
        if then is not None:
            then(manifest)

    def _again_when_unlocked(
        self, study: Study, progress: RulePlacement, locked: _Locked | None
    ) -> bool:
        """Schedule a manifest its lab keeps locked; False (said once, as a
        failure) at the first refusal, and when its hour is up."""
        now = self.clock()
        first = locked is None
        if locked is None:
            locked = _Locked(study, progress, now)
        else:
            locked.wait = min(locked.wait * 2, LOCKED_LONGEST_SECONDS)
        if now - locked.since >= LOCKED_MANIFEST_SECONDS:
            return False
        locked.next_try = now + locked.wait
        self._locked.append(locked)
        return not first


def _is_lock(error: BaseException) -> bool:
    """A manifest refused because a lab holds its folder's lock."""
    return isinstance(error, ManifestRefused) and error.errno == errno.EWOULDBLOCK
