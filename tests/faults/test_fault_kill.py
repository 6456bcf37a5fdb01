"""kill -9 of the daemon at random moments while three storescu senders
transfer studies to a real storescp, restarting it each time, and kill -9
at the moment a study's manifest is being written. A kill comes after a
random while (in which files may arrive, be read or be placed), except
every other time the inbox holds files: then it is aimed at their
placement, at a random moment in the first 10 ms after it began.

What entered the inbox: storescp writes the files and the daemon moves them
away, so the inbox cannot be snapshotted at the end. A capture thread
hard-links every file storescp creates into `captured/` as soon as it sees it
(every 10 ms; the daemon waits for a file to settle and its study to go quiet
before it moves anything, so no file leaves the inbox unseen). A hard link
shares the file's inode, so the capture holds the bytes storescp finished
writing, without copying. The capture is checked against the sent data sets
(every SOPInstanceUID sent is captured exactly once), then the shared
accounting check runs on the capture's hashes, and every placed instance is
compared with the data set that was sent.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pydicom
import pytest
from faultlib import Storescp, own
from harness import DaemonProcess, lab_files, paths_under, sha256, wait_for

from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec, study_datasets, write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KILLS = 20
#: Associations per sender: the transfer is paced by the kills, two a batch.
BATCHES = 10
SENDERS = 3


class Capture(threading.Thread):
    """Hard-links each new inbox file into `into`, once."""

    def __init__(self, inbox: Path, into: Path) -> None:
        super().__init__(name="inbox-capture", daemon=True)
        self.inbox, self.into = inbox, into
        self.seen: set[str] = set()
        self.done = threading.Event()
        into.mkdir(parents=True)

    def run(self) -> None:
        while not self.done.is_set():
            self.sweep()
            time.sleep(0.01)
        self.sweep()

    def sweep(self) -> None:
        for folder, _, names in os.walk(self.inbox):
            for name in names:
                path = os.path.join(folder, name)
                if name.startswith(TEMP_PREFIX) or path in self.seen:
                    continue
                try:
                    os.link(path, self.into / f"{len(self.seen):05d}.{name}")
                except FileNotFoundError:
                    continue
                self.seen.add(path)


def _journal_since(journal: Path, since: float) -> bool:
    """True while the running daemon is placing (its journal is written)."""
    try:
        return journal.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def wait_for_placement(journal: Path, since: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _journal_since(journal, since) and time.monotonic() < deadline:
        time.sleep(0.002)


def received_values(path: Path) -> dict[object, object]:
    """The data set's element values, File Meta, group lengths and trailing
    padding aside (what a network transfer keeps)."""
    ds = pydicom.dcmread(path)
    return {e.tag: e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def test_kill_9_at_random_moments_during_three_transfers(tmp_path, daemons, storescp, account):
    rng = random.Random(os.environ.get("FAULT_SEED", "kill-9"))
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    run = DaemonProcess(tmp_path / "node", quiet_seconds=0.3, settle_seconds=0.2)
    daemons.append(run)
    run.add_rule("lab", lab)
    # Three studies; sender k sends series k of each, in BATCHES associations.
    batches = [
        [tmp_path / "outgoing" / f"sender{k}" / f"batch{b}" for b in range(BATCHES)]
        for k in range(SENDERS)
    ]
    sent: dict[str, Path] = {}
    for number in range(3):
        spec = StudySpec(
            patient_id=f"KILL{number}", series=SENDERS, instances=50, rows=64, columns=64
        )
        for ds in study_datasets(spec):
            k, n = int(ds.SeriesNumber) - 1, int(ds.InstanceNumber) - 1
            sent[ds.SOPInstanceUID] = write_dataset(
                ds, batches[k][n * BATCHES // spec.instances] / f"{ds.SOPInstanceUID}.dcm"
            )
    receiver = Storescp(run.inbox)
    storescp.append(receiver)
    capture = Capture(run.inbox, tmp_path / "captured")
    before = paths_under(tmp_path)
    capture.start()

    kills = 0
    kill_log: list[dict[str, object]] = []
    results: list[int] = []

    def sender(folders: list[Path]) -> None:
        for number, folder in enumerate(folders):
            results.append(receiver.send(folder).wait(120))
            # Pace the transfer by the kills, so that all of them happen
            # while the senders are still sending.
            quota = KILLS * (number + 1) // BATCHES
            wait_for(lambda q=quota: kills >= q, 120, f"{quota} kills")

    threads = [
        threading.Thread(target=sender, args=(b,), name=f"sender{k}") for k, b in enumerate(batches)
    ]
    starts = 0
    aim = False
    try:
        started_at = time.time()
        run.start()
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            aim = bool(run.inbox_files()) and not aim
            if aim:
                # Aimed at the placement of what the inbox holds: a random
                # moment after the daemon's journal says it began (the
                # journal is written before anything else).
                wait_for_placement(run.state / "placing.json", started_at, 5.0)
                time.sleep(rng.uniform(0.0, 0.01))
            else:
                time.sleep(rng.uniform(0.1, 1.6))  # the daemon runs a random while
            placing = _journal_since(run.state / "placing.json", started_at)
            run.kill()  # SIGKILL
            kills += 1
            kill_log.append(
                {
                    "placing": placing,
                    "inbox": len(run.inbox_files()),
                    "temporaries": len(list(lab.rglob(f"{TEMP_PREFIX}*"))),
                }
            )
            time.sleep(rng.uniform(0.05, 0.5))
            starts = len(run.logs("started"))
            started_at = time.time()
            run.start()
        for thread in threads:
            thread.join()
        assert results == [0] * (SENDERS * BATCHES), "every association stored every file"

        def all_placed() -> bool:
            return len(lab_files(lab)) >= len(sent) and not run.inbox_files()

        wait_for(all_placed, 120, f"{len(sent)} instances placed and the inbox drained")
        run.wait_event("started", count=starts + 1)  # the last run is up: SIGTERM is handled
        assert run.terminate() == 0
    finally:
        capture.done.set()
        capture.join()
        for thread in threads:
            thread.join(130)

    assert kills >= KILLS
    mid_placement = sum(1 for k in kill_log if k["placing"])
    assert mid_placement, "no kill landed inside a placement: the test missed its aim"
    with_temporaries = sum(1 for k in kill_log if k["temporaries"])
    print(
        f"{kills} kills, {mid_placement} during a placement, {with_temporaries} with a "
        f"temporary file in the lab tree; cleaned at start-up: "
        f"{sum(int(r['temporary_files']) for r in run.logs('cleaned_interrupted_placement'))}"
    )
    captured = {str(p): sha256(p) for p in (tmp_path / "captured").iterdir()}
    captured_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in captured]
    assert sorted(captured_uids) == sorted(sent), "the capture saw each sent instance once"
    placed = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in lab_files(lab)}
    for uid, source in sent.items():
        assert received_values(placed[uid]) == received_values(source), f"{uid} placed altered"
    counts = account(
        captured,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=[*own(run), tmp_path / "captured", tmp_path / "outgoing"],
        exact=True,
        unique_uids=True,
        extra={
            "kills": kills,
            "kills_during_placement": mid_placement,
            "kills_with_lab_temporaries": with_temporaries,
        },
    )
    assert counts["placed"] == len(sent) == counts["lab_files"] == 450
    assert counts["still_in_inbox"] == 0


def test_kill_9_while_a_manifest_is_being_written(tmp_path, daemons, account):
    """The worst moment for a kill: the study's files are placed and its
    manifest is half written (its temporary file exists in the lab tree)."""
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    run = DaemonProcess(tmp_path / "node", quiet_seconds=0.3)
    daemons.append(run)
    run.add_rule("lab", lab)
    staging = tmp_path / "staging"
    before = paths_under(tmp_path)
    run.start()
    run.wait_event("watching")
    entered: dict[str, str] = {}
    hits = 0
    for attempt in range(6):
        spec = StudySpec(patient_id=f"MAN{attempt}", series=1, instances=3)
        folder = lab / spec.patient_id / spec.description
        for ds in study_datasets(spec):
            path = write_dataset(ds, staging / f"MR.{ds.SOPInstanceUID}")
            target = run.inbox / path.name
            target.write_bytes(path.read_bytes())
            entered[str(target)] = sha256(target)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # watch the study folder closely
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            if any(n.startswith(TEMP_PREFIX) and n.endswith("manifest.json") for n in names):
                starts = len(run.logs("started"))
                run.kill()
                hits += 1
                run.start()
                run.wait_event("started", count=starts + 1)
                break
            if "manifest.json" in names:
                break  # too late this time
    assert hits, "never caught a manifest being written"
    run.wait_drained()
    assert run.terminate() == 0
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=[*own(run), staging],
        exact=True,
        unique_uids=True,
        extra={"kills_during_manifest_write": hits},
    )
    assert counts["placed"] == counts["lab_files"] == 18 and counts["still_in_inbox"] == 0
