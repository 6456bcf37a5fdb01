"""The study bookkeeping of the daemon: what a placement in progress has
placed for each rule, how a study completes, and the journal of the folders
placements write into (`state/placing.json`), with what reads, writes and
cleans it. Nothing here touches the loop; what touches a destination runs
where the caller puts it (a placer, for the daemon).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher import headers
from watcher.errors import DestinationUnavailable
from watcher.manifest import Entry, manifest_path
from watcher.placement import (
    Folder,
    Placement,
    remove_scratch_folders,
    remove_temporaries,
    sha256_of_fd,
    temporaries,
)
from watcher.rules import PER_SERIES_COUNT, Route, RuleSet
from watcher.state import atomic_write
from watcher.studies import Study

#: Instances with their routes, placed together.
Batch = list[tuple[headers.Instance, list[Route]]]
#: Per instance of a batch: its placements, or the error that kept it.
PlaceOutcomes = list[list[Placement] | BaseException]


@dataclass
class Completion:
    """How a study completes, worked out for one version of the rules: the
    rules its instances matched so far, and what they make of it."""

    ruleset: object
    matched: dict[str, Any] = field(default_factory=dict)
    #: The instances matched already, and the arrival time that was seen.
    seen: set[str] = field(default_factory=set)
    arrival: float | None = None
    quiet: float | None = None
    expected: tuple[int | str, ...] = ()
    counted: int = -1
    complete: bool = False


def completion(
    study: Study, ruleset: RuleSet, default_quiet: float, quiet_override: float | None
) -> tuple[float, bool]:
    """A study's quiet period (its rules may set their own; the longest
    wins) and whether its expected instance count is reached.

    A lab's rules set these only for a study that goes to that lab
    alone: a study shared with others waits as the operator's rules and
    the config say, so that no lab delays (or hurries) another's copies.
    Which labs share it is known from every instance that arrived (each
    matched once), not from the first alone.
    """
    policy = study.policy
    if not isinstance(policy, Completion) or policy.ruleset is not ruleset:
        policy = study.policy = Completion(ruleset)
    if policy.arrival != study.last_arrival:
        policy.arrival = study.last_arrival
        for path, pending in study.instances.items():
            if path in policy.seen:
                continue
            policy.seen.add(path)
            for rule in ruleset.matching(study.values(pending)):
                if rule.name not in policy.matched:
                    policy.matched[rule.name] = rule
                    policy.quiet = None  # worked out again below
    if policy.quiet is None:
        rules = list(policy.matched.values())
        if len({rule.tenant for rule in rules}) > 1:
            rules = [rule for rule in rules if not rule.tenant]
        quiet = max(
            (r.quiet_seconds for r in rules if r.quiet_seconds is not None),
            default=default_quiet,
        )
        policy.quiet = quiet if quiet_override is None else quiet_override
        policy.expected = tuple(r.expected_instances for r in rules if r.expected_instances)
        policy.counted, policy.complete = -1, False
    if policy.expected and policy.counted != len(study.instances):
        policy.complete = expected_count_reached(study, policy.expected)
        policy.counted = len(study.instances)
    return policy.quiet, policy.complete


@dataclass
class Counts:
    """What the daemon did since it started, for its status."""

    placed_files: int = 0
    placed_studies: int = 0
    quarantined: int = 0
    unmatched: int = 0
    last_placement: dict[str, object] = field(default_factory=dict)
    labs: dict[str, LabCounts] = field(default_factory=dict)

    def placed(self, lab: str, record: dict[str, Any], delay: float) -> None:
        """A study placed for one of `lab`'s rules (a late addition to it
        counts again): `record` has its files and bytes; `delay` is the
        seconds from its last arrival."""
        counts = self.labs.setdefault(lab, LabCounts())
        counts.studies += 1
        counts.files += int(record["files"])
        counts.bytes += int(record["bytes"])
        counts.delay_sum += delay
        index = next((i for i, le in enumerate(DELAY_BUCKETS) if delay <= le), len(DELAY_BUCKETS))
        counts.delay_buckets[index] += 1
        counts.recent.insert(0, record)
        del counts.recent[RECENT_PLACEMENTS:]


#: Upper bounds (seconds) of the histogram of a study's last arrival to its
#: placement: quiet periods are a minute by default, parked studies wait longer.
DELAY_BUCKETS = (5.0, 15.0, 30.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)
#: The placements each lab's status keeps, newest first.
RECENT_PLACEMENTS = 20


@dataclass
class LabCounts:
    """One lab's placements since the daemon started."""

    studies: int = 0
    files: int = 0
    bytes: int = 0
    #: Placements per delay bucket (`DELAY_BUCKETS`, then one above the last).
    delay_buckets: list[int] = field(default_factory=lambda: [0] * (len(DELAY_BUCKETS) + 1))
    delay_sum: float = 0.0
    recent: list[dict[str, Any]] = field(default_factory=list)

    def as_status(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "files": self.files,
            "bytes": self.bytes,
            "delay_buckets": list(zip([*DELAY_BUCKETS, "+Inf"], self.delay_buckets, strict=True)),
            "delay_sum": round(self.delay_sum, 3),
            "recent": self.recent,
        }


