"""End to end: a real Storage SCP on loopback writing into the inbox, the
daemon on that inbox, and three concurrent senders.

Run with both receivers: dcmtk's storescp (the reference pairing, through
scripts/storescp.sh) and pynetdicom's storescp, which writes its files its
own way, as a site with another SCP would see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from harness import (
    AE_TITLE,
    DaemonProcess,
    files_under,
    free_port,
    lab_files,
    listening,
    send_command,
    skip_or_fail,
    storescp_command,
    wait_for,
)

from watcher import headers
from watcher.errors import NotRoutable
from watcher.synthetic import StudySpec, study_datasets, write_dataset

CORPUS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}

pytestmark = pytest.mark.e2e


class Receiver:
    """A Storage SCP writing into `inbox`, and the matching sender."""

    def __init__(self, kind: str, inbox: Path) -> None:
        self.kind = kind
        self.inbox = inbox
        self.port = free_port()
        env = {**os.environ, "TCP_NODELAY": "1"}
        if kind == "dcmtk":
            if not (shutil.which("storescp") and shutil.which("storescu")):
                skip_or_fail("dcmtk's storescp/storescu are not installed (apt-get install dcmtk)")
            command = storescp_command(self.port, inbox)
        else:
            try:
                import pynetdicom  # noqa: F401
            except ImportError:
                skip_or_fail("pynetdicom is not installed (pip install pynetdicom)")
            command = [
                sys.executable,
                "-m",
                "pynetdicom",
                "storescp",
                str(self.port),
                "-aet",
                AE_TITLE,
                "-od",
                str(inbox),
            ]
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: listening(self.port), 20, f"{kind} storescp on port {self.port}")

    def send(self, folder: Path) -> subprocess.CompletedProcess[bytes]:
        if self.kind == "dcmtk":
            command = send_command(self.port, folder)
        else:
            command = [
                sys.executable,
                "-m",
                "pynetdicom",
                "storescu",
                "127.0.0.1",
                str(self.port),
                str(folder),
                "-r",
                "-aec",
                AE_TITLE,
            ]
        return subprocess.run(
            command, capture_output=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"}
        )

    def close(self) -> None:
        # storescp --fork leaves children that hold the port: end the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def corpus_instances(kind: str) -> list[Path]:
    """pydicom's real files that are routable, one per SOPInstanceUID, in an
    uncompressed transfer syntax (a storescu association offers one set of
    syntaxes, and neither sender converts compressed pixel data)."""
    chosen: dict[str, Path] = {}
    for path in sorted(CORPUS.glob("*.dcm")):
        try:
            instance = headers.read_instance(path)
        except NotRoutable:
            continue
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if not syntax or not meta.get("MediaStorageSOPClassUID"):
            continue  # a sender needs a File Meta header to know what it sends
        if syntax not in UNCOMPRESSED:
            continue
        if kind == "pynetdicom" and syntax == "1.2.840.10008.1.2.2":
            continue  # explicit big endian is retired: pynetdicom's SCP refuses it
        chosen.setdefault(instance.sop_instance_uid, path)
    return list(chosen.values())


def dataset_without_meta(path: Path) -> pydicom.Dataset:
    """The data set as received: File Meta aside, and the elements a DICOM
    network transfer may drop (data set trailing padding, group lengths)."""
    ds = pydicom.dcmread(path)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    for tag in [e.tag for e in ds if e.tag == 0xFFFCFFFC or e.tag.element == 0]:
        del ds[tag]
    return ds


def assert_same_values(received: pydicom.Dataset, sent: pydicom.Dataset, where: str) -> None:
    """Same elements with the same values. The VR may differ: a receiver that
    negotiated implicit VR writes pixel data as OW where the sender had OB."""
    assert set(received.keys()) == set(sent.keys()), where
    for element in sent:
        other = received[element.tag]
        if element.VR == "SQ":
            assert len(other.value) == len(element.value), f"{where} {element.tag}"
            for index, item in enumerate(element.value):
                assert_same_values(other.value[index], item, f"{where} {element.tag}[{index}]")
        elif element.tag.is_private and other.VR != element.VR:
            # A receiver that negotiated implicit VR cannot know a private
            # element's VR: it reads back as UN bytes. Presence is checked above.
            continue
        else:
            assert other.value == element.value, f"{where} {element.tag}"


@pytest.mark.parametrize("kind", ["dcmtk", "pynetdicom"])
def test_three_concurrent_senders_every_instance_placed_once_and_intact(kind, tmp_path):
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    run = DaemonProcess(tmp_path / "node", quiet_seconds=2.0)
    run.add_rule(
        "lab", lab, path="{PatientID}/{StudyInstanceUID}/{SeriesNumber:03d}/{SOPInstanceUID}.dcm"
    )
    receiver = Receiver(kind, run.inbox)
    try:
        run.start()
        run.wait_event("watching")
        # Three multi-series studies; sender k sends series k of each of
        # them, so the studies interleave across the three associations.
        outgoing = [tmp_path / f"sender{k}" for k in range(3)]
        sent: dict[str, Path] = {}
        for number in range(3):
            spec = StudySpec(
                patient_id=f"E2E{number}", series=3, instances=40, rows=128, columns=128
            )
            for ds in study_datasets(spec):
                folder = outgoing[(int(ds.SeriesNumber) - 1) % 3]
                sent[ds.SOPInstanceUID] = write_dataset(ds, folder / f"{ds.SOPInstanceUID}.dcm")
        # A few large instances, so that half-written files sit in the inbox.
        big = StudySpec(patient_id="BIG", series=1, instances=3, rows=1024, columns=1024)
        for ds in study_datasets(big):
            sent[ds.SOPInstanceUID] = write_dataset(ds, outgoing[2] / f"{ds.SOPInstanceUID}.dcm")
        for number, path in enumerate(corpus_instances(kind)):
            copy = outgoing[number % 3] / f"corpus_{path.name}"
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
            sent[headers.read_instance(path).sop_instance_uid] = copy

        results: list[subprocess.CompletedProcess[bytes]] = []
        senders = [
            threading.Thread(target=lambda f=f: results.append(receiver.send(f))) for f in outgoing
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        for result in results:
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

        def all_placed() -> bool:
            return len(lab_files(lab)) >= len(sent) and not run.inbox_files()

        wait_for(all_placed, 120, f"{len(sent)} instances placed and the inbox drained")
        assert run.terminate() == 0
    finally:
        receiver.close()
        run.close()

    placed = lab_files(lab)
    by_uid: dict[str, list[Path]] = {}
    for path in placed:
        by_uid.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, []).append(
            path
        )
    assert set(by_uid) == set(sent), "every instance sent is placed"
    assert all(len(paths) == 1 for paths in by_uid.values()), "and exactly once"
    for uid, source in sent.items():
        assert_same_values(dataset_without_meta(by_uid[uid][0]), dataset_without_meta(source), uid)
    assert not files_under(run.state / "quarantine"), "no half-written file was quarantined"
    assert not files_under(run.state / "unmatched")
