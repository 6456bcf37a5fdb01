"""A fast header reader for the common case, with pydicom as the fallback.

Nearly every file an SCP writes is a Part 10 file in little endian (implicit
or explicit VR, compressed syntaxes included) whose wanted values are plain
ASCII. For those, this module walks the element headers itself, keeps the
bytes of the few wanted elements and skips every other value without reading
it, which is several times cheaper than building a pydicom data set; the same
walk, carried on past the pixel data, checks that the file is whole. Anything
else (big endian, deflate, non-ASCII text, odd structure) raises `Fallback`,
and `headers.read_instance` reads the file with pydicom instead.
"""

from __future__ import annotations

import functools
import os
import struct

from watcher.dictionary import dictionary_vr, keyword_for_tag
from watcher.errors import NotRoutable

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
#: Syntaxes this reader leaves to pydicom: explicit big endian, deflated.
FALLBACK_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
#: Item, item delimiter, sequence delimiter.
ITEM_TAGS = frozenset({0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD})
#: The elements of the delimiters.
DELIMITERS = frozenset({0xE00D, 0xE0DD})
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
#: The first read of a file: most headers fit (a Siemens MR one, with its
#: CSA header, takes 10 to 15 KB), and a large image is not read in vain.
FIRST_READ = 16 * 1024
#: Each further read of a header that is larger.
WINDOW = 64 * 1024
#: Longer values are decoded without being remembered.
MEMO_VALUE_BYTES = 256

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<L").unpack_from
_tag = struct.Struct("<HH").unpack_from
#: An element header with its tag as one number (see `_key`).
_implicit_header = struct.Struct("<LL").unpack_from
_explicit_header = struct.Struct("<L2sH").unpack_from


class Fallback(Exception):
    """This file needs pydicom."""


class _Reader:
    """A file's bytes through a window, read with pread: `buffer` holds them
    from `base` on, and skipped values are never read at all."""

    def __init__(self, fd: int, size: int, head: bytes) -> None:
        self.fd = fd
        self.size = size
        self.base = 0
        self.buffer = head

    def bytes_at(self, offset: int, count: int) -> bytes:
        end = offset + count
        held = self.base + len(self.buffer)
        if offset < self.base or (end > held and held < self.size):
            self.buffer = os.pread(self.fd, max(count, WINDOW), offset)
            self.base = offset
        start = offset - self.base
        return self.buffer[start : start + count]


def read_values(fd: int, size: int, head: bytes, tags: list[int]) -> tuple[dict[str, str], str]:
    """Read a Part 10 file whose preamble was seen in `head` (its first bytes,
    up to `FIRST_READ`), and check that it is whole.

    Returns (values by keyword, Media Storage SOP Class UID). Raises
    `NotRoutable` when the file is cut short (in its header, its pixel data or
    after), `Fallback` when pydicom should read it.
    """
    reader = _Reader(fd, size, head)
    meta: dict[int, bytes] = {}
    offset = _walk_meta(reader, meta)
    syntax = _ascii(meta.get(TRANSFER_SYNTAX_TAG, b""))
    if not syntax or syntax in FALLBACK_SYNTAXES:
        raise Fallback(syntax or "no transfer syntax")
    implicit = syntax == IMPLICIT_LITTLE
    raw: dict[int, tuple[bytes, bytes]] = {}
    pixel = _walk_data_set(reader, offset, implicit, _stops(tuple(tags)), raw)
    if pixel is not None:
        _walk_to_end(reader, pixel, implicit)
    return _decode(raw), _ascii(meta.get(SOP_CLASS_TAG, b""))


def _walk_meta(reader: _Reader, found: dict[int, bytes]) -> int:
    """Read the File Meta group (explicit VR) from offset 132, keeping the
    SOP class and the transfer syntax; return where the data set starts."""
    offset = 132
    while offset + 8 <= reader.size:
        buffer, at = reader.buffer, offset - reader.base
        if not 0 <= at <= len(buffer) - 12:
            buffer, at = reader.bytes_at(offset, 12), 0
        key, vr, length = _explicit_header(buffer, at)
        if key & 0xFFFF != 0x0002:
            return offset
        if vr not in SHORT_VRS:
            length, header_length, _ = _header(buffer[at : at + 12], False)
        else:
            header_length = 8
        if length == UNDEFINED:
            raise Fallback("undefined length in the File Meta")
        tag = 0x00020000 | key >> 16
        if tag in (SOP_CLASS_TAG, TRANSFER_SYNTAX_TAG):
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


