"""Lab rule files: loading, validation and matching.

A rule file is declarative YAML, read with `yaml.safe_load`; nothing in it is
ever evaluated. Validation collects every problem of every file, each as a
`RuleError` that prints as `file:line: message`, and a file with a problem
does not stop the others from loading.
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher import template
from watcher.errors import RuleError
from watcher.placement import Folder

if TYPE_CHECKING:
    import yaml

RULE_KEYS = frozenset(
    {
        "name",
        "lab",
        "description",
        "match",
        "destination",
        "path",
        "exclusive",
        "priority",
        "hooks",
        "group",
        "file_mode",
        "folder_mode",
        "quiet_seconds",
        "expected_instances",
        "manifest",
    }
)
HOOK_KEYS = frozenset({"command", "timeout", "retries", "name"})
#: What a hook argument may contain: `{study_folder}` and the like.
HOOK_PLACEHOLDERS = frozenset(
    {"study_folder", "lab", "rule", "patient", "study_uid", "files", "manifest", "destination"}
)
#: `expected_instances` may name this field instead of giving a number.
PER_SERIES_COUNT = "ImagesInAcquisition"
REQUIRED_KEYS = ("match", "destination", "path")
#: Names of rules, labs and users: no `/`, no leading dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RULE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Condition:
    """One `match:` entry: a field and the regular expression searched in it."""

    field: str
    #: An RE2 pattern (`compile_pattern`): matching takes linear time.
    pattern: Any

    def value_matches(self, values: Mapping[str, str]) -> bool:
        value = template.lookup(values, self.field)
        return bool(value) and self.pattern.search(value) is not None


@dataclass(frozen=True, slots=True)
class Hook:
    """A command run after a study (or a late addition to it) is placed: an
    argument list, never a shell line."""

    command: tuple[str, ...]
    timeout: float = 3600.0
    retries: int = 2
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.command[0])


@dataclass(frozen=True, slots=True)
class Rule:
    """One lab's rule: which instances, where to, under which names, and
    what happens once they are there."""

    name: str
    source: str
    match: tuple[Condition, ...]
    destination: Path
    path: template.Template
    lab: str = ""
    exclusive: bool = False
    priority: int = 0
    hooks: tuple[Hook, ...] = ()
    group: int | None = None
    file_mode: int | None = None
    folder_mode: int | None = None
    quiet_seconds: float | None = None
    expected_instances: int | str | None = None
    manifest: bool = True
    #: The lab whose folder under rules/ holds this rule; "" for the
    #: operator's rules (directly in rules/), which keep full powers.
    tenant: str = ""
    #: A lab rule takes an instance only if one of these also matches;
    #: None: any instance (`claims: all`); (): none.
    claims: tuple[tuple[Condition, ...], ...] | None = None
    #: A lab rule's placements open this root (the lab's destination that
    #: holds `destination`, resolved) and go down `beneath` to the
    #: destination without following a link; None for the operator's rules.
    anchor: Path | None = None
    beneath: tuple[str, ...] = ()

    @property
    def lab_name(self) -> str:
        return self.tenant or self.lab or self.name

    def folder(self, path: Path) -> Folder:
        """A folder at or below the destination, as placements reach it."""
        return Folder(
            self.destination, path.relative_to(self.destination).parts, self.anchor, self.beneath
        )

    def claim_for(self, values: Mapping[str, str]) -> int | None:
        """Index of the first claim of the lab that holds (-1 for an operator
        rule or `claims: all`), or None when none holds."""
        if not self.tenant or self.claims is None:
            return -1
        for index, claim in enumerate(self.claims):
            if all(condition.value_matches(values) for condition in claim):
                return index
        return None

    @property
    def fields(self) -> frozenset[str]:
        extra = {PER_SERIES_COUNT} if self.expected_instances == PER_SERIES_COUNT else set()
        tested = [*self.match, *(c for claim in self.claims or () for c in claim)]
        return self.path.fields | {c.field.split(".")[0] for c in tested} | extra

    def matches(self, values: Mapping[str, str]) -> bool:
        return all(condition.value_matches(values) for condition in self.match) and (
            self.claim_for(values) is not None
        )


@dataclass(frozen=True)
class Lab:
    """What the operator's config lets one lab do (`labs.<name>`)."""

    name: str
    #: Roots the lab's rules may write under, resolved when the config loads.
    destinations: tuple[Path, ...] = ()
    #: `match:`-style maps, any of which must hold for the lab's rules to
    #: take an instance; None is `claims: all`; () takes nothing.
    claims: tuple[tuple[Condition, ...], ...] | None = ()
    #: Group of everything placed for the lab.
    group: int | None = None
    #: Account its hooks run under (`dicom-watcher hooks --lab`).
    hook_user: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision for one instance and one rule: where it goes, and
    the field values that decided the match."""

    rule: Rule
    relative_path: str
    decided_by: tuple[tuple[str, str], ...]

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Goes to worker processes by the thousand (see `headers.Instance`).
        return type(self), (self.rule, self.relative_path, self.decided_by)


@dataclass(frozen=True, slots=True)
class Decision:
    """How one rule whose `match:` holds fares with one instance."""

    rule: Rule
    #: The lab's claim that holds (its index; -1: operator rule or `claims:
    #: all`), or None: no claim of the lab holds, so the rule takes nothing.
    claim: int | None
    taken: bool
    #: The exclusive rule that took the instance instead, if one did.
    taken_by: Rule | None = None


def describe_claim(claim: tuple[Condition, ...]) -> str:
    """`StudyDescription ~ ^SMITH\\^, Modality ~ MR` (an empty claim holds always)."""
    return ", ".join(f"{c.field} ~ {c.pattern.pattern}" for c in claim) or "any study"


@dataclass(frozen=True)
class RuleSet:
    """The rules in force. `route` gives every rule's decision for an instance;
    an empty list is the "unmatched" decision."""

    rules: tuple[Rule, ...] = ()
    problems: tuple[RuleError, ...] = ()
    #: Lines worth telling, not problems: `file: warning: ...`.
    warnings: tuple[str, ...] = ()
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.rules, key=lambda r: (-r.priority, r.name)))
        object.__setattr__(self, "rules", ordered)
        object.__setattr__(self, "fields", frozenset().union(*(r.fields for r in self.rules)))

    def matching(self, values: Mapping[str, str]) -> list[Rule]:
        """The rules that take an instance, highest priority first.

        Every matching rule gets its own copy, unless an `exclusive` rule
        matches: then the highest-priority exclusive rule takes it alone.
        An operator's exclusive rule takes it from everyone; a lab's
        exclusive rule only from that lab's other rules.
        """
        matched = [rule for rule in self.rules if rule.matches(values)]
        operator_exclusive = [r for r in matched if r.exclusive and not r.tenant]
        if operator_exclusive:
            return operator_exclusive[:1]
        taken: list[Rule] = []
        for tenant in dict.fromkeys(r.tenant for r in matched):
            own = [r for r in matched if r.tenant == tenant]
            exclusive = [r for r in own if r.exclusive]
            taken.extend(exclusive[:1] if exclusive else own)
        return sorted(taken, key=lambda r: (-r.priority, r.name))

    def explain(self, values: Mapping[str, str]) -> list[Decision]:
        """Each rule whose own `match:` holds, with the claim that let it take
        the instance (or none) and whether it took it (for preview and check)."""
        taken = self.matching(values)
        by = taken[0] if taken and taken[0].exclusive and not taken[0].tenant else None
        decisions = []
        for rule in self.rules:
            if not all(condition.value_matches(values) for condition in rule.match):
                continue
            took = any(rule is other for other in taken)
            if took or rule.claim_for(values) is None:
                winner = None
            else:
                winner = by or next(
                    (r for r in taken if r.tenant == rule.tenant and r.exclusive), None
                )
            decisions.append(Decision(rule, rule.claim_for(values), took, winner))
        return decisions

    def route(self, values: Mapping[str, str]) -> list[Route]:
        return [
            Route(
                rule=rule,
                relative_path=rule.path.render(values),
                decided_by=tuple((c.field, template.lookup(values, c.field)) for c in rule.match),
            )
            for rule in self.matching(values)
        ]

    def overlaps(self) -> list[str]:
        """Warnings for pairs of rules that may match the same instance."""
        warnings = []
        for index, first in enumerate(self.rules):
            for second in self.rules[index + 1 :]:
                if _disjoint(first, second):
                    continue
                if first.tenant != second.tenant:
                    # Two labs' rules, or a lab's and the operator's: each gets
                    # its own copy by design, unless the operator's is exclusive.
                    operator = second if first.tenant else first
                    if operator.tenant or not operator.exclusive:
                        continue
                    lab_rule = first if operator is second else second
                    warnings.append(
                        f"{lab_rule.source}: warning: the operator's exclusive rule "
                        f"{operator.name} takes what it and {lab_rule.name} both match"
                    )
                    continue
                if first.exclusive or second.exclusive:
                    winner = first if first.exclusive else second
                    if first.exclusive and second.exclusive and first.priority == second.priority:
                        how = (
                            f"both exclusive with priority {first.priority}: "
                            f"{winner.name} wins by name; give them different priorities"
                        )
                    else:
                        how = f"{winner.name} is exclusive and takes what both match"
                else:
                    how = "each gets its own copy (set exclusive/priority if that is not meant)"
                warnings.append(
                    f"{second.source}: warning: rules {first.name} and {second.name} "
                    f"may match the same instances: {how}"
                )
        return warnings


def _disjoint(first: Rule, second: Rule) -> bool:
    """True when two rules provably never match one instance: a field both
    test with anchored literal prefixes that differ (^SMITH vs ^JONES)."""
    theirs = {c.field: c.pattern.pattern for c in second.match}
    for condition in first.match:
        other = theirs.get(condition.field)
        if other is None:
            continue
        mine_prefix, other_prefix = (
            _literal_prefix(condition.pattern.pattern),
            _literal_prefix(other),
        )
        if mine_prefix is None or other_prefix is None:
            continue
        if not (mine_prefix.startswith(other_prefix) or other_prefix.startswith(mine_prefix)):
            return True
    return False


def _literal_prefix(pattern: str) -> str | None:
    """The literal text a `^...` pattern must start with, or None."""
    if not pattern.startswith("^") or pattern.startswith("^(?"):
        return None
    prefix = []
    for char in pattern[1:]:
        if char in ".^$*+?{}[]\\|()":
            break
        prefix.append(char)
    return "".join(prefix) or None


#: A rule file larger than this is refused unread.
MAX_RULE_FILE_BYTES = 1 << 20
#: Mode bits never given to a placed file (setuid, setgid, sticky, write by others).
FORBIDDEN_FILE_BITS = 0o7002
#: ... and never to a folder (setgid is how a folder passes its group on).
FORBIDDEN_FOLDER_BITS = 0o5002


@dataclass(frozen=True)
class RuleFile:
    """A rule file found in the rules folder: whose it is, and how it was found."""

    path: Path
    #: The lab whose folder holds it; "" for the operator's files.
    tenant: str = ""
    signature: tuple[int, ...] = ()


@dataclass
class Survey:
    """What the rules folder holds: the files to load, and what was refused
    (folders and files of labs that others than the lab could write)."""

    files: list[RuleFile] = field(default_factory=list)
    problems: list[RuleError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def signature(self) -> tuple[object, ...]:
        return (
            tuple((f.path, f.signature) for f in self.files),
            tuple(str(p) for p in self.problems),
            tuple(self.warnings),
        )


def survey(directory: Path, labs: Mapping[str, Lab] | None) -> Survey:
    """The rule files of `directory`: its own (the operator's) and those of
    each lab's folder `directory/<lab>/`. Raises `RuleError` only when the
    folder itself cannot be read."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        raise RuleError(
            str(directory), 0, f"cannot read the rules folder: {error.strerror}"
        ) from error
    found = Survey()
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            _survey_lab(path, info, labs, found)
        elif path.suffix in RULE_SUFFIXES:
            try:
                info = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found.files.append(RuleFile(path, "", (info.st_mtime_ns, info.st_size)))
        elif stat.S_ISLNK(info.st_mode) and path.is_dir():
            found.problems.append(
                RuleError(str(path), 0, "a lab's folder may not be a symbolic link: refused")
            )
    return found


