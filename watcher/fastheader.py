"""A fast header reader for the common case, with pydicom as the fallback.

Nearly every file an SCP writes is a Part 10 file in little endian (implicit
or explicit VR, compressed syntaxes included) whose wanted values are plain
ASCII. For those, this module walks the element headers itself, keeps the
bytes of the few wanted elements and skips every other value without reading
it, which is several times cheaper than building a pydicom data set. Anything
else (big endian, deflate, non-ASCII text, odd structure) raises `Fallback`,
and `headers.read_instance` reads the file with pydicom instead.
"""

from __future__ import annotations

import functools
import struct
from typing import BinaryIO

from watcher.dictionary import dictionary_vr, keyword_for_tag
from watcher.errors import NotRoutable

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
#: Syntaxes this reader leaves to pydicom: explicit big endian, deflated.
FALLBACK_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
#: Explicit VRs with a 2-byte length.
SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ", "AT"})
NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})
UNDEFINED = 0xFFFFFFFF
CHARSET_TAG = 0x00080005
SOP_CLASS_TAG = 0x00020002
TRANSFER_SYNTAX_TAG = 0x00020010
WINDOW = 64 * 1024

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<L").unpack_from
_tag = struct.Struct("<HH").unpack_from
_implicit_header = struct.Struct("<HHL").unpack_from
_explicit_header = struct.Struct("<HH2sH").unpack_from


class Fallback(Exception):
    """This file needs pydicom."""


class _Reader:
    """Reads a file through a window of bytes, so that skipped values are
    never read at all."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        self.base = 0
        self.buffer = b""

    def bytes_at(self, offset: int, count: int) -> bytes:
        end = offset + count
        if offset < self.base or end > self.base + len(self.buffer):
            self.fp.seek(offset)
            self.buffer = self.fp.read(max(count, WINDOW))
            self.base = offset
        start = offset - self.base
        return self.buffer[start : start + count]


def read_values(
    fp: BinaryIO, size: int, tags: list[int]
) -> tuple[dict[str, str], str, bool, int | None]:
    """Read a Part 10 file whose preamble was seen.

    Returns (values by keyword, Media Storage SOP Class UID, implicit VR,
    offset of the pixel data element or None). Raises `NotRoutable` when the
    file is cut short inside its header, `Fallback` when pydicom should read it.
    """
    reader = _Reader(fp, size)
    wanted = frozenset(tags)
    meta: dict[int, bytes] = {}
    offset = _walk_elements(
        reader, 132, False, frozenset({SOP_CLASS_TAG, TRANSFER_SYNTAX_TAG}), meta, group=0x0002
    )
    syntax = _ascii(meta.get(TRANSFER_SYNTAX_TAG, b""))
    if not syntax or syntax in FALLBACK_SYNTAXES:
        raise Fallback(syntax or "no transfer syntax")
    implicit = syntax == IMPLICIT_LITTLE
    raw: dict[int, tuple[bytes, bytes]] = {}
    pixel = _walk_data_set(reader, offset, implicit, wanted, raw)
    return _decode(raw), _ascii(meta.get(SOP_CLASS_TAG, b"")), implicit, pixel


def _walk_elements(
    reader: _Reader,
    offset: int,
    implicit: bool,
    wanted: frozenset[int],
    found: dict[int, bytes],
    group: int,
) -> int:
    """Read the elements of one group (the File Meta); return where it ends."""
    while offset + 8 <= reader.size:
        header = reader.bytes_at(offset, 12)
        element_group, element = _tag(header)
        if element_group != group:
            return offset
        tag = element_group << 16 | element
        length, header_length, _ = _header(header, implicit)
        if length == UNDEFINED:
            raise Fallback("undefined length in the File Meta")
        if tag in wanted:
            found[tag] = reader.bytes_at(offset + header_length, length)
        offset += header_length + length
    return offset


def _header(header: bytes, implicit: bool) -> tuple[int, int, bytes]:
    """(value length, header length, VR bytes or b"") of an element header."""
    vr = header[4:6]
    if implicit or not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        return _u32(header, 4)[0], 8, b""
    if vr in LONG_VRS:
        if len(header) < 12:
            raise NotRoutable("truncated: the file ends inside an element header")
        return _u32(header, 8)[0], 12, vr
    return _u16(header, 6)[0], 8, vr


def _walk_data_set(
    reader: _Reader,
    offset: int,
    implicit: bool,
    wanted: frozenset[int],
    raw: dict[int, tuple[bytes, bytes]],
) -> int | None:
    """Walk the top-level elements up to the pixel data, keeping the wanted
    ones; return the pixel data's offset (None when there is none)."""
    size = reader.size
    # The hot loop of header reading (about a hundred elements a file): the
    # window's bytes are unpacked in place while the element header lies
    # inside it (nearly always), and `_header` is inlined.
    buffer, base = reader.buffer, reader.base
    while offset < size:
        at = offset - base
        if at < 0 or at + 12 > len(buffer):
            reader.bytes_at(offset, 12)
            buffer, base = reader.buffer, reader.base
            at = offset - base
            if len(buffer) - at < 8:
                raise NotRoutable(f"truncated: {size} bytes end inside an element header")
        if implicit:
            group, element, length = _implicit_header(buffer, at)
            header_length, vr = 8, b""
        else:
            group, element, vr, length = _explicit_header(buffer, at)
            if vr in SHORT_VRS:
                header_length = 8
            elif vr in LONG_VRS:
                if len(buffer) - at < 12:
                    raise NotRoutable("truncated: the file ends inside an element header")
                length, header_length = _u32(buffer, at + 8)[0], 12
            else:  # a VR this reader does not know: as `_header` decides
                length, header_length, vr = _header(buffer[at : at + 12], False)
        if group == 0x7FE0 and (group << 16 | element) in PIXEL_TAGS:
            return offset
        if group == 0xFFFE:
            raise Fallback("item tag at the top level")
        start = offset + header_length
        if length == UNDEFINED:
            offset = _skip_undefined(reader, start, implicit)
            buffer, base = reader.buffer, reader.base
            continue
        offset = start + length
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
        tag = group << 16 | element
        if tag in wanted:
            raw[tag] = (vr, reader.bytes_at(start, length))
            buffer, base = reader.buffer, reader.base
    return None