#: In `_stops`, what a tag that is not wanted stops the walk for.
PIXEL_OR_ITEM = 0


@functools.lru_cache(maxsize=16)
def _stops(tags: tuple[int, ...]) -> dict[int, int]:
    """The tags the walk stops at (wanted ones, pixel data, items), keyed as
    their four bytes read as one little-endian number: wanted tags map to
    themselves, the others to `PIXEL_OR_ITEM`."""
    stops = {_key(tag): PIXEL_OR_ITEM for tag in (*PIXEL_TAGS, *ITEM_TAGS)}
    stops.update((_key(tag), tag) for tag in tags)
    return stops


def _key(tag: int) -> int:
    return (tag >> 16) | (tag & 0xFFFF) << 16


def _walk_data_set(
    reader: _Reader,
    offset: int,
    implicit: bool,
    stops: dict[int, int],
    raw: dict[int, tuple[bytes, bytes]],
) -> int | None:
    """Walk the top-level elements up to the pixel data, keeping the wanted
    ones; return the pixel data's offset (None when there is none)."""
    size = reader.size
    while True:
        # The hot loop of header reading (about a hundred elements a file):
        # element headers are unpacked in place and wanted values sliced out
        # while they lie inside the window; anything else (the pixel data, an
        # item, an undefined length, an odd VR, the window's end) is left to
        # the one-element step below.
        buffer = reader.buffer
        held = len(buffer)
        at, limit = offset - reader.base, held - 12
        if at >= 0:
            if implicit:
                while at <= limit:
                    key, length = _implicit_header(buffer, at)
                    if length == UNDEFINED:
                        break
                    end = at + 8 + length
                    if key in stops:
                        tag = stops[key]
                        if not tag or end > held:
                            break
                        raw[tag] = (b"", buffer[at + 8 : end])
                    at = end
            else:
                while at <= limit:
                    key, vr, length = _explicit_header(buffer, at)
                    if vr in SHORT_VRS:
                        start = at + 8
                    elif vr in LONG_VRS:
                        length = _u32(buffer, at + 8)[0]
                        if length == UNDEFINED:
                            break
                        start = at + 12
                    else:
                        break
                    end = start + length
                    if key in stops:
                        tag = stops[key]
                        if not tag or end > held:
                            break
                        raw[tag] = (vr, buffer[start:end])
                    at = end
            offset = reader.base + at
        if offset >= size:
            if offset > size:
                raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
            return None
        header = reader.bytes_at(offset, 12)
        if len(header) < 8:
            raise NotRoutable(f"truncated: {size} bytes end inside an element header")
        group, element = _tag(header)
        if group == 0x7FE0 and (group << 16 | element) in PIXEL_TAGS:
            return offset
        if group == 0xFFFE:
            raise Fallback("item tag at the top level")
        length, header_length, vr = _header(header, implicit)
        start = offset + header_length
        if length == UNDEFINED:
            offset = _skip_undefined(reader, start, implicit)
            continue
        offset = start + length
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
        wanted = stops.get(group | element << 16)
        if wanted:
            raw[wanted] = (vr, reader.bytes_at(start, length))


