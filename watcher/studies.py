"""Pure bookkeeping of the daemon: when a file is ready, when a study is complete.

No I/O and no clock: every method takes `now` (seconds, any epoch), so the
tests drive time by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from watcher.headers import Instance


@dataclass(slots=True)
class Candidate:
    """A file seen in the inbox but not yet read."""

    size: int
    mtime: float
    changed_at: float
    closed: bool = False
    #: When a read first found it unroutable (it may still be being written),
    #: why, and when to read it again.
    failed_at: float | None = None
    reason: str = ""
    next_read: float = 0.0
    #: Quarantines of it that failed (it could not be moved out of the
    #: inbox, or its reason not written), and when to try again.
    quarantine_attempts: int = 0
    next_quarantine: float = 0.0
    quarantine_error: str = ""

    def arrived(self, now: float) -> float:
        """When the file arrived, which starts its study's quiet period again:
        its last write (its modification time), unless that is more than
        `ARRIVAL_LEEWAY_SECONDS` older than when it was seen (a file moved
        in keeps an older time: then when it was seen); never after `now`,
        the time it is read. A daemon that yields to the receiver reads a
        file a little after it arrives, and so delays no study by it."""
        if self.mtime >= self.changed_at - ARRIVAL_LEEWAY_SECONDS:
            return min(self.mtime, now)
        return min(self.changed_at, now)


#: How much older than when it was seen a file's modification time may be
#: and still count as its arrival (see `Candidate.arrived`).
ARRIVAL_LEEWAY_SECONDS = 2.0


#: A study complete by its expected count still waits this long after its
#: last arrival: scanners send series back to back, and ImagesInAcquisition
#: counts per series, so a study whose first series is whole may have more.
COUNT_GRACE_SECONDS = 2.0


class Arrivals:
    """Files waiting to be complete: closed by their writer, or unchanged
    (size and modification time) for `settle` seconds."""

    def __init__(self) -> None:
        self.files: dict[str, Candidate] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, path: object) -> bool:
        return path in self.files

    def observe(self, path: str, size: int, mtime: float, now: float, closed: bool = False) -> None:
        known = self.files.get(path)
        if known is None:
            self.files[path] = Candidate(size, mtime, now, closed)
        elif (known.size, known.mtime) != (size, mtime):
            known.size, known.mtime, known.changed_at = size, mtime, now
            known.closed = closed
            known.failed_at = None
            known.next_read = 0.0
            known.quarantine_attempts = 0
            known.next_quarantine = 0.0
            known.quarantine_error = ""
        elif closed:
            known.closed = True

    def forget(self, path: str) -> None:
        self.files.pop(path, None)

    def newest_unread(self, now: float) -> float | None:
        """The latest arrival among the files not read yet (any study's: it
        is not known before the read), leaving out those found unreadable."""
        return max(
            (c.arrived(now) for c in self.files.values() if c.failed_at is None), default=None
        )

    def ready(self, now: float, settle: float, wall_now: float) -> list[str]:
        """Paths whose writer is done: closed, or unchanged for `settle`
        seconds (by our observation, or by the file's own modification time).
        An unroutable file is read again after a while, in case it grew."""
        return [
            path
            for path, c in self.files.items()
            if now >= c.next_read
            and (c.closed or now - c.changed_at >= settle or wall_now - c.mtime >= settle)
        ]

    def failed(self, path: str, reason: str, now: float, retry_after: float) -> None:
        candidate = self.files.get(path)
        if candidate is not None:
            if candidate.failed_at is None:
                candidate.failed_at = now
            candidate.reason = reason
            candidate.next_read = now + retry_after

    def to_quarantine(self, now: float, grace: float) -> list[tuple[str, str]]:
        """Unroutable files unchanged for `grace` seconds, with their reason
        (after a failed quarantine, once its next try is due)."""
        return [
            (path, c.reason)
            for path, c in self.files.items()
            if c.failed_at is not None
            and now - c.changed_at >= grace
            and now - c.failed_at >= 0
            and now >= c.next_quarantine
        ]

    def quarantine_failed(
        self, path: str, error: str, now: float, first: float, longest: float
    ) -> tuple[int, float]:
        """Schedule the next quarantine of a file with a doubling wait;
        return how many have failed, and the wait."""
        candidate = self.files.get(path)
        if candidate is None:
            return 0, 0.0
        candidate.quarantine_attempts += 1
        candidate.quarantine_error = error
        wait = min(first * 2 ** (candidate.quarantine_attempts - 1), longest)
        candidate.next_quarantine = now + wait
        return candidate.quarantine_attempts, wait

    def held(self) -> list[str]:
        """Files kept in the inbox by a failed quarantine, waiting to try again."""
        return [path for path, c in self.files.items() if c.quarantine_attempts]


_EMPTY = itertools.repeat("")


@dataclass(slots=True)
class Pending:
    """One read instance waiting for its study to complete. Values are kept
    as a tuple aligned with the study's field names, repeated strings shared."""

    path: str
    size: int
    values: tuple[str, ...]
    #: The file's SHA-256 (raw bytes) and the mtime it was taken at, if read.
    sha256: bytes = b""
    mtime_ns: int = 0


@dataclass
class Study:
    uid: str
    fields: tuple[str, ...]
    first_arrival: float
    last_arrival: float
    instances: dict[str, Pending] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict, repr=False)
    patient: str = ""
    #: Per rule name, what was placed so far (kept across parked retries).
    progress: dict[str, Any] = field(default_factory=dict, repr=False)
    #: How it completes, as the daemon worked it out (`daemon.Completion`).
    policy: Any = None
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    parked_since: float | None = None

    def values(self, pending: Pending) -> dict[str, str]:
        return {k: v for k, v in zip(self.fields, pending.values, strict=True) if v}

    def instance(self, pending: Pending) -> Instance:
        return Instance(
            pending.path,
            pending.size,
            self.values(pending),
            pending.sha256.hex(),
            pending.mtime_ns,
        )

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self.instances.values())


