"""The fast header reader agrees with pydicom on every file it takes."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from watcher import fastheader, headers
from watcher.errors import NotRoutable
from watcher.synthetic import make_dataset, write_dataset

CORPUS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()) + sorted(
    p for p in (CORPUS.parent / "charset_files").iterdir() if p.is_file()
)
TAGS = headers.tags_for(
    [
        "ImageType",
        "InstitutionName",
        "ImagesInAcquisition",
        "ReferringPhysicianName",
        "EchoTime",
        "PixelSpacing",
        "ProtocolName",
        "AccessionNumber",
        "Rows",
        "Columns",
    ]
)


def with_pydicom(path: Path) -> tuple[str, object]:
    size = path.stat().st_size
    with open(path, "rb") as fp:
        preamble = fp.read(132)[128:132] == b"DICM"
        fp.seek(0)
        try:
            ds = headers._parse(fp, not preamble, TAGS)
            headers._check_complete(fp, ds, size, fp.tell(), preamble)
        except NotRoutable as error:
            return "not routable", error.reason.split(":")[0]
        return "values", headers._values(ds, TAGS)


def fast_read(path: Path) -> dict[str, str] | None:
    """The fast reader's values (None: not a Part 10 file), as `read_instance` calls it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, fastheader.FIRST_READ, 0)
        if head[128:132] != b"DICM":
            return None
        return fastheader.read_values(fd, os.fstat(fd).st_size, head, TAGS)[0]
    finally:
        os.close(fd)


def with_fast_reader(path: Path) -> tuple[str, object] | None:
    try:
        values = fast_read(path)
    except fastheader.Fallback:
        return None
    except NotRoutable as error:
        return "not routable", error.reason.split(":")[0]
    return None if values is None else ("values", values)


@pytest.mark.parametrize(
    ("first", "window"), [(fastheader.FIRST_READ, fastheader.WINDOW), (140, 140), (132, 12)]
)
def test_fast_reader_gives_what_pydicom_gives_on_every_file_it_takes(
    first: int, window: int, monkeypatch: pytest.MonkeyPatch
):
    # Small reads make every element header and value straddle or leave the
    # bytes in hand, so that each way of reading on is taken.
    monkeypatch.setattr(fastheader, "FIRST_READ", first)
    monkeypatch.setattr(fastheader, "WINDOW", window)
    taken = 0
    for path in FILES:
        fast = with_fast_reader(path)  # None: left to pydicom (big endian, deflate, ...)
        if fast is not None:
            taken += 1
            assert fast == with_pydicom(path), path.name
    assert taken >= 100


def test_most_of_the_corpus_takes_the_fast_path():
    taken = sum(with_fast_reader(path) is not None for path in FILES)
    assert taken >= 0.7 * len(FILES)


def cut_short(tmp_path: Path, keep: float) -> Path:
    """A file of 64x64 pixels with only its first `keep` (a fraction) or,
    at least, 140 bytes."""
    whole = write_dataset(make_dataset(Rows=64, Columns=64), tmp_path / "whole.dcm").read_bytes()
    part = tmp_path / "part.dcm"
    part.write_bytes(whole[: max(140, int(len(whole) * keep))])
    return part


@pytest.mark.parametrize("cut", [0.6, 0.9])
def test_fast_reader_finds_truncation(tmp_path: Path, cut: float):
    part = cut_short(tmp_path, cut)
    assert with_fast_reader(part) == ("not routable", "truncated")
    with pytest.raises(NotRoutable, match="truncated"):
        headers.read_instance(part)


def test_a_file_cut_in_its_file_meta_is_not_routable(tmp_path: Path):
    # (The fast reader leaves it to pydicom, which finds it cut short.)
    part = cut_short(tmp_path, 0.0)
    with pytest.raises(NotRoutable, match="truncated|no SOPInstanceUID|no StudyInstanceUID"):
        headers.read_instance(part)


def test_non_ascii_values_take_the_pydicom_path_and_decode(tmp_path: Path):
    path = write_dataset(make_dataset(PatientName="Müller^Jürgen"), tmp_path / "a.dcm")
    with pytest.raises(fastheader.Fallback):
        fast_read(path)
    assert headers.read_instance(path).values["PatientName"] == "Müller^Jürgen"
