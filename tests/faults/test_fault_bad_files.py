"""Bad files in the inbox: truncated ones, empty ones, a DICOMDIR, the files
desktops and scripts leave behind, and a file that is still being written
for 30 s. Each bad file ends in quarantine with its reason beside it; the
slow one is placed whole and never quarantined."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from faultlib import METRICS_FILE, metrics_of, own
from harness import DaemonProcess, lab_files, paths_under, sha256, wait_for

from watcher.synthetic import StudySpec, make_dataset, study_datasets, write_dataset

pytestmark = pytest.mark.slow

PAUSE = 1.0  # between two writes of the slow file
WRITES = 30


def pixel_data_offset(data: bytes) -> int:
    """Where the Pixel Data element starts (explicit VR little endian)."""
    offset = data.rfind(b"\xe0\x7f\x10\x00OW")
    assert offset > 0
    return offset


def write_slowly(path: Path, data: bytes, started: threading.Event) -> None:
    """WRITES writes, PAUSE apart, one open file: first 100 bytes (not even
    the DICM prefix), then the whole header up to the pixel data (a file
    that reads as a complete data set without pixels), then the pixel data
    in pieces."""
    first, header = 100, pixel_data_offset(data)
    step = -(-(len(data) - header) // (WRITES - 2))
    cuts = [0, first, header, *range(header + step, len(data), step), len(data)]
    assert len(cuts) == WRITES + 1
    with open(path, "wb") as handle:
        started.set()
        for number, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
            if number:
                time.sleep(PAUSE)
            handle.write(data[start:end])
            handle.flush()
            os.fsync(handle.fileno())


def test_bad_files_are_quarantined_and_a_slow_file_is_placed_whole(tmp_path, daemons, account):
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    # quarantine_after_seconds well above the pause of the slow writer (the
    # default is 60; 10 keeps the test short); quiet_seconds above it too.
    run = DaemonProcess(
        tmp_path / "node",
        quarantine_after_seconds=10.0,
        quiet_seconds=2.0,
        metrics_file=METRICS_FILE,
    )
    daemons.append(run)
    run.add_rule("lab", lab)
    corpus = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent

    made = tmp_path / "made"
    whole = write_dataset(make_dataset(Rows=64, Columns=64, PatientID="BAD"), made / "whole.dcm")
    data = whole.read_bytes()
    header_cut = pixel_data_offset(data) - 250  # inside the data set's elements
    bad: dict[str, tuple[bytes, str]] = {
        "cut60.dcm": (data[: int(len(data) * 0.6)], "truncated"),
        "cut-in-header.dcm": (data[:header_cut], ""),
        "cut-in-meta.dcm": (data[:150], ""),
        "empty.dcm": (b"", "empty"),
        "DICOMDIR": ((corpus / "dicomdirtests" / "DICOMDIR").read_bytes(), "DICOMDIR"),
        "DICOMDIR-implicit": (
            (corpus / "dicomdirtests" / "DICOMDIR-implicit").read_bytes(),
            "DICOMDIR",
        ),
        ".DS_Store": (b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 8, "not a DICOM file"),
        "notes.txt": (b"scanner notes: subject moved in run 2\n", "not a DICOM file"),
        "metadata.json": (
            b'{"StudyDescription": "SMITH^Memory", "files": 3}\n',
            "not a DICOM file",
        ),
    }
    meta_end = 132 + 12 + pydicom.dcmread(whole).file_meta.FileMetaInformationGroupLength
    assert 132 < 150 < meta_end < header_cut < pixel_data_offset(data) < len(data) * 0.6
    # The slow file belongs to a study whose other instances arrive at once.
    spec = StudySpec(patient_id="SLOW", series=1, instances=3, rows=64, columns=64)
    datasets = list(study_datasets(spec))
    slow = write_dataset(datasets[-1], made / "slow.dcm").read_bytes()
    before = paths_under(tmp_path)

    run.start()
    run.wait_event("watching")
    entered = {}
    for name, (content, _) in bad.items():
        (run.inbox / name).write_bytes(content)
        entered[str(run.inbox / name)] = hashlib.sha256(content).hexdigest()
    for ds in datasets[:-1]:
        path = write_dataset(ds, run.inbox / f"MR.{ds.SOPInstanceUID}")
        entered[str(path)] = sha256(path)
    slow_path = run.inbox / "MR.slow"
    entered[str(slow_path)] = hashlib.sha256(slow).hexdigest()
    started = threading.Event()
    writer = threading.Thread(target=write_slowly, args=(slow_path, slow, started), name="slow")
    began = time.monotonic()
    writer.start()
    try:
        started.wait(10)
        # The bad files go to quarantine while the slow one is still written.
        run.wait_event("quarantined", count=len(bad), timeout=40)
        assert writer.is_alive(), "the slow writer ended before the quarantine: nothing tested"
    finally:
        writer.join()
    assert time.monotonic() - began >= (WRITES - 1) * PAUSE
    run.wait_drained(timeout=30)
    wait_for(lambda: len(lab_files(lab)) == 3, 30, "the three instances of the slow study")
    assert run.terminate() == 0

    quarantined = [line["path"] for line in run.logs("quarantined")]
    assert sorted(os.path.basename(p) for p in quarantined) == sorted(bad), quarantined
    placed = {sha256(p): p for p in lab_files(lab)}
    assert hashlib.sha256(slow).hexdigest() in placed, "the slow file is placed whole"
    kept = {
        sha256(p): p
        for p in (run.state / "quarantine").rglob("*")
        if p.is_file() and not p.name.endswith(".reason.txt")
    }
    for name, (content, reason) in bad.items():
        copy = kept[hashlib.sha256(content).hexdigest()]
        why = copy.with_name(copy.name + ".reason.txt").read_text()
        assert reason in why.splitlines()[0] and why.strip(), f"{name}: {why!r}"
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=[*own(run), made],
        exact=True,
        unique_uids=True,
    )
    assert counts["placed"] == 3 and counts["quarantine"] == len(bad)
    assert counts["still_in_inbox"] == 0
    # the metrics the daemon wrote last, at its stop, say the same
    found = metrics_of(run)
    assert found[("dicom_watcher_placed_files_total", (("lab", "lab"),))] == counts["placed"]
    assert found[("dicom_watcher_quarantined_files", ())] == counts["quarantine"]
    assert found[("dicom_watcher_unmatched_files", ())] == counts.get("unmatched", 0)
    assert found[("dicom_watcher_pending_studies", ())] == 0
    shutil.rmtree(made)
