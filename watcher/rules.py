"""Lab rule files: loading, validation and matching.

A rule file is declarative YAML, read with `yaml.safe_load`; nothing in it is
ever evaluated. Validation collects every problem of every file, each as a
`RuleError` that prints as `file:line: message`, and a file with a problem
does not stop the others from loading.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher import template
from watcher.errors import RuleError

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
RULE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class Condition:
    """One `match:` entry: a field and the regular expression searched in it."""

    field: str
    pattern: re.Pattern[str]

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

    @property
    def lab_name(self) -> str:
        return self.lab or self.name

    @property
    def fields(self) -> frozenset[str]:
        extra = {PER_SERIES_COUNT} if self.expected_instances == PER_SERIES_COUNT else set()
        return self.path.fields | {c.field.split(".")[0] for c in self.match} | extra

    def matches(self, values: Mapping[str, str]) -> bool:
        return all(condition.value_matches(values) for condition in self.match)


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


@dataclass(frozen=True)
class RuleSet:
    """The rules in force. `route` gives every rule's decision for an instance;
    an empty list is the "unmatched" decision."""

    rules: tuple[Rule, ...] = ()
    problems: tuple[RuleError, ...] = ()
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.rules, key=lambda r: (-r.priority, r.name)))
        object.__setattr__(self, "rules", ordered)
        object.__setattr__(self, "fields", frozenset().union(*(r.fields for r in self.rules)))

    def matching(self, values: Mapping[str, str]) -> list[Rule]:
        """The rules that take an instance, highest priority first.

        Every matching rule gets its own copy, unless an `exclusive` rule
        matches: then the highest-priority exclusive rule takes it alone.
        """
        matched = [rule for rule in self.rules if rule.matches(values)]
        exclusive = [rule for rule in matched if rule.exclusive]
        return exclusive[:1] if exclusive else matched

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


def check_allowed(rule: Rule, allowed: Mapping[str, Sequence[Path]] | None) -> str | None:
    """Why `rule` may not write where it says, or None when it may. With no
    `allowed_destinations` in the config, every destination is allowed."""
    if allowed is None:
        return None
    roots = allowed.get(rule.lab_name)
    if not roots:
        return (
            f"lab {rule.lab_name!r} has no allowed destination in the config (allowed_destinations)"
        )
    target = Path(os.path.realpath(rule.destination))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if target == real_root or real_root in target.parents:
            return None
    listed = ", ".join(str(r) for r in roots)
    return (
        f"destination {rule.destination} is outside the folders allowed for lab "
        f"{rule.lab_name!r} ({listed})"
    )


def load_rules(
    directory: str | Path, allowed: Mapping[str, Sequence[Path]] | None = None
) -> RuleSet:
    """Load every rule file in `directory`; problems are collected, not raised.

    `allowed` maps lab names to the destination roots the operator allows
    them; a rule writing elsewhere is refused. Raises `RuleError` only when
    the folder itself cannot be read.
    """
    folder = Path(directory)
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file())
    except OSError as error:
        raise RuleError(
            str(folder), 0, f"cannot read the rules folder: {error.strerror}"
        ) from error
    rules: list[Rule] = []
    problems: list[RuleError] = []
    for path in files:
        rule, found = load_rule_file(path, allowed)
        problems.extend(found)
        if rule is not None:
            if any(existing.name == rule.name for existing in rules):
                problems.append(_duplicate_name(path, rule.name))
            else:
                rules.append(rule)
    if not files:
        problems.append(RuleError(str(folder), 0, "no rule files (*.yaml) in this folder"))
    return RuleSet(rules=tuple(rules), problems=tuple(problems))


def single_rule(destination: str | Path, path_template: str, name: str = "sort") -> RuleSet:
    """A catch-all rule, as `sort --dest DIR --path TEMPLATE` uses."""
    try:
        parsed = template.parse(path_template)
    except template.TemplateError as error:
        raise RuleError("--path", 0, str(error)) from error
    rule = Rule(name=name, source="--dest", match=(), destination=Path(destination), path=parsed)
    return RuleSet(rules=(rule,))


def load_rule_file(
    path: Path, allowed: Mapping[str, Sequence[Path]] | None = None
) -> tuple[Rule | None, list[RuleError]]:
    """Parse and validate one rule file; return the rule (or None) and its problems."""
    import yaml  # here, not above: `sort --dest` reads no YAML, and starts sooner

    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return None, [RuleError(source, 0, f"cannot read: {error}")]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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
    rule, problems = _validate(source, path.stem, data, _key_lines(node))
    if rule is not None:
        refused = check_allowed(rule, allowed)
        if refused is not None:
            line = _key_lines(node).get("destination", 1)
            return None, [RuleError(source, line, f"refused: {refused}")]
    return rule, problems


def _duplicate_name(path: Path, name: str) -> RuleError:
    """A rule name already taken, reported at the file's `name:` line (line 1
    when the name is the file's stem)."""
    import yaml

    line = 1
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
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
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problem("name", f"name must be letters, digits, '_', '.' or '-': {name!r}")

    conditions = _conditions(data.get("match"), lines, problem)
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
        if not isinstance(lab, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", lab):
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
            if mode is None:
                problem(key, f"{key} must be an octal mode such as '0640' (quote it in YAML)")
            else:
                options[key] = mode
    if "group" in data:
        gid = _group(data["group"])
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


def _group(value: Any) -> int | None:
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


def _conditions(match: Any, lines: dict[str, int], problem: Any) -> tuple[Condition, ...]:
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
            compiled = re.compile(str(pattern))
        except re.error as error:
            problem(key, f"bad regular expression for {keyword}: {error}")
            continue
        conditions.append(Condition(field=str(keyword), pattern=compiled))
    return tuple(conditions)


class RuleBook:
    """The rules in force for a long-running daemon.

    `refresh` reloads the folder when a file was added, changed or removed.
    A file that now has a problem keeps its last good version in force, and
    its problems are reported once per change.
    """

    def __init__(
        self, directory: str | Path, allowed: Mapping[str, Sequence[Path]] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.allowed = allowed
        self.ruleset = RuleSet()
        self._good: dict[Path, Rule] = {}
        self._signature: tuple[tuple[str, int, int], ...] | None = None

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError:
            return ()
        signature = []
        for path in entries:
            if path.suffix in RULE_SUFFIXES:
                try:
                    stat = path.stat()
                except OSError:
                    continue
                signature.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def refresh(self) -> list[RuleError] | None:
        """Reload if anything changed: return the problems found (maybe
        empty), or None when nothing changed."""
        signature = self._current_signature()
        if signature == self._signature:
            return None
        self._signature = signature
        problems: list[RuleError] = []
        present = {self.directory / name for name, _, _ in signature}
        for path in list(self._good):
            if path not in present:
                del self._good[path]
        for path in sorted(present):
            rule, found = load_rule_file(path, self.allowed)
            problems.extend(found)
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
        self.ruleset = RuleSet(rules=tuple(rules), problems=tuple(problems))
        return problems
