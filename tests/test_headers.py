"""Header reading over pydicom's odd real files, character sets, truncated
and non-DICOM files, and synthetic files built for one point each."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit

from watcher import headers
from watcher.errors import NotRoutable
from watcher.synthetic import make_dataset, write_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")

CORPUS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
CHARSETS = CORPUS.parent / "charset_files"


def corpus_files(folder: Path) -> list[Path]:
    return sorted(Path(parent, name) for parent, _, names in os.walk(folder) for name in names)


ALL_FILES = corpus_files(CORPUS) + corpus_files(CHARSETS)


def full_read(path: Path) -> pydicom.Dataset:
    """pydicom's own complete reading: the oracle for the header reader."""
    return pydicom.dcmread(path, force=True)


@pytest.mark.parametrize(
    "path", ALL_FILES, ids=[str(p.relative_to(CORPUS.parent)) for p in ALL_FILES]
)
def test_every_corpus_file_is_an_instance_or_not_routable_with_a_reason(path: Path) -> None:
    try:
        instance = headers.read_instance(path)
    except NotRoutable as error:
        assert error.reason.strip()
        assert "\n" not in error.reason
        return
    assert instance.path == str(path)
    assert instance.size == path.stat().st_size
    assert all(type(value) is str for value in instance.values.values())
    assert all(type(key) is str for key in instance.values)
    assert "PixelData" not in instance.values
    # What pydicom reads when it parses the whole file, pixel data included.
    ds = full_read(path)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in ds:
            assert instance.values[keyword] == str(ds[keyword].value).strip("\x00 ")
    assert instance.sop_instance_uid and instance.study_instance_uid


def test_the_corpus_has_both_kinds() -> None:
    outcomes = {"routable": 0, "not": 0}
    for path in ALL_FILES:
        try:
            headers.read_instance(path)
            outcomes["routable"] += 1
        except NotRoutable:
            outcomes["not"] += 1
    assert outcomes["routable"] > 100
    assert outcomes["not"] > 20


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("dicomdirtests/DICOMDIR-bigEnd", "DICOMDIR"),
        ("dicomdirtests/DICOMDIR-implicit", "DICOMDIR"),
        ("dicomdirtests/DICOMDIR-empty.dcm", "DICOMDIR"),
        ("dicomdirtests/TINY_ALPHA/DICOMDIR", "DICOMDIR"),
        ("README.txt", "not a DICOM file"),
        ("dicomdirtests/README.txt", "not a DICOM file"),
        ("test1.json", "not a DICOM file"),
        ("test_PN.json", "not a DICOM file"),
        ("crayons.icc", "not a DICOM file"),
        ("rtplan.dump", "not a DICOM file"),
        ("zipMR.gz", "not a DICOM file"),
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("meta_missing_tsyntax.dcm", "no SOPInstanceUID"),
    ],
)
def test_not_routable_corpus_files_and_their_reasons(name: str, reason: str) -> None:
    with pytest.raises(NotRoutable) as error:
        headers.read_instance(CORPUS / name)
    assert reason in error.value.reason


@pytest.mark.parametrize(
    ("name", "patient_name", "patient_id"),
    [
        ("MR_small.dcm", "CompressedSamples^MR1", "4MR1"),
        ("MR_small_implicit.dcm", "CompressedSamples^MR1", "4MR1"),  # implicit VR
        ("MR_small_bigendian.dcm", "CompressedSamples^MR1", "4MR1"),  # explicit big endian
        ("MR_small_expb.dcm", "CompressedSamples^MR1", "4MR1"),
        ("MR_small_RLE.dcm", "CompressedSamples^MR1", "4MR1"),  # RLE
        ("MR_small_jpeg_ls_lossless.dcm", "CompressedSamples^MR1", "4MR1"),  # JPEG-LS
        ("MR_small_jp2klossless.dcm", "CompressedSamples^MR1", "4MR1"),  # JPEG 2000
        ("JPEG-lossy.dcm", "CompressedSamples^NM1", "8NM1"),  # JPEG
        ("SC_rgb_rle.dcm", "Lestrade^G", "ID1"),
        ("CT_small.dcm", "CompressedSamples^CT1", "1CT1"),
        ("rtplan.dcm", "Last^First^mid^pre", "id00001"),
        ("image_dfl.dcm", "", ""),  # deflated, with empty names
        ("ExplVR_LitEndNoMeta.dcm", None, None),  # no preamble, no File Meta
        ("ExplVR_BigEndNoMeta.dcm", None, None),
        ("ExplVR_BigEnd.dcm", "Anonymized", None),
    ],
)
def test_odd_encodings_are_read(
    name: str, patient_name: str | None, patient_id: str | None
) -> None:
    path = CORPUS / name
    instance = headers.read_instance(path)
    assert instance.values.get("PatientName") == patient_name
    assert instance.values.get("PatientID") == patient_id
    ds = full_read(path)
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.study_instance_uid == ds.StudyInstanceUID


