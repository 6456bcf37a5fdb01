"""Reading DICOM headers: the one module that talks to pydicom.

`read_instance` reads a file's header once (never its pixel data), checks that
the file is whole, and returns an `Instance` whose values are plain `str`.
Anything that makes a file unroutable raises `NotRoutable` with a reason fit
for one log line.

pydicom is lenient: a file cut short reads without error, and one cut inside
its header reads as an almost empty data set. So after pydicom has read the
header (for the files `fastheader` leaves to it; that module checks its own),
`_check_complete` walks the element headers that follow (the pixel data
and anything after it, or the whole data set when there is no pixel data) and
compares the lengths they declare with the size of the file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

from watcher import fastheader
from watcher.dictionary import dictionary_vr, keyword_for_tag, tag_for_keyword
from watcher.errors import NotRoutable
from watcher.placement import sha256_of_fd, start_writeback

if TYPE_CHECKING:  # pydicom itself is imported when a file first needs it
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.valuerep import PersonName

#: Fields every instance carries, whatever the rules ask for.
BASE_FIELDS: tuple[str, ...] = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "Modality",
)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
# Explicit VRs whose length field is 4 bytes, after 2 reserved bytes.
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ", "AT"})
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM_GROUP = 0xFFFE


@dataclass(frozen=True, slots=True)
class Instance:
    """One routable DICOM file: where it is, how big, and its header values."""

    path: str
    size: int
    values: Mapping[str, str]
    #: With `read_instance(digest=True)`: the SHA-256 of the whole file, and
    #: the modification time it was taken at (so a later change shows).
    sha256: str = ""
    mtime_ns: int = 0

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Pickled by the thousand to and from worker processes: as its fields,
        # which is twice as fast as a slotted dataclass's own state.
        return type(self), (self.path, self.size, self.values, self.sha256, self.mtime_ns)

    @property
    def sop_instance_uid(self) -> str:
        return self.values["SOPInstanceUID"]

    @property
    def study_instance_uid(self) -> str:
        return self.values["StudyInstanceUID"]


@functools.cache
def configure_pydicom() -> ModuleType:
    """Import pydicom (on first use: most files never need it) and quiet its
    value validation, so that odd values are read as they are."""
    import pydicom
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    # Importing pydicom.config sets its logger to WARNING: odd-but-readable
    # values would each get a bare line in the daemon's log. What matters
    # reaches the log through NotRoutable.
    logging.getLogger("pydicom").setLevel(max(logging.getLogger("pydicom").level, logging.ERROR))
    return pydicom


def tags_for(fields: Iterable[str]) -> list[int]:
    """The tags to ask pydicom for: the fields plus what decoding needs."""
    wanted = {"SpecificCharacterSet", "Rows", *BASE_FIELDS, *fields}
    return sorted(tag for tag in map(tag_for_keyword, wanted) if tag is not None)


def read_instance(
    path: str | os.PathLike[str],
    tags: list[int] | None = None,
    digest: bool = False,
    writeback: bool = False,
) -> Instance:
    """Read the header of `path` and return it as an `Instance`.

    `tags` comes from `tags_for` (the default asks for `BASE_FIELDS`). Raises
    `NotRoutable` for an empty, non-DICOM, truncated or DICOMDIR file, or one
    without the UIDs that routing needs; `OSError` when it cannot be read.
    `digest=True` also hashes the whole file (for manifests, while the file is
    in the page cache and the study still quiet); `writeback=True` starts
    writing its data to disk (see `placement.start_writeback`).
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_open(fd, path, tags, digest, writeback)
    finally:
        os.close(fd)


