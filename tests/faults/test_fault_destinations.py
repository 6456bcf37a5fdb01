"""Destinations that fail the way NAS shares do: full, read-only, gone.

Each destination is a real mount (a small tmpfs, a bind mount), so the
daemon meets the real errors (ENOSPC, EROFS, a missing root), not mocks.
Every test ends with the shared accounting check.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from faultlib import (
    METRICS_FILE,
    deliver,
    fill,
    free_bytes,
    metrics_of,
    own,
    pages,
    stage,
    status_study,
    temporaries,
    wait_attempts,
    write_into,
)
from harness import DaemonProcess, lab_files, paths_under, wait_for

from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec

pytestmark = pytest.mark.slow


def placed(lab: Path) -> list[Path]:
    """Instances in their place (not temporary files)."""
    return [p for p in lab_files(lab) if not p.name.startswith(TEMP_PREFIX)]


def test_destination_fills_up_then_gets_room_again(tmp_path, mounts, daemons, account):
    share = mounts.tmpfs(tmp_path / "nas", "2m")
    lab = share / "lab"
    lab.mkdir()
    run = DaemonProcess(tmp_path / "node", metrics_file=METRICS_FILE)
    daemons.append(run)
    run.add_rule("lab", lab)
    before = paths_under(tmp_path)
    run.start()
    run.wait_event("watching")

    # 1. Room for about 10 of the 40 instances: some are placed, then ENOSPC.
    filler = fill(share, leave=10 * 4096)
    first = StudySpec(patient_id="FULL1", series=2, instances=20, rows=32, columns=32)
    entered = write_into(run, first, "first")
    parked = run.wait_event("study_parked")[0]
    assert "No space left on device" in parked["error"], parked
    wait_attempts(run, first.study_uid, 3)  # retried, still full: nothing breaks
    assert len(run.inbox_files()) >= 30, "the files not placed stay in the inbox"
    placed_while_full = len(lab_files(lab))
    assert 0 < placed_while_full <= 10, "some are placed before the disk is full"
    assert not temporaries(lab), "no temporary file is left behind by a failed write"
    assert list((run.state / "retry").glob("*.json")), "the retry is recorded in the state folder"
    parked_metrics = wait_for(
        lambda: (m := metrics_of(run))[("dicom_watcher_parked_studies", ())] == 1 and m,
        10,
        "the metrics to show the parked study",
    )
    assert parked_metrics[("dicom_watcher_pending_studies", ())] == 1
    # (a study's files count as placed once it is, whole)
    assert ("dicom_watcher_placed_files_total", (("lab", "lab"),)) not in parked_metrics

    # 2. Room again: the study resumes and the rest is placed.
    filler.unlink()
    run.wait_event("study_resumed")
    run.wait_drained()
    assert len(lab_files(lab)) == 40

    # 3. Room for exactly the instances of a study, none for its manifest.
    second = StudySpec(patient_id="FULL2", series=1, instances=10, rows=32, columns=32)
    staged = stage(run, second, "second")
    filler = fill(share, leave=pages(staged))
    entered.update(deliver(run, staged, "second"))
    wait_for(
        lambda: (
            run.logs("manifest_failed")
            or len(run.logs("manifest_written")) >= 2
            or len(run.logs("study_parked")) >= 2
        ),
        30,
        "the second study placed or parked",
    )
    assert run.logs("manifest_failed"), "the manifest found room: nothing tested"
    assert not temporaries(lab), "no temporary file is left behind by a failed write"
    filler.unlink()
    run.wait_drained()
    wait_for(lambda: not status_study(run, second.study_uid), 30, "the second study done")
    assert run.terminate() == 0
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=own(run),
        exact=True,
        unique_uids=True,
        extra={
            "placed_while_full": placed_while_full,
            "manifests_failed_full": len(run.logs("manifest_failed")),
        },
    )
    assert counts["placed"] == 50 and counts["lab_files"] == 50 and counts["still_in_inbox"] == 0
    found = metrics_of(run)
    assert found[("dicom_watcher_placed_files_total", (("lab", "lab"),))] == counts["placed"]
    assert found[("dicom_watcher_parked_studies", ())] == 0
    assert found[("dicom_watcher_pending_studies", ())] == 0


def test_destination_remounted_read_only_then_writable(tmp_path, mounts, daemons, account):
    lab = mounts.tmpfs(tmp_path / "nas" / "lab", "64m")
    run = DaemonProcess(tmp_path / "node")
    daemons.append(run)
    run.add_rule("lab", lab)
    before = paths_under(tmp_path)
    run.start()
    run.wait_event("watching")

    # A study placed while the share is writable; then the share goes
    # read-only. (The kernel refuses a read-only remount while a file is
    # open for writing there, so it lands between two of the daemon's
    # writes, as it would for an operator.)
    first = StudySpec(patient_id="RW0", series=1, instances=40, rows=32, columns=32)
    entered = write_into(run, first, "first")
    run.wait_event("study_placed")
    mounts.remount(lab, "ro")
    placed_before = len(placed(lab))
    assert placed_before == 40

    # Studies arriving while it is read-only are parked, and none of their
    # files is written.
    second = StudySpec(patient_id="RO1", series=2, instances=150, rows=32, columns=32)
    entered.update(write_into(run, second, "second"))
    parked = run.wait_event("study_parked")[0]
    assert "Read-only file system" in parked["error"], parked
    third = StudySpec(patient_id="RO2", series=1, instances=20, rows=32, columns=32)
    entered.update(write_into(run, third, "third"))
    wait_attempts(run, second.study_uid, 3)
    wait_attempts(run, third.study_uid, 2)
    assert len(placed(lab)) == placed_before
    assert len(run.inbox_files()) == 320
    assert temporaries(lab) == []

    mounts.remount(lab, "rw")
    run.wait_event("study_resumed", count=2)
    run.wait_drained()
    assert run.terminate() == 0
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=own(run),
        exact=True,
        unique_uids=True,
        extra={"placed_before_read_only": placed_before, "parked_while_read_only": 320},
    )
    assert counts["placed"] == 360 and counts["lab_files"] == 360 and counts["still_in_inbox"] == 0


def test_destination_root_disappears_and_comes_back(tmp_path, mounts, daemons, account):
    # The share's storage (kept while it is "unmounted", as a NAS keeps its
    # files) and the mount point the daemon writes to: nas/ is a bind mount
    # of it; unmounting nas/ leaves the empty mount point folder on the local
    # disk, where nothing may be written.
    storage = mounts.tmpfs(tmp_path / "storage", "64m")
    (storage / "lab").mkdir()
    nas = tmp_path / "nas"
    nas.mkdir()
    mounts.bind(storage, nas)
    lab = nas / "lab"
    run = DaemonProcess(tmp_path / "node")
    daemons.append(run)
    run.add_rule("lab", lab)
    before = paths_under(tmp_path)
    run.start()
    run.wait_event("watching")

    # A study placed while the share is there; then it goes away (unmounted
    # between two of the daemon's writes: busy while a file is open there).
    first = StudySpec(patient_id="NAS0", series=1, instances=40, rows=32, columns=32)
    entered = write_into(run, first, "first")
    run.wait_event("study_placed")
    mounts.umount(nas)
    placed_before = len(placed(storage / "lab"))
    assert placed_before == 40

    second = StudySpec(patient_id="NAS1", series=2, instances=150, rows=32, columns=32)
    entered.update(write_into(run, second, "second"))
    parked = run.wait_event("study_parked")[0]
    assert "does not exist" in parked["error"], parked
    third = StudySpec(patient_id="NAS2", series=1, instances=20, rows=32, columns=32)
    entered.update(write_into(run, third, "third"))
    # Several attempts during the outage; none may create anything under the
    # missing root (the mount point folder on the local disk).
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert os.listdir(nas) == [], f"written under the unmounted share: {os.listdir(nas)}"
        time.sleep(0.02)
    wait_attempts(run, second.study_uid, 3)
    wait_attempts(run, third.study_uid, 2)
    assert os.listdir(nas) == [], f"written under the unmounted share: {os.listdir(nas)}"
    assert len(placed(storage / "lab")) == placed_before
    assert len(run.inbox_files()) == 320

    mounts.bind(storage, nas)  # the share is back, with its lab folder
    run.wait_event("study_resumed", count=2)
    run.wait_drained()
    assert run.terminate() == 0

    # Look under the mount point (a bind mount of the test folder does not
    # carry the mounts below it): the local disk still holds nothing there.
    peek = Path(tempfile.mkdtemp(prefix="peek-", dir=tmp_path.parent))
    try:
        mounts.bind(tmp_path, peek)
        assert os.listdir(peek / "nas") == [], "something was written on the local disk"
        mounts.umount(peek)
    finally:
        peek.rmdir()
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=[*own(run), storage],
        exact=True,
        unique_uids=True,
    )
    assert counts["placed"] == 360 and counts["lab_files"] == 360 and counts["still_in_inbox"] == 0
    assert free_bytes(storage) > 0