class Journal:
    """`state/placing.json`: the folders that placements in progress write
    temporary files into, so that what a crash leaves there is removed at the
    next start. Written (durably) before anything is written into them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folders: set[Folder] = set()
        #: It held folders of an earlier placement that failed, not cleaned yet.
        self.inherited = False

    def add(self, folders: set[Folder]) -> None:
        if folders <= self.folders:
            return
        if not self.folders:
            try:
                earlier = read_journal(self.path)
            except (OSError, ValueError, KeyError, TypeError):
                earlier = set()
            self.inherited = bool(earlier)
            self.folders = earlier
        self.folders |= folders
        write_journal(self.path, self.folders)


def write_journal(path: Path, folders: set[Folder]) -> None:
    entries = [
        {
            "path": str(folder.path),
            "root": str(folder.root),
            "anchor": None if folder.anchor is None else str(folder.anchor),
            "beneath": list(folder.beneath),
        }
        for folder in folders
    ]
    entries.sort(key=lambda entry: str(entry["path"]))
    atomic_write(path, json.dumps({"folders": entries}))


def read_journal(path: Path) -> set[Folder]:
    folders = set()
    for entry in json.loads(path.read_text(encoding="utf-8"))["folders"]:
        if isinstance(entry, str):
            # An older journal's bare path: reached from / without a link.
            folders.add(Folder(Path(entry), (), Path(entry)))
            continue
        root, anchor = Path(entry["root"]), entry["anchor"]
        folders.add(
            Folder(
                root,
                Path(entry["path"]).relative_to(root).parts,
                None if anchor is None else Path(anchor),
                tuple(entry["beneath"]),
            )
        )
    return folders


@dataclass
class StudyPlacement:
    """One study being placed: how many of its batches are begun and taken."""

    study: Study
    started: float
    unmatched: int = 0
    begun: int = 0
    taken: int = 0
    #: The inbox folders its placed files were removed from (flushed at its end).
    moved_from: set[str] = field(default_factory=set)
    error: str | None = None
    #: Why files it kept in `unmatched/` stay in the inbox too: it is parked
    #: for them once its other files are placed.
    kept_back: str | None = None
    ended: bool = False


@dataclass
class RulePlacement:
    """What one study placed for one rule: for its summary line and manifest."""

    route: Route
    started: float
    files: int = 0
    placed: int = 0
    bytes: int = 0
    entries: list[Entry] = field(default_factory=list)

    def add(self, placement: Placement, instance: headers.Instance) -> None:
        self.files += 1
        self.bytes += placement.size
        if placement.outcome == "placed":
            self.placed += 1
        if self.route.rule.manifest:
            values = instance.values
            self.entries.append(
                Entry(
                    values["SOPInstanceUID"],
                    values.get("SeriesInstanceUID", ""),
                    values.get("SeriesNumber", ""),
                    placement,
                )
            )

    @property
    def folder(self) -> Path:
        """The study's folder in the lab tree (where its series folders are)."""
        rule = self.route.rule
        return rule.destination / rule.path.study_folder(self.route.relative_path)