class Studies:
    """Instances grouped by StudyInstanceUID, with quiescence."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        self.by_uid: dict[str, Study] = {}
        self.study_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.by_uid)

    def __iter__(self) -> Iterator[Study]:
        return iter(list(self.by_uid.values()))

    def __contains__(self, path: object) -> bool:
        return path in self.study_of

    def add(self, instance: Instance, now: float) -> Study:
        uid = instance.study_instance_uid
        study = self.by_uid.get(uid)
        if study is None:
            study = self.by_uid[uid] = Study(uid, self.fields, now, now)
            study.patient = instance.values.get("PatientID", "")
        self.remove_path(instance.path)
        study.instances[instance.path] = Pending(
            instance.path,
            instance.size,
            self._compact(study, instance.values),
            bytes.fromhex(instance.sha256),
            instance.mtime_ns,
        )
        study.last_arrival = max(study.last_arrival, now)
        self.study_of[instance.path] = uid
        return study

    def _compact(self, study: Study, values: Mapping[str, str]) -> tuple[str, ...]:
        share = study.shared.setdefault
        return tuple([share(value, value) for value in map(values.get, study.fields, _EMPTY)])

    def remove_path(self, path: str) -> None:
        uid = self.study_of.pop(path, None)
        if uid is None:
            return
        study = self.by_uid[uid]
        study.instances.pop(path, None)
        if not study.instances:
            del self.by_uid[uid]

    def drop(self, study: Study) -> None:
        for path in study.instances:
            self.study_of.pop(path, None)
        self.by_uid.pop(study.uid, None)

    def due(
        self,
        now: float,
        quiet: float,
        max_age: float,
        policy: Callable[[Study], tuple[float, bool]] | None = None,
    ) -> list[tuple[Study, str]]:
        """Studies to place now: quiet long enough, complete by their expected
        count, too old, or parked with their next try come. `policy(study)`
        may give a study its own (quiet seconds, complete now). Returns
        (study, why) pairs."""
        due = []
        for study in self.by_uid.values():
            study_quiet, complete = policy(study) if policy else (quiet, False)
            if study.parked_since is not None:
                if now >= study.next_try:
                    due.append((study, "retry"))
            elif complete and now - study.last_arrival >= min(study_quiet, COUNT_GRACE_SECONDS):
                due.append((study, "expected_count"))
            elif now - study.last_arrival >= study_quiet:
                due.append((study, "quiet"))
            elif now - study.first_arrival >= max_age:
                due.append((study, "max_age"))
        return due

    @staticmethod
    def park(study: Study, error: str, now: float, first: float, longest: float) -> bool:
        """Schedule the next try with a doubling wait; True when the state
        changed (newly parked, or another error) and is worth a log line."""
        changed = study.parked_since is None or error != study.last_error
        if study.parked_since is None:
            study.parked_since = now
        study.attempts += 1
        study.next_try = now + min(first * 2 ** (study.attempts - 1), longest)
        study.last_error = error
        return changed