def test_one_instance_in_seven_transfer_syntaxes_reads_alike() -> None:
    names = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ]
    keys = (
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientName",
        "PatientID",
        "StudyDate",
        "SeriesNumber",
        "InstanceNumber",
        "Modality",
    )
    seen = {tuple(headers.read_instance(CORPUS / n).values.get(k) for k in keys) for n in names}
    assert len(seen) == 1
    [values] = seen
    assert all(values)


# --- character sets ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrFrenMulti.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrH31.dcm", "Yamada^Tarou"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrArab.dcm", "قباني^لنزار"),
        ("chrHbrw.dcm", "שרון^דבורה"),
        ("chrJapMulti.dcm", "やまだ^たろう"),
        ("chrKoreanMulti.dcm", "김희중"),
        ("chrX1.dcm", "Wang^XiaoDong"),
    ],
)
def test_charset_files_give_decoded_names(name: str, expected: str) -> None:
    value = headers.read_instance(CHARSETS / name).values["PatientName"]
    assert value == expected
    assert type(value) is str


def test_russian_name_matches_pydicom_decoding() -> None:
    path = CHARSETS / "chrRuss.dcm"
    value = headers.read_instance(path).values["PatientName"]
    assert value.startswith("Люк")
    assert value == str(full_read(path).PatientName)


# --- synthetic files: names and values ---------------------------------------------


def test_person_name_trailing_empty_components_are_dropped(make_dicom, tmp_path):
    path = make_dicom(tmp_path, PatientName="Miller^Richard^^^")
    assert headers.read_instance(path).values["PatientName"] == "Miller^Richard"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou"),  # the alphabetic group
        ("=山田^太郎=やまだ^たろう", "山田^太郎"),  # only ideographic: that one
        ("Doe^Jane", "Doe^Jane"),
        ("^^^^", None),  # nothing but separators: empty
    ],
)
def test_person_name_groups(make_dicom, tmp_path, stored, expected):
    path = make_dicom(tmp_path, PatientName=stored)
    assert (headers.read_instance(path).values.get("PatientName") or None) == expected


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_an_undeclared_charset_name_is_read_as_written(tmp_path, encoding):
    ds = make_dataset(PatientID="MUELLER")
    del ds.SpecificCharacterSet
    ds["PatientName"].value = "Müller^Jürgen".encode(encoding)
    path = write_dataset(ds, tmp_path / "undeclared.dcm")
    raw = path.read_bytes()
    assert "Müller^Jürgen".encode(encoding) in raw
    assert b"\x08\x00\x05\x00" not in raw  # really no (0008,0005) Specific Character Set
    values = headers.read_instance(path).values
    assert values["PatientName"] == "Müller^Jürgen"
    assert type(values["PatientName"]) is str
    assert "SpecificCharacterSet" not in values


