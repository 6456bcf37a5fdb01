"""Path templates and the sanitization of rendered names. Pure: no I/O.

A template is a relative path whose components mix literal text and
placeholders:

    {Keyword}                  the value of a DICOM field, e.g. {PatientID}
    {Keyword:0Nd}              a number zero-padded to N digits, e.g. {SeriesNumber:03d}
    {A|B|C}                    the first of A, B, C that has a non-empty value,
                               e.g. {ProtocolName|SeriesDescription}
    {PatientName.family}       a component of a person name: family, given,
                               middle, prefix, suffix

A field that is missing or empty in every alternative renders as
`MISSING_VALUE`. Every rendered component is made safe by `safe_component`, so
a header value can never add a path separator, climb out with `..`, hide a
file, or produce a name that a Windows/SMB share rejects.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

from watcher.dictionary import tag_for_keyword

#: What a missing or empty value renders as.
MISSING_VALUE = "unknown"
#: Longest component, in bytes of UTF-8 (the limit of ext4, XFS, NTFS, SMB).
MAX_COMPONENT_BYTES = 255

#: Fields that are the same for every instance of a study (patient and study
#: level): the folders a template builds from them alone are the study's folder.
STUDY_LEVEL_FIELDS = frozenset(
    {
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "StudyInstanceUID",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "AccessionNumber",
        "ReferringPhysicianName",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "RequestingPhysician",
        "RequestedProcedureDescription",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
    }
)
PERSON_NAME_PARTS = {"family": 0, "given": 1, "middle": 2, "prefix": 3, "suffix": 4}
UNSAFE_CHARACTERS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f-\x9f]')
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{device}{n}" for device in ("COM", "LPT") for n in "123456789¹²³"]
)
#: Renderings of one path component remembered at most (then forgotten at once).
MEMO_SIZE = 4096
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(\.[a-z]+)?")
NUMBER_FORMAT = re.compile(r"0(\d{1,2})d")
# Trailing dots and blanks (Unicode ones too, as `str.strip` sees them).
TRAILING_DOTS_AND_BLANKS = re.compile(r"[.\s]+\Z")


class TemplateError(ValueError):
    """A malformed template; the message names the offending part."""


@dataclass(frozen=True, slots=True)
class Field:
    """One placeholder: alternatives tried in order, and an optional padding."""

    alternatives: tuple[str, ...]
    width: int | None = None

    def render(self, values: Mapping[str, str]) -> str:
        for name in self.alternatives:
            value = lookup(values, name)
            if value:
                return _pad(value, self.width) if self.width else value
        return MISSING_VALUE


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed path template: per component, a list of literals and fields."""

    source: str
    components: tuple[tuple[str | Field, ...], ...]
    #: Per component: the keywords it reads, and its renderings by their values.
    _memo: tuple[tuple[tuple[str, ...], dict[tuple[str | None, ...], str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        memo: tuple[tuple[tuple[str, ...], dict[tuple[str | None, ...], str]], ...] = tuple(
            (
                tuple(
                    dict.fromkeys(
                        name.partition(".")[0]
                        for part in component
                        if isinstance(part, Field)
                        for name in part.alternatives
                    )
                ),
                {},
            )
            for component in self.components
        )
        object.__setattr__(self, "_memo", memo)

    @property
    def fields(self) -> frozenset[str]:
        """The DICOM keywords this template reads."""
        return frozenset(
            name.split(".")[0]
            for component in self.components
            for part in component
            if isinstance(part, Field)
            for name in part.alternatives
        )

    @property
    def study_depth(self) -> int:
        """How many leading folders depend on study-level fields only."""
        depth = 0
        for component in self.components[:-1]:
            names = {
                name.split(".")[0]
                for part in component
                if isinstance(part, Field)
                for name in part.alternatives
            }
            if not names <= STUDY_LEVEL_FIELDS:
                break
            depth += 1
        return depth

    def study_folder(self, relative_path: str) -> str:
        """The study's folder within a path this template rendered ("" for the root)."""
        return "/".join(relative_path.split("/")[: self.study_depth])

    def render(self, values: Mapping[str, str]) -> str:
        """The relative path for an instance with these values; always safe."""
        rendered = []
        for component, (keywords, memo) in zip(self.components, self._memo, strict=True):
            # Folders repeat for every instance of a series: each component
            # is rendered once per distinct set of the values it reads.
            key = tuple([values.get(keyword) for keyword in keywords])
            text = memo.get(key)
            if text is None:
                text = safe_component(
                    "".join(
                        part if isinstance(part, str) else safe_value(part.render(values))
                        for part in component
                    )
                )
                if len(memo) >= MEMO_SIZE:
                    memo.clear()
                memo[key] = text
            rendered.append(text)
        return "/".join(rendered)


def parse(source: str) -> Template:
    """Parse a template, raising `TemplateError` on any malformed part."""
    if not isinstance(source, str) or not source.strip():
        raise TemplateError("the path template is empty")
    if source.startswith("/"):
        raise TemplateError("the path template must be relative to the destination")
    components = []
    for text in source.split("/"):
        if text in ("", ".", ".."):
            raise TemplateError(
                f"the path template has an empty, '.' or '..' component: {source!r}"
            )
        components.append(_parse_component(text))
    return Template(source=source, components=tuple(components))


def _parse_component(text: str) -> tuple[str | Field, ...]:
    parts: list[str | Field] = []
    position = 0
    for match in PLACEHOLDER.finditer(text):
        literal = text[position : match.start()]
        _check_literal(literal)
        if literal:
            parts.append(literal)
        parts.append(_parse_field(match.group(1)))
        position = match.end()
    rest = text[position:]
    _check_literal(rest)
    if rest:
        parts.append(rest)
    return tuple(parts)


def _check_literal(literal: str) -> None:
    if "{" in literal or "}" in literal:
        raise TemplateError(f"unbalanced brace in {literal!r}")
    if UNSAFE_CHARACTERS.search(literal):
        raise TemplateError(f"unsafe character in the template text {literal!r}")


def _parse_field(body: str) -> Field:
    spec, _, fmt = body.partition(":")
    width = None
    if _:
        number = NUMBER_FORMAT.fullmatch(fmt)
        if not number:
            raise TemplateError(f"bad format {{{body}}}: only ':0Nd' (zero-padded number) is known")
        width = int(number.group(1))
    alternatives = tuple(name.strip() for name in spec.split("|"))
    for name in alternatives:
        check_field_name(name, f"{{{body}}}")
    return Field(alternatives=alternatives, width=width)


def check_field_name(name: str, where: str) -> None:
    """Raise `TemplateError` unless `name` is a DICOM keyword (or `Name.part`)."""
    if not FIELD_NAME.fullmatch(name):
        raise TemplateError(f"malformed placeholder {where}")
    keyword, _, part = name.partition(".")
    if not tag_for_keyword(keyword):
        raise TemplateError(f"unknown DICOM keyword {keyword!r} in {where}")
    if part and part not in PERSON_NAME_PARTS:
        known = ", ".join(PERSON_NAME_PARTS)
        raise TemplateError(f"unknown name part {part!r} in {where} (known: {known})")


def lookup(values: Mapping[str, str], name: str) -> str:
    """The value of `Keyword` or of a person-name part `Keyword.part`."""
    keyword, _, part = name.partition(".")
    value = values.get(keyword, "")
    if not part or not value:
        return value
    components = value.split("\\")[0].split("^")
    index = PERSON_NAME_PARTS[part]
    return components[index].strip() if index < len(components) else ""


def _pad(value: str, width: int) -> str:
    text = value.split("\\")[0].strip()
    try:
        number = int(float(text)) if "." in text else int(text)
    except (ValueError, OverflowError):  # not a number, or too large for one ("1.e999")
        return value
    sign = "-" if number < 0 else ""
    return sign + str(abs(number)).zfill(width - len(sign))


# --- sanitization ------------------------------------------------------------


@functools.lru_cache(maxsize=8192)  # study-level values repeat for every instance
def safe_value(value: str) -> str:
    """A header value with everything that could act as structure replaced.

    Separators (`/`, the multi-value `\\`), control characters, NUL and the
    characters Windows shares reject become `_`. Letters of every script stay.
    """
    text = unicodedata.normalize("NFC", value)
    text = UNSAFE_CHARACTERS.sub("_", text)
    return "".join("_" if unicodedata.category(char) in ("Cc", "Cs") else char for char in text)


@functools.lru_cache(maxsize=8192)
def safe_component(text: str) -> str:
    """One path component that every common filesystem and share accepts.

    No separators or control characters, no leading dot (so never `.`, `..` or
    a hidden file) or dash (never read as an option), no trailing dot or space,
    not a Windows device name, never empty, and at most 255 bytes of UTF-8
    with the extension kept and no character cut in half.
    """
    text = safe_value(text).strip()
    if text.startswith((".", "-")):  # hidden, `.`/`..`, or read as an option by tools
        text = "_" + text[1:]
    text = TRAILING_DOTS_AND_BLANKS.sub("", text)
    if not text:
        return MISSING_VALUE
    if text.split(".")[0].upper().rstrip(" ") in WINDOWS_RESERVED:
        text = "_" + text
    return fit(text, MAX_COMPONENT_BYTES)


def fit(name: str, limit: int) -> str:
    """Shorten `name` to `limit` bytes of UTF-8, keeping a short extension.

    A shortened name ends with a hash of the whole name, so two long names
    that share a prefix stay apart.
    """
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not 0 < len(extension) <= 16 or not stem:
        stem, extension = name, ""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    tail = f"~{digest}" + (f".{extension}" if extension else "")
    budget = limit - len(tail.encode("utf-8"))
    shortened = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(". ")
    return shortened + tail


def with_suffix(name: str, suffix: str) -> str:
    """`name` with `~suffix` before its extension, still within the limit."""
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > 16:
        stem, extension = name, ""
    tail = f"~{suffix}" + (f".{extension}" if extension else "")
    budget = MAX_COMPONENT_BYTES - len(tail.encode("utf-8"))
    return stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore") + tail