def _skip_undefined(reader: _Reader, offset: int, implicit: bool) -> int:
    """Skip a sequence (or item) of undefined length; return where it ends."""
    depth = 1
    size = reader.size
    while True:
        # Items, delimiters and nested elements are stepped over in place
        # while they lie well inside the window, as in `_walk_data_set`.
        buffer = reader.buffer
        at, limit = offset - reader.base, len(buffer) - 12
        while 0 <= at <= limit:
            key, length = _implicit_header(buffer, at)
            if key & 0xFFFF == 0xFFFE:  # an item or a delimiter: no VR
                at += 8
                if key >> 16 in DELIMITERS:
                    depth -= 1
                    if not depth:
                        break
                elif length == UNDEFINED:
                    depth += 1
                else:
                    at += length
                continue
            if implicit:
                at += 8
            else:
                vr = buffer[at + 4 : at + 6]
                if vr in SHORT_VRS:
                    at += 8 + _u16(buffer, at + 6)[0]
                    continue
                if vr not in LONG_VRS:
                    break  # an odd VR: the step below decides
                length = _u32(buffer, at + 8)[0]
                at += 12
            if length == UNDEFINED:
                depth += 1
            else:
                at += length
        offset = reader.base + at
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
        if not depth:
            return offset
        header = reader.bytes_at(offset, 12)
        if len(header) < 8:
            raise NotRoutable("truncated: a sequence is not closed")
        offset, opens, closes = _step(header, offset, implicit)
        depth += opens - closes
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
        if not depth:
            return offset


def _walk_to_end(reader: _Reader, offset: int, implicit: bool) -> None:
    """Step from the pixel data to the end of the file. A declared length
    that runs past the end, or encapsulated pixel data (or a sequence) left
    open at the end, means the file is truncated."""
    size = reader.size
    depth = 0
    while offset < size:
        header = reader.bytes_at(offset, 12)
        if len(header) < 8:
            raise NotRoutable(f"truncated: {size} bytes end inside an element header")
        offset, opens, closes = _step(header, offset, implicit)
        depth += opens - closes
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
    if depth > 0:
        raise NotRoutable("truncated: a sequence or the pixel data is not closed")


def _step(header: bytes, offset: int, implicit: bool) -> tuple[int, int, int]:
    """(offset after this element or item, opens a container, closes one)."""
    group, element = _tag(header)
    if group == 0xFFFE:  # items and delimiters: tag + 4-byte length, no VR
        length = _u32(header, 4)[0]
        if element in DELIMITERS:
            return offset + 8, 0, 1
        if length == UNDEFINED:
            return offset + 8, 1, 0
        return offset + 8 + length, 0, 0
    length, header_length, _ = _header(header, implicit)
    if length == UNDEFINED:
        return offset + header_length, 1, 0
    return offset + header_length + length, 0, 0


def _ascii(value: bytes) -> str:
    return value.decode("ascii", errors="replace").strip("\x00 ")


def _decode(raw: dict[int, tuple[bytes, bytes]]) -> dict[str, str]:
    """Values as `headers` renders them; non-ASCII text goes to pydicom."""
    values: dict[str, str] = {}
    for tag, (vr, value) in raw.items():
        if len(value) <= MEMO_VALUE_BYTES:
            text = _decode_value(tag, vr, value)
        else:
            text = _decode_value.__wrapped__(tag, vr, value)
        if text is not None:
            values[_keyword(tag)] = text
    return values


@functools.lru_cache(maxsize=4096)
def _decode_value(tag: int, vr_bytes: bytes, value: bytes) -> str | None:
    """One value as text (None for a binary one). Remembered: most values of
    a series (its patient, study, series, dates) repeat in every file."""
    vr = vr_bytes.decode("ascii") if vr_bytes and vr_bytes != b"UN" else _dictionary_vr(tag)
    if vr in BINARY_VRS:
        return None
    if vr in NUMBER_FORMATS:
        code = NUMBER_FORMATS[vr]
        count = len(value) // struct.calcsize(code)
        numbers = struct.unpack(f"<{count}{code}", value[: count * struct.calcsize(code)])
        return "\\".join(str(n) for n in numbers)
    if not value.isascii() or b"\x1b" in value:
        raise Fallback("non-ASCII text, or ISO 2022 escapes")
    text = value.decode("ascii")
    if vr in SINGLE_VALUED_TEXT:
        return text.rstrip("\x00 ")
    parts = [part.strip("\x00 ") for part in text.split("\\")]
    if vr == "PN":
        parts = [_person_name(part) for part in parts]
    return "\\".join(parts)


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