def expected_count_reached(study: Study, expected: tuple[int | str, ...]) -> bool:
    """True when a rule's count is reached: a number of instances for the
    study, or `ImagesInAcquisition` instances in every series received."""
    count = len(study.instances)
    if any(isinstance(n, int) and count >= n for n in expected):
        return True
    if PER_SERIES_COUNT not in expected:
        return False
    series: dict[str, list[int]] = {}
    for pending in study.instances.values():
        values = study.values(pending)
        entry = series.setdefault(values.get("SeriesInstanceUID", ""), [0, 0])
        entry[0] += 1
        with contextlib.suppress(ValueError):
            entry[1] = max(entry[1], int(values.get(PER_SERIES_COUNT, "0")))
    return all(needed > 0 and have >= needed for have, needed in series.values())


def found_placed(instance: headers.Instance, routes: list[Route]) -> list[Placement] | None:
    """The instance's copies, when every route already holds its very bytes
    (same size and SHA-256) under its name; else None."""
    if not instance.sha256:
        return None
    found = []
    for route in routes:
        path = route.rule.destination / route.relative_path
        try:
            folder = route.rule.folder(path.parent).open()
        except (OSError, DestinationUnavailable):
            return None
        try:
            fd = os.open(
                path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder
            )
        except OSError:
            return None
        finally:
            os.close(folder)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or status.st_size != instance.size:
                return None
            if sha256_of_fd(fd) != instance.sha256:
                return None
        finally:
            os.close(fd)
        found.append(
            Placement(path.parent, path.name, "present", status.st_size, None, instance.sha256)
        )
    return found


def describe(error: BaseException) -> str:
    if (
        isinstance(error, OSError)
        and error.strerror
        and not isinstance(error, DestinationUnavailable)
    ):
        return f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    return str(error)


def plan_folders(plan: Batch, study_uid: str) -> set[Folder]:
    """The folders that placing a study writes into: those of its files, and
    of its manifests (journaled with them, to be written in one go)."""
    firsts: dict[tuple[str, str], Route] = {}
    for _, routes in plan:
        for route in routes:
            firsts.setdefault((route.rule.name, route.relative_path.rpartition("/")[0]), route)
    folders = set()
    for (_, folder), route in firsts.items():
        rule = route.rule
        folders.add(rule.folder(rule.destination / folder))
        if rule.manifest:
            folders.add(rule.folder(manifest_path(rule, route.relative_path, study_uid).parent))
    return folders


def clean_folders(folders: set[Folder]) -> tuple[int, set[Folder]]:
    """Remove our temporary files from journaled folders; return how many
    were removed and the folders where some stay (a read-only share) or that
    cannot be reached now (unmounted, say), to be cleaned when they can.
    Each is reached through handles, as placements reach it: a folder a lab
    swapped for a link is not followed into someone else's tree, and is
    dropped, as is one that has gone. The roots of the folders lose the
    scratch folders that placements there put temporary files in."""
    removed, left = 0, set[Folder]()
    for folder in folders:
        try:
            fd = folder.open()
        except DestinationUnavailable:
            left.add(folder)
            continue
        except OSError:
            continue
        try:
            removed += remove_temporaries(fd)
            if temporaries(fd):
                left.add(folder)
        finally:
            os.close(fd)
    for root in {Folder(f.root, (), f.anchor, f.beneath) for f in folders}:
        try:
            fd = root.open()
        except (DestinationUnavailable, OSError):
            continue  # (its folders are left, and bring it back)
        try:
            scratch_removed, stay = remove_scratch_folders(fd)
        finally:
            os.close(fd)
        removed += scratch_removed
        if stay:
            left.add(root)
    return removed, left