def read_open(
    fd: int,
    path: str,
    tags: list[int] | None = None,
    digest: bool = False,
    writeback: bool = False,
) -> Instance:
    """`read_instance` on a file the caller has open, and keeps open: `sort`
    copies the file from the same descriptor."""
    if tags is None:
        tags = tags_for(())
    status = os.fstat(fd)
    size = status.st_size
    if size == 0:
        raise NotRoutable("empty file (0 bytes)")
    head = os.pread(fd, fastheader.FIRST_READ, 0)
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_data_set(head):
        raise NotRoutable("not a DICOM file (no DICM prefix and no data set at its start)")
    try:
        if not has_preamble:
            raise fastheader.Fallback("no preamble")
        values, sop_class = fastheader.read_values(fd, size, head, tags)
    except fastheader.Fallback:
        with open(fd, "rb", closefd=False) as fp:
            ds = _parse(fp, force=not has_preamble, tags=tags)
            stopped_at = fp.tell()
            _check_complete(fp, ds, size, stopped_at, has_preamble)
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        values = _values(ds, tags)
    sha256 = ""
    if digest:
        sha256 = hashlib.sha256(head).hexdigest() if len(head) == size else sha256_of_fd(fd, head)
    if writeback:
        start_writeback(fd)
    if sop_class == DICOMDIR_SOP_CLASS:
        raise NotRoutable("DICOMDIR (a media directory, not an instance)")
    for required in ("SOPInstanceUID", "StudyInstanceUID"):
        if not values.get(required):
            raise NotRoutable(f"no {required} in the header")
    return Instance(path, size, values, sha256, status.st_mtime_ns if digest else 0)


def _parse(fp: BinaryIO, force: bool, tags: list[int]) -> Dataset:
    try:
        return configure_pydicom().dcmread(
            fp, stop_before_pixels=True, force=force, specific_tags=tags
        )
    # The file is untrusted input, and pydicom signals a malformed one with many
    # exception types (InvalidDicomError, EOFError, struct.error, ValueError,
    # KeyError, NotImplementedError, zlib.error ...). All mean the same here.
    except Exception as error:  # noqa: BLE001
        raise NotRoutable(f"unreadable DICOM header: {_one_line(error)}") from error


def _looks_like_data_set(head: bytes) -> bool:
    """True when a file without preamble starts like a raw data set."""
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, element = struct.unpack(order + "HH", head[:4])
        if group in (0x0002, 0x0008) and element < 0x1000:
            return True
    return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


# --- completeness ------------------------------------------------------------


def _check_complete(
    fp: BinaryIO, ds: Dataset, size: int, stopped_at: int, has_preamble: bool
) -> None:
    """Raise `NotRoutable` when the file is shorter than its header says."""
    implicit, little = _encoding(ds)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if transfer_syntax == DEFLATED_TRANSFER_SYNTAX:
        _check_deflated(fp, size, has_preamble)
        return
    if stopped_at < size and _tag_at(fp, stopped_at, little) in PIXEL_TAGS:
        _walk(fp, stopped_at, size, implicit, little)
        return
    # No pixel data: the whole data set was parsed, and pydicom does not tell
    # whether its last value was cut short. Walk it from the start.
    start = _data_set_start(fp, size) if has_preamble else 0
    _walk(fp, start, size, implicit, little)


def _encoding(ds: Dataset) -> tuple[bool, bool]:
    implicit, little = ds.original_encoding
    return (bool(implicit) if implicit is not None else True, little is not False)


def _tag_at(fp: BinaryIO, offset: int, little: bool) -> int:
    fp.seek(offset)
    raw = fp.read(4)
    if len(raw) < 4:
        return -1
    group, element = struct.unpack(("<" if little else ">") + "HH", raw)
    return group << 16 | element


def _data_set_start(fp: BinaryIO, size: int) -> int:
    """Offset of the first element after the File Meta group (explicit VR LE)."""
    offset = 132
    while offset + 8 <= size:
        fp.seek(offset)
        header = fp.read(12)
        group = struct.unpack("<H", header[:2])[0]
        if group != 0x0002:
            return offset
        offset = _next_offset(header, offset, implicit=False, little=True, size=size)[0]
    return offset


def _walk(fp: BinaryIO, offset: int, size: int, implicit: bool, little: bool) -> None:
    """Step over element headers from `offset` to the end of the file.

    Values with a defined length are skipped; undefined-length sequences,
    items and encapsulated pixel data are entered and must be closed by their
    delimiters. A declared length that runs past the end, or a container left
    open at the end, means the file is truncated.
    """
    open_containers = 0
    while offset < size:
        fp.seek(offset)
        header = fp.read(12)
        if len(header) < 8:
            raise NotRoutable(f"truncated: {size} bytes end inside an element header")
        offset, undefined, closes = _next_offset(header, offset, implicit, little, size)
        open_containers += undefined - closes
        if offset > size:
            raise NotRoutable(f"truncated: a value runs {offset - size} bytes past the end")
    if open_containers > 0:
        raise NotRoutable("truncated: a sequence or the pixel data is not closed")