def _survey_lab(
    folder: Path, info: os.stat_result, labs: Mapping[str, Lab] | None, found: Survey
) -> None:
    lab = (labs or {}).get(folder.name)
    if lab is None:
        message = (
            f"folder {folder.name}/ is not a lab of the config (labs:): its files are not loaded"
        )
        if labs:
            found.problems.append(RuleError(str(folder), 0, message))
        elif labs is None:
            found.warnings.append(f"{folder}: warning: {message} (--config gives the labs)")
        else:
            found.warnings.append(f"{folder}: warning: {message}")
        return
    refused = _writable_by_others(info, lab, "folder")
    if refused is not None:
        found.problems.append(RuleError(str(folder), 0, f"refused: {refused}"))
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        found.problems.append(RuleError(str(folder), 0, f"cannot read: {error.strerror}"))
        return
    for entry in entries:
        path = Path(entry.path)
        if path.suffix not in RULE_SUFFIXES:
            continue
        try:
            file_info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(file_info.st_mode):
            found.problems.append(
                RuleError(
                    str(path), 0, "refused: a lab's rule file must be a regular file, not a link"
                )
            )
            continue
        signature = (file_info.st_mtime_ns, file_info.st_size, file_info.st_mode, file_info.st_gid)
        found.files.append(RuleFile(path, lab.name, (*signature, info.st_mode, info.st_gid)))