def test_values_are_plain_strings_in_their_dicom_form(make_dicom, tmp_path):
    path = make_dicom(
        tmp_path,
        SeriesNumber=5,
        InstanceNumber=12,
        ImageType=["ORIGINAL", "PRIMARY", "M"],
        SliceThickness=1.5,
        PatientName="Doe^Jane",
        AcquisitionDate="20261125",
        StudyDescription="  SMITH^Memory ",
    )
    fields = ["ImageType", "SliceThickness", "AcquisitionDate", "PixelData", "Rows"]
    values = headers.read_instance(path, headers.tags_for(fields)).values
    assert values["SeriesNumber"] == "5"
    assert values["InstanceNumber"] == "12"
    assert values["ImageType"] == "ORIGINAL\\PRIMARY\\M"
    assert values["SliceThickness"] == "1.5"
    assert values["PatientName"] == "Doe^Jane"
    assert values["AcquisitionDate"] == "20261125"
    assert "PixelData" not in values
    assert all(type(v) is str for v in values.values())
    assert "SeriesDescription" in values and "ProtocolName" not in values  # only what was asked


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID"])
def test_an_instance_without_a_required_uid_is_not_routable(tmp_path, missing):
    ds = make_dataset()
    delattr(ds, missing)
    path = write_dataset(ds, tmp_path / "no-uid.dcm")
    with pytest.raises(NotRoutable, match=f"no {missing}"):
        headers.read_instance(path)


def test_implicit_vr_synthetic_file(tmp_path):
    ds = make_dataset(PatientID="IMPLICIT", PatientName="Müller^Jürgen")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = write_dataset(ds, tmp_path / "implicit.dcm")
    values = headers.read_instance(path).values
    assert (values["PatientID"], values["PatientName"]) == ("IMPLICIT", "Müller^Jürgen")


# --- files that are not (whole) DICOM --------------------------------------------


def test_a_zero_byte_file_is_empty(tmp_path):
    path = tmp_path / "zero.dcm"
    path.write_bytes(b"")
    with pytest.raises(NotRoutable, match="empty"):
        headers.read_instance(path)


@pytest.mark.parametrize(
    "content",
    [
        b"hello, this is not DICOM\n" * 10,
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        bytes(range(256)) * 4,
        b"DICM",
        bytes(128) + b"DICM",  # a preamble and nothing else
        bytes(128) + b"DICN" + bytes(100),
        b"\x00" * 2000,
    ],
    ids=["text", "png", "bytes", "just-DICM", "preamble-only", "bad-prefix", "zeros"],
)
def test_files_that_are_not_dicom(tmp_path, content):
    path = tmp_path / "file.dcm"
    path.write_bytes(content)
    with pytest.raises(NotRoutable) as error:
        headers.read_instance(path)
    assert error.value.reason


def test_a_file_cut_at_60_percent_is_not_routable(make_dicom, tmp_path):
    whole = make_dicom(tmp_path, name="whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) * 60 // 100])
    with pytest.raises(NotRoutable, match="truncated"):
        headers.read_instance(cut)


@pytest.mark.parametrize("size", [1, 60, 128, 131, 132, 133, 140, 200, 300])
def test_a_file_cut_inside_its_header_is_not_routable(make_dicom, tmp_path, size):
    whole = make_dicom(tmp_path, name="whole.dcm").read_bytes()
    assert headers.read_instance(tmp_path / "whole.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[:size])
    with pytest.raises(NotRoutable) as error:
        headers.read_instance(cut)
    assert error.value.reason


def test_every_cut_inside_the_pixel_data_is_truncated(make_dicom, tmp_path):
    whole = make_dicom(tmp_path, name="whole.dcm", Rows=16, Columns=16).read_bytes()
    start = whole.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    assert start > 0
    cut = tmp_path / "cut.dcm"
    for size in range(start + 1, len(whole)):
        cut.write_bytes(whole[:size])
        with pytest.raises(NotRoutable) as error:
            headers.read_instance(cut)
        if size >= start + 12:  # past the element's header: inside its value
            assert "truncated" in error.value.reason, size


def test_every_cut_inside_a_value_of_a_file_without_pixel_data_is_truncated(tmp_path):
    ds = make_dataset(PixelData=None, StudyDescription="D" * 60)
    whole = write_dataset(ds, tmp_path / "whole.dcm").read_bytes()
    assert "PixelData" not in pydicom.dcmread(tmp_path / "whole.dcm")
    start = whole.index(b"D" * 60)  # inside the value of Study Description
    cut = tmp_path / "cut.dcm"
    for size in range(start + 1, start + 60):
        cut.write_bytes(whole[:size])
        with pytest.raises(NotRoutable):
            headers.read_instance(cut)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "image_dfl.dcm",
    ],
)
def test_corpus_files_cut_inside_their_pixel_data_are_truncated(tmp_path, name):
    whole = (CORPUS / name).read_bytes()
    cut = tmp_path / name
    for fraction in (0.9, 0.97, 0.99):
        cut.write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(NotRoutable, match="truncated|deflated"):
            headers.read_instance(cut)


