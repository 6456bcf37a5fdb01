"""Lab rule files: loading, validation and matching.

A rule file is declarative YAML, read with `yaml.safe_load`; nothing in it is
ever evaluated. Validation collects every problem of every file, each as a
`RuleError` that prints as `file:line: message`, and a file with a problem
does not stop the others from loading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from watcher import template
from watcher.errors import RuleError

RULE_KEYS = frozenset({"name", "description", "match", "destination", "path"})
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
class Rule:
    """One lab's rule: which instances, where to, under which names."""

    name: str
    source: str
    match: tuple[Condition, ...]
    destination: Path
    path: template.Template

    @property
    def fields(self) -> frozenset[str]:
        return self.path.fields | {c.field.split(".")[0] for c in self.match}

    def matches(self, values: Mapping[str, str]) -> bool:
        return all(condition.value_matches(values) for condition in self.match)


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision for one instance and one rule: where it goes, and
    the field values that decided the match."""

    rule: Rule
    relative_path: str
    decided_by: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RuleSet:
    """The rules in force. `route` gives every rule's decision for an instance;
    an empty list is the "unmatched" decision."""

    rules: tuple[Rule, ...] = ()
    problems: tuple[RuleError, ...] = ()
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", frozenset().union(*(r.fields for r in self.rules)))

    def route(self, values: Mapping[str, str]) -> list[Route]:
        return [
            Route(
                rule=rule,
                relative_path=rule.path.render(values),
                decided_by=tuple((c.field, template.lookup(values, c.field)) for c in rule.match),
            )
            for rule in self.rules
            if rule.matches(values)
        ]


def load_rules(directory: str | Path) -> RuleSet:
    """Load every rule file in `directory`; problems are collected, not raised.

    Raises `RuleError` only when the folder itself cannot be read.
    """
    folder = Path(directory)
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file())
    except OSError as error:
        raise RuleError(str(folder), 0, f"cannot read the rules folder: {error.strerror}") from error
    rules: list[Rule] = []
    problems: list[RuleError] = []
    for path in files:
        rule, found = load_rule_file(path)
        problems.extend(found)
        if rule is not None:
            if any(existing.name == rule.name for existing in rules):
                problems.append(RuleError(str(path), 1, f"a rule named {rule.name!r} already exists"))
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


def load_rule_file(path: Path) -> tuple[Rule | None, list[RuleError]]:
    """Parse and validate one rule file; return the rule (or None) and its problems."""
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
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(error, "problem", None) or str(error)
        return None, [RuleError(source, line, f"not valid YAML: {reason}")]
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        return None, [RuleError(source, 1, "a rule file must be a mapping of keys to values")]
    return _validate(source, path.stem, data, _key_lines(node))


def _key_lines(node: yaml.MappingNode) -> dict[str, int]:
    """Line of each key, as `key` and `key.subkey` for nested mappings."""
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

    if problems or parsed is None or not isinstance(destination, str):
        return None, problems
    folder = Path(destination).expanduser()
    if not folder.is_absolute():
        folder = Path(os.path.normpath(Path(source).parent.absolute() / folder))
    return Rule(
        name=str(name), source=source, match=conditions, destination=folder, path=parsed
    ), problems


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


def describe(rules: Iterable[Rule]) -> str:
    return ", ".join(rule.name for rule in rules) or "(none)"


class RuleBook:
    """The rules in force for a long-running daemon.

    `refresh` reloads the folder when a file was added, changed or removed.
    A file that now has a problem keeps its last good version in force, and
    its problems are reported once per change.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
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
            rule, found = load_rule_file(path)
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
                problems.append(RuleError(str(path), 1, f"a rule named {rule.name!r} already exists"))
                continue
            rules.append(rule)
        self.ruleset = RuleSet(rules=tuple(rules), problems=tuple(problems))
        return problems