def _next_offset(
    header: bytes, offset: int, implicit: bool, little: bool, size: int
) -> tuple[int, int, int]:
    """Return (offset after this element, opens a container, closes a container)."""
    order = "<" if little else ">"
    group, element = struct.unpack(order + "HH", header[:4])
    if group == ITEM_GROUP:  # items and delimiters: tag + 4-byte length, no VR
        (length,) = struct.unpack(order + "L", header[4:8])
        if element in (0xE00D, 0xE0DD):
            return offset + 8, 0, 1
        if length == UNDEFINED_LENGTH:
            return offset + 8, 1, 0
        return offset + 8 + length, 0, 0
    if implicit or not _is_vr(header[4:6]):
        # An element in implicit VR inside an explicit data set happens in real
        # files; pydicom reads them the same way.
        (length,) = struct.unpack(order + "L", header[4:8])
        header_length = 8
    elif header[4:6] in LONG_VRS:
        if len(header) < 12:
            raise NotRoutable(f"truncated: {size} bytes end inside an element header")
        (length,) = struct.unpack(order + "L", header[8:12])
        header_length = 12
    else:
        (length,) = struct.unpack(order + "H", header[6:8])
        header_length = 8
    if length == UNDEFINED_LENGTH:
        return offset + header_length, 1, 0
    return offset + header_length + length, 0, 0


def _is_vr(raw: bytes) -> bool:
    return len(raw) == 2 and 0x41 <= raw[0] <= 0x5A and 0x41 <= raw[1] <= 0x5A


def _check_deflated(fp: BinaryIO, size: int, has_preamble: bool) -> None:
    start = _data_set_start(fp, size) if has_preamble else 0
    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := fp.read(256 * 1024):
            inflater.decompress(chunk, 0)
            if inflater.eof:
                return
    except zlib.error as error:
        raise NotRoutable(f"corrupt deflated data set: {error}") from error
    raise NotRoutable("truncated: the deflated data set ends early")


# --- values ------------------------------------------------------------------


def _values(ds: Dataset, tags: list[int]) -> dict[str, str]:
    charset_declared = bool(ds.get("SpecificCharacterSet"))
    values: dict[str, str] = {}
    for tag in tags:
        if tag not in ds:
            continue
        keyword = keyword_for_tag(tag)
        text = _text(ds, tag, charset_declared)
        if text is not None:
            values[keyword] = text
    return values


def _text(ds: Dataset, tag: int, charset_declared: bool) -> str | None:
    """The DICOM string form of one element, or None for binary values."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
    if vr in BINARY_VRS:
        return None
    from pydicom.dataelem import RawDataElement

    if not charset_declared and vr in TEXT_VRS and isinstance(raw, RawDataElement):
        undeclared = _undeclared_utf8(raw.value)
        if undeclared is not None:
            return _person_name(undeclared) if vr == "PN" else undeclared
    try:
        element: DataElement = ds[tag]
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert counts as absent
        return None
    return _render(element.value)


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_vr(tag)
    except KeyError:
        return "UN"


def _undeclared_utf8(value: bytes | None) -> str | None:
    """Decode a text value as UTF-8 when no character set is declared and the
    bytes are not plain ASCII but are valid UTF-8 (a common sender mistake)."""
    if not value or value.isascii():
        return None
    try:
        return value.decode("utf-8").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None


def _render(value: object) -> str:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_render(item) for item in value)
    if isinstance(value, PersonName):
        return _person_name(str(value), value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    return str(value).strip("\x00 ")


def _person_name(text: str, name: PersonName | None = None) -> str:
    """A person name as its alphabetic group, trailing empty components dropped.

    `Miller^Richard^^^` and `Miller^Richard` render alike. A name with only an
    ideographic or phonetic group renders as that group.
    """
    if name is not None:
        groups = [name.alphabetic, name.ideographic, name.phonetic]
    else:
        groups = (text.split("=") + ["", "", ""])[:3]
    for group in groups:
        cleaned = group.rstrip("^ \x00")
        if cleaned:
            return cleaned
    return ""