def _writable_by_others(info: os.stat_result, lab: Lab, what: str) -> str | None:
    """Why a lab's folder or rule file could be changed by others than the
    operator and the lab's group, or None. The folder's owner can change its
    mode, so it must be the operator; a file's owner is whoever of the lab
    made it."""
    if info.st_mode & stat.S_IWOTH:
        return f"the {what} is writable by everyone (chmod o-w)"
    if what == "folder" and info.st_uid not in (0, os.geteuid()):
        return f"the {what} must belong to the operator (root), not uid {info.st_uid}"
    if info.st_mode & stat.S_IWGRP and lab.group is not None and info.st_gid != lab.group:
        return (
            f"the {what} is writable by group {_group_name(info.st_gid)}, "
            f"not the lab's group {_group_name(lab.group)}"
        )
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class _Refused(Exception):
    """A rule its lab may not have; `key` is the rule file's key to point at."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Unanswered(OSError):
    """A destination's lookup did not answer in time (its share may hang)."""


class Resolver:
    """`os.path.realpath` with a deadline, for a daemon's rule reloads: the
    lookups of a lab's destination on a share that hangs wait in the kernel
    for as long as it hangs, and must not hold up the loop that places for
    every lab. A lookup still stuck is not started again; once it returns,
    `answered` says so (the rules that waited on it can be loaded again).

    The lookups of one reload wait `timeout` in all, not each (`begin`;
    each at least FLOOR_SECONDS): a lab with many rule files into a share
    that hangs costs the loop about one wait, not one a file; and at most
    MAX_PENDING lookups of one owner (a lab) are stuck at once, so that its
    rules cannot use up the threads, nor the waits of another lab's."""

    MAX_PENDING = 16
    #: What a lookup gets once the reload's wait is spent: plenty for a
    #: disk or a share that answers.
    FLOOR_SECONDS = 0.05

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pending: dict[str, futures.Future[str]] = {}
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()
        self._until = math.inf

    def begin(self) -> None:
        """A reload starts: its lookups together wait at most `timeout`."""
        self._until = time.monotonic() + self.timeout

    def __call__(self, path: str | Path, owner: str = "") -> str:
        key = os.fspath(path)
        with self._lock:
            future = self._pending.get(key)
            late = future is not None  # (timed out before: not waited for again)
            if future is None:
                if sum(o == owner for o in self._owners.values()) >= self.MAX_PENDING:
                    raise Unanswered(f"{key}: {self.MAX_PENDING} of its lookups wait already")
                future = self._pending[key] = futures.Future()
                self._owners[key] = owner
                threading.Thread(
                    target=self._resolve, args=(key, future), daemon=True, name="resolve"
                ).start()
        left = self._until - time.monotonic()
        wait = 0.0 if late else min(self.timeout, max(left, self.FLOOR_SECONDS))
        try:
            found = future.result(wait)
        except futures.TimeoutError:
            raise Unanswered(f"{key} did not answer within {wait:.2g} s") from None
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key], self._owners[key]
        return found

    @staticmethod
    def _resolve(path: str, future: futures.Future[str]) -> None:
        try:
            future.set_result(os.path.realpath(path))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(error)

    def answered(self) -> bool:
        """Whether a lookup that timed out has returned since (each is told once)."""
        with self._lock:
            done = [key for key, future in self._pending.items() if future.done()]
            for key in done:
                del self._pending[key], self._owners[key]
        return bool(done)