def _skip_undefined(reader: _Reader, offset: int, implicit: bool) -> int:
    """Skip a sequence (or item) of undefined length; return where it ends."""
    depth = 1
    size = reader.size
    while depth:
        header = reader.bytes_at(offset, 12)
        if len(header) < 8:
            raise NotRoutable("truncated: a sequence is not closed")
        group, element = _tag(header)
        if group == 0xFFFE:
            length = _u32(header, 4)[0]
            offset += 8
            if element in (0xE00D, 0xE0DD):
                depth -= 1
            elif length == UNDEFINED:
                depth += 1
            else:
                offset += length
        else:
            length, header_length, _ = _header(header, implicit)
            offset += header_length
            if length == UNDEFINED:
                depth += 1
            else:
                offset += length
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
    return offset


def _ascii(value: bytes) -> str:
    return value.decode("ascii", errors="replace").strip("\x00 ")


def _decode(raw: dict[int, tuple[bytes, bytes]]) -> dict[str, str]:
    """Values as `headers` renders them; non-ASCII text goes to pydicom."""
    values: dict[str, str] = {}
    for tag, (vr_bytes, value) in raw.items():
        vr = vr_bytes.decode("ascii") if vr_bytes and vr_bytes != b"UN" else _dictionary_vr(tag)
        if vr in BINARY_VRS:
            continue
        keyword = _keyword(tag)
        if vr in NUMBER_FORMATS:
            code = NUMBER_FORMATS[vr]
            count = len(value) // struct.calcsize(code)
            numbers = struct.unpack(f"<{count}{code}", value[: count * struct.calcsize(code)])
            values[keyword] = "\\".join(str(n) for n in numbers)
            continue
        if not value.isascii() or b"\x1b" in value:
            raise Fallback("non-ASCII text, or ISO 2022 escapes")
        text = value.decode("ascii")
        if vr in SINGLE_VALUED_TEXT:
            values[keyword] = text.rstrip("\x00 ")
            continue
        parts = [part.strip("\x00 ") for part in text.split("\\")]
        if vr == "PN":
            parts = [_person_name(part) for part in parts]
        values[keyword] = "\\".join(parts)
    return values


def _person_name(text: str) -> str:
    groups = text.split("=")
    for group in groups[:3]:
        cleaned = group.rstrip("^ ")
        if cleaned:
            return cleaned
    return ""


@functools.lru_cache(maxsize=1024)
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag)


@functools.lru_cache(maxsize=1024)
def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_vr(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]