# --- the pixel data is stepped over, never read or decoded ----------------------------


def test_pixel_data_declared_longer_than_the_file_is_truncated(make_dicom, tmp_path):
    path = make_dicom(tmp_path, name="lying.dcm")
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xe0\x7f\x10\x00")
    assert data[start + 4 : start + 6] == b"OW"
    (length,) = struct.unpack("<L", data[start + 8 : start + 12])
    assert start + 12 + length == len(data)
    data[start + 8 : start + 12] = struct.pack("<L", length + 2)
    path.write_bytes(bytes(data))
    with pytest.raises(NotRoutable, match="truncated"):
        headers.read_instance(path)


def test_large_pixel_data_of_garbage_is_not_decoded(make_dicom, tmp_path):
    rows = columns = 1024
    garbage = bytes((i * 7919) % 256 for i in range(256)) * (rows * columns * 2 // 256)
    path = make_dicom(
        tmp_path, Rows=rows, Columns=columns, PixelData=garbage, PatientID="BIG", BitsAllocated=8
    )  # says 8 bits: the length is wrong too
    instance = headers.read_instance(path)
    assert instance.values["PatientID"] == "BIG"
    assert instance.size == path.stat().st_size > rows * columns * 2


@pytest.mark.parametrize("rows", [8, 64, 256, 1024])  # within the first read, and beyond it
def test_the_digest_is_the_sha256_of_the_whole_file(make_dicom, tmp_path, rows):
    path = make_dicom(tmp_path, Rows=rows, Columns=rows)
    instance = headers.read_instance(path, digest=True)
    assert instance.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert instance.size == path.stat().st_size


def encapsulated(tmp_path: Path, fragments: list[bytes]) -> bytes:
    ds = make_dataset(PatientID="ENCAPS")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write_dataset(ds, tmp_path / "encapsulated.dcm").read_bytes()


def test_encapsulated_pixel_data_that_is_not_an_image_reads(tmp_path):
    data = encapsulated(tmp_path, [b"this is not a JPEG" * 8, b"neither is this!"])
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimiter
    instance = headers.read_instance(tmp_path / "encapsulated.dcm")
    assert instance.values["PatientID"] == "ENCAPS"


@pytest.mark.parametrize(
    ("drop", "reason"),
    [(8, "not closed"), (3, "truncated"), (20, "past the end")],
    ids=["no-delimiter", "cut-in-delimiter", "cut-in-fragment"],
)
def test_encapsulated_pixel_data_cut_short_is_truncated(tmp_path, drop, reason):
    data = encapsulated(tmp_path, [b"this is not a JPEG" * 8, b"neither is this!"])
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-drop])
    with pytest.raises(NotRoutable, match=reason):
        headers.read_instance(path)


def test_unreadable_paths_raise_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        headers.read_instance(tmp_path / "missing.dcm")
    with pytest.raises(IsADirectoryError):
        headers.read_instance(tmp_path)


def test_a_file_without_preamble_gives_values_in_their_dicom_form(tmp_path):
    whole = write_dataset(
        make_dataset(
            ImageType=["ORIGINAL", "PRIMARY", "M"],
            PatientName="Miller^Richard^^^",
            SeriesNumber=5,
            StudyDescription="SMITH^Memory",
        ),
        tmp_path / "whole.dcm",
    )
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(whole.read_bytes()[132:])  # no preamble, no DICM: pydicom reads it
    fields = headers.tags_for(["ImageType", "PatientName", "SeriesNumber", "StudyDescription"])
    expected = headers.read_instance(whole, fields).values
    values = headers.read_instance(bare, fields).values
    assert values["ImageType"] == "ORIGINAL\\PRIMARY\\M"
    assert values["PatientName"] == "Miller^Richard"
    assert values == expected