def _realpath(path: str | Path, owner: str = "") -> str:
    """`os.path.realpath`, waiting as long as it takes (`check`, `preview`)."""
    return os.path.realpath(path)


def _bound_to_lab(rule: Rule, lab: Lab, resolve: Callable[..., str] = _realpath) -> Rule:
    """The rule as its lab may have it: namespaced, claimed, grouped; raises
    `_Refused` when it reaches beyond what the config gives the lab."""
    if rule.lab and rule.lab != lab.name:
        raise _Refused(
            "lab",
            f"lab: {rule.lab} in a rule of lab {lab.name}'s folder "
            "(a rule belongs to the lab whose folder holds it)",
        )
    if not lab.destinations:
        raise _Refused("destination", f"refused: labs.{lab.name} has no destinations")
    try:
        target = Path(resolve(rule.destination, lab.name))
    except Unanswered as error:
        raise _Refused(
            "destination",
            f"destination {rule.destination} does not answer (its share may hang): "
            f"{error}; loaded once it answers",
        ) from None
    # The roots as resolved when the config was loaded: a link the lab puts
    # in place of its root (or a folder above it) since cannot move them.
    roots = list(lab.destinations)
    anchor = next((root for root in roots if _inside(target, root)), None)
    if anchor is None:
        listed = ", ".join(str(r) for r in lab.destinations)
        raise _Refused(
            "destination",
            f"refused: destination {rule.destination} is outside "
            f"labs.{lab.name}.destinations ({listed})",
        )
    if rule.group is not None and rule.group != lab.group:
        raise _Refused(
            "group",
            f"refused: a lab's files get the group the config gives it (labs.{lab.name}.group)",
        )
    return dataclasses.replace(
        rule,
        name=f"{lab.name}/{rule.name}",
        tenant=lab.name,
        claims=lab.claims,
        group=lab.group,
        destination=target,
        anchor=anchor,
        beneath=target.relative_to(anchor).parts,
    )


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def load_rules(directory: str | Path, labs: Mapping[str, Lab] | None = None) -> RuleSet:
    """Load the operator's rule files in `directory` and each lab's in
    `directory/<lab>/`; problems are collected, not raised.

    Raises `RuleError` only when the folder itself cannot be read.
    """
    folder = Path(directory)
    found = survey(folder, labs)
    rules: list[Rule] = []
    problems = list(found.problems)
    for entry in found.files:
        rule, more = load_rule_file(entry.path, labs, entry.tenant)
        problems.extend(more)
        if rule is not None:
            if any(existing.name == rule.name for existing in rules):
                problems.append(_duplicate_name(entry.path, rule.name))
            else:
                rules.append(rule)
    if not found.files and not found.problems:
        problems.append(RuleError(str(folder), 0, "no rule files (*.yaml) in this folder"))
    return RuleSet(rules=tuple(rules), problems=tuple(problems), warnings=tuple(found.warnings))


def single_rule(destination: str | Path, path_template: str, name: str = "sort") -> RuleSet:
    """A catch-all rule, as `sort --dest DIR --path TEMPLATE` uses."""
    try:
        parsed = template.parse(path_template)
    except template.TemplateError as error:
        raise RuleError("--path", 0, str(error)) from error
    rule = Rule(name=name, source="--dest", match=(), destination=Path(destination), path=parsed)
    return RuleSet(rules=(rule,))


def read_rule_text(path: Path, lab: Lab | None) -> str:
    """A rule file's text, read without following a symbolic link (for a
    lab's file), never blocking on a FIFO, and only up to a size limit."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if lab else 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if lab is not None:
            refused = _writable_by_others(info, lab, "file")
            if refused is not None:
                raise ValueError(f"refused: {refused}")
        if info.st_size > MAX_RULE_FILE_BYTES:
            raise ValueError(f"larger than {MAX_RULE_FILE_BYTES} bytes")
        data = os.read(fd, MAX_RULE_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return data.decode("utf-8")


def load_rule_file(
    path: Path,
    labs: Mapping[str, Lab] | None = None,
    tenant: str = "",
    resolve: Callable[..., str] = _realpath,
) -> tuple[Rule | None, list[RuleError]]:
    """Parse and validate one rule file of `tenant` ("" for the operator);
    return the rule (or None) and its problems. `resolve` finds where a lab
    rule's destination really is."""
    import yaml  # here, not above: `sort --dest` reads no YAML, and starts sooner

    source = str(path)
    lab = (labs or {}).get(tenant) if tenant else None
    if tenant and lab is None:
        return None, [RuleError(source, 0, f"{tenant} is not a lab of the config (labs:)")]
    try:
        text = read_rule_text(path, lab)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        return None, [RuleError(source, 0, f"cannot read: {reason}")]
    shape = _unsafe_shape(text)
    if shape is not None:
        return None, [RuleError(source, shape[0], shape[1])]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (RecursionError, MemoryError):  # (refused above; kept as the last guard)
        return None, [RuleError(source, 1, "not valid YAML: too deeply nested")]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        reason = getattr(error, "problem", None) or str(error)
        opened = getattr(error, "context_mark", None)
        if mark is not None and opened is not None and mark.index >= len(text.rstrip()):
            # The text ended inside a quote or bracket: point at where it opened.
            mark = opened
            reason = f"{reason} {getattr(error, 'context', '') or ''}".strip()
        line = mark.line + 1 if mark is not None else 1
        return None, [RuleError(source, line, f"not valid YAML: {reason}")]
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        return None, [RuleError(source, 1, "a rule file must be a mapping of keys to values")]
    lines = _key_lines(node)
    rule, problems = _validate(source, path.stem, data, lines)
    if rule is not None and lab is not None:
        try:
            rule = _bound_to_lab(rule, lab, resolve)
        except _Refused as refused:
            return None, [RuleError(source, lines.get(refused.key, 1), str(refused))]
    return rule, problems


#: A rule is a flat mapping with a few small maps and lists in it.
MAX_NESTING = 16


def _unsafe_shape(text: str) -> tuple[int, str] | None:
    """(line, why) when `text` uses YAML aliases (an alias bomb costs memory
    exponential in its size) or nests deeper than `MAX_NESTING` (the parser
    recurses per level); None otherwise, or when it is not valid YAML at all
    (which the parser then reports). Looks at the event stream only."""
    import yaml

    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark is not None else 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                return (
                    line,
                    "YAML anchors and aliases (&name, *name) are not allowed in rule files",
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    return line, f"nested more than {MAX_NESTING} levels deep"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return None
    return None


def _duplicate_name(path: Path, name: str) -> RuleError:
    """A rule name already taken, reported at the file's `name:` line (line 1
    when the name is the file's stem)."""
    import yaml

    line = 1
    try:
        text = read_rule_text(path, None)
        node = None if _unsafe_shape(text) else yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        node = None
    if isinstance(node, yaml.MappingNode):
        line = _key_lines(node).get("name", 1)
    return RuleError(str(path), line, f"a rule named {name!r} already exists")


def _key_lines(node: yaml.MappingNode) -> dict[str, int]:
    """Line of each key, as `key` and `key.subkey` for nested mappings."""
    import yaml

    lines: dict[str, int] = {}
    for key, value in node.value:
        name = str(key.value)
        lines[name] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub_key, _ in value.value:
                lines[f"{name}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return lines


def _validate(
    source: str, stem: str, data: dict[str, Any], lines: dict[str, int]
) -> tuple[Rule | None, list[RuleError]]:
    problems: list[RuleError] = []

    def problem(key: str, message: str) -> None:
        problems.append(RuleError(source, lines.get(key, 1), message))

    for key in data:
        if key not in RULE_KEYS:
            known = ", ".join(sorted(RULE_KEYS))
            problem(str(key), f"unknown key {key!r} (known keys: {known})")
    for key in REQUIRED_KEYS:
        if data.get(key) is None:
            problem(key, f"missing {key!r}")

    name = data.get("name", stem)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        problem("name", f"name must be letters, digits, '_', '.' or '-': {name!r}")

    conditions = parse_conditions(data.get("match"), problem, lines)
    destination = data.get("destination")
    if destination is not None and (not isinstance(destination, str) or not destination.strip()):
        problem("destination", "destination must be a folder path")
    parsed = None
    if data.get("path") is not None:
        try:
            parsed = template.parse(data["path"])
        except template.TemplateError as error:
            problem("path", str(error))

    options = _options(data, problem)
    if problems or parsed is None or not isinstance(destination, str):
        return None, problems
    folder = Path(destination).expanduser()
    if not folder.is_absolute():
        folder = Path(os.path.normpath(Path(source).parent.absolute() / folder))
    return Rule(
        name=str(name),
        source=source,
        match=conditions,
        destination=folder,
        path=parsed,
        **options,
    ), problems


def _options(data: dict[str, Any], problem: Any) -> dict[str, Any]:
    """The optional keys: precedence, automation, permissions, completion."""
    options: dict[str, Any] = {}
    lab = data.get("lab")
    if lab is not None:
        if not isinstance(lab, str) or not NAME_PATTERN.fullmatch(lab):
            problem("lab", f"lab must be letters, digits, '_', '.' or '-': {lab!r}")
        else:
            options["lab"] = lab
    for key in ("exclusive", "manifest"):
        if key in data:
            if not isinstance(data[key], bool):
                problem(key, f"{key} must be true or false")
            else:
                options[key] = data[key]
    if "priority" in data:
        if not isinstance(data["priority"], int) or isinstance(data["priority"], bool):
            problem("priority", "priority must be a whole number (higher goes first)")
        else:
            options["priority"] = data["priority"]
    if "quiet_seconds" in data:
        value = data["quiet_seconds"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            problem("quiet_seconds", "quiet_seconds must be a number of seconds >= 0")
        else:
            options["quiet_seconds"] = float(value)
    if "expected_instances" in data:
        value = data["expected_instances"]
        if value == PER_SERIES_COUNT or (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            options["expected_instances"] = value
        else:
            problem(
                "expected_instances",
                f"expected_instances must be a count > 0 or {PER_SERIES_COUNT!r}",
            )
    for key in ("file_mode", "folder_mode"):
        if key in data:
            mode = _mode(data[key])
            forbidden = FORBIDDEN_FILE_BITS if key == "file_mode" else FORBIDDEN_FOLDER_BITS
            if mode is None:
                problem(key, f"{key} must be an octal mode such as '0640' (quote it in YAML)")
            elif mode & forbidden:
                problem(
                    key,
                    f"{key} {mode:04o} is refused: no setuid, "
                    + ("setgid, " if key == "file_mode" else "")
                    + "sticky bit or write for others",
                )
            else:
                options[key] = mode
    if "group" in data:
        gid = parse_group(data["group"])
        if gid is None:
            problem("group", f"unknown group {data['group']!r} on this machine")
        else:
            options["group"] = gid
    if "hooks" in data:
        options["hooks"] = _hooks(data["hooks"], problem)
    return options


def _mode(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = oct(value)[2:]  # YAML 1.1 reads 0640 as octal already
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value.strip()):
        text = value.strip()
    else:
        return None
    mode = int(text, 8)
    return mode if mode <= 0o7777 else None


def parse_group(value: Any) -> int | None:
    """A group name or number as a gid, or None when this machine has no such group."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        return int(value) if value.isdigit() else None


def _hooks(value: Any, problem: Any) -> tuple[Hook, ...]:
    if not isinstance(value, list):
        problem("hooks", "hooks must be a list of {command: [program, arg, ...]}")
        return ()
    hooks = []
    for index, entry in enumerate(value, 1):
        where = f"hook {index}"
        if not isinstance(entry, dict):
            problem("hooks", f"{where}: must be a mapping with a command list")
            continue
        for key in entry:
            if key not in HOOK_KEYS:
                problem(
                    "hooks", f"{where}: unknown key {key!r} (known: {', '.join(sorted(HOOK_KEYS))})"
                )
        command = entry.get("command")
        if isinstance(command, str):
            problem(
                "hooks",
                f"{where}: command must be a list of arguments, "
                "not a shell line (no shell is ever used)",
            )
            continue
        if (
            not isinstance(command, list)
            or not command
            or not all(
                isinstance(arg, str | int | float) and not isinstance(arg, bool) for arg in command
            )
        ):
            problem("hooks", f"{where}: command must be a non-empty list of arguments")
            continue
        arguments = tuple(str(arg) for arg in command)
        for argument in arguments:
            for name in re.findall(r"\{([^{}]*)\}", argument):
                if name not in HOOK_PLACEHOLDERS:
                    known = ", ".join(sorted(HOOK_PLACEHOLDERS))
                    problem("hooks", f"{where}: unknown placeholder {{{name}}} (known: {known})")
        timeout, retries = entry.get("timeout", 3600), entry.get("retries", 2)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            problem("hooks", f"{where}: timeout must be a number of seconds > 0")
            continue
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            problem("hooks", f"{where}: retries must be a whole number from 0 to 10")
            continue
        hooks.append(
            Hook(
                command=arguments,
                timeout=float(timeout),
                retries=retries,
                name=str(entry.get("name", "")),
            )
        )
    return tuple(hooks)


#: What RE2 leaves out, and what to write instead.
_RE2_HINTS = (
    ("invalid perl operator: (?=", "look-aheads are not supported: match the text itself"),
    ("invalid perl operator: (?!", "negative look-aheads are not supported"),
    ("invalid perl operator: (?<", "look-behinds are not supported"),
    ("invalid escape sequence: \\", "back-references (\\1) are not supported"),
)


def compile_pattern(text: str) -> Any:
    """Compile a rule's pattern with RE2, whose matching is linear in the
    value's length whatever the pattern (no catastrophic backtracking).
    Raises ValueError with RE2's reason and, for what RE2 leaves out
    (look-arounds, back-references), a hint. Nothing goes to stderr."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(text, options)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        message = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        for start, hint in _RE2_HINTS:
            if message.startswith(start):
                message = f"{message} ({hint}; patterns are RE2 expressions)"
                break
        raise ValueError(message) from None


def parse_conditions(
    match: Any, problem: Any, lines: Mapping[str, int] | None = None
) -> tuple[Condition, ...]:
    """A `match:` map (or a lab's claim) as conditions; each problem goes to
    `problem(key, message)`, `key` being the line's key in `lines`."""
    lines = lines or {}
    if match is None:
        return ()
    if not isinstance(match, dict):
        problem("match", "match must map DICOM keywords to regular expressions ({} matches all)")
        return ()
    conditions = []
    for keyword, pattern in match.items():
        key = f"match.{keyword}"
        try:
            template.check_field_name(str(keyword), f"match: {keyword}")
        except template.TemplateError as error:
            problems_line = key if key in lines else "match"
            problem(problems_line, str(error))
            continue
        if not isinstance(pattern, str | int | float) or isinstance(pattern, bool):
            problem(key, f"match.{keyword} must be a regular expression (a string)")
            continue
        try:
            compiled = compile_pattern(str(pattern))
        except ValueError as error:
            problem(key, f"bad regular expression for {keyword}: {error}")
            continue
        conditions.append(Condition(field=str(keyword), pattern=compiled))
    return tuple(conditions)


class RuleBook:
    """The rules in force for a long-running daemon.

    `refresh` reloads the folder when a file was added, changed or removed
    (or a lab folder's mode or group changed). A file that now has a
    problem keeps its last good version in force, and its problems are
    reported once per change.
    """

    def __init__(
        self,
        directory: str | Path,
        labs: Mapping[str, Lab] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.labs = labs
        self.ruleset = RuleSet()
        self._good: dict[Path, Rule] = {}
        self._signature: tuple[object, ...] | None = None
        #: With a resolver, a lab rule whose destination does not answer is
        #: not loaded (its last good version stays), and the folder is
        #: loaded again once that destination answers.
        self.resolver = resolver

    def refresh(self) -> list[RuleError] | None:
        """Reload if anything changed: return the problems found (maybe
        empty), or None when nothing changed."""
        try:
            found = survey(self.directory, self.labs)
        except RuleError as error:
            found = Survey(problems=[error])
        waited = self.resolver is not None and self.resolver.answered()
        if found.signature == self._signature and not waited:
            return None
        self._signature = found.signature
        if self.resolver is not None:
            self.resolver.begin()
        problems = list(found.problems)
        present = {entry.path: entry for entry in found.files}
        for path in list(self._good):
            if path not in present:
                del self._good[path]
        for path, entry in sorted(present.items()):
            rule, more = load_rule_file(path, self.labs, entry.tenant, self.resolver or _realpath)
            problems.extend(more)
            if rule is not None:
                self._good[path] = rule
            elif path in self._good:
                problems.append(
                    RuleError(str(path), 1, "the last good version of this file stays in force")
                )
        rules: list[Rule] = []
        for path, rule in sorted(self._good.items()):
            if any(existing.name == rule.name for existing in rules):
                problems.append(_duplicate_name(path, rule.name))
                continue
            rules.append(rule)
        self.ruleset = RuleSet(
            rules=tuple(rules), problems=tuple(problems), warnings=tuple(found.warnings)
        )
        return problems
