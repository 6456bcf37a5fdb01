"""Two daemons (two receiver nodes, each with its own inbox and state)
placing the same studies into one destination at the same moment."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from faultlib import own
from harness import DaemonProcess, files_under, lab_files, paths_under, wait_for
from pydicom.filebase import DicomBytesIO

from watcher.engine import BATCH
from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec, study_datasets

QUIET = 5.0  # longer than it takes both nodes to read the files and publish it


def pending_files(run: DaemonProcess) -> int:
    """Files of pending studies, as the node's status file says (no process
    is started: the nodes are about to be held still)."""
    try:
        status = json.loads((run.state / "status.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(int(study["files"]) for study in status.get("studies", []))


def placers_of(run: DaemonProcess) -> list[int]:
    """The pids of a node's placer processes."""
    assert run.process is not None
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == run.process.pid and b"watcher.placers" in command:
            pids.append(int(entry.name))
    return pids


def encoded(spec: StudySpec) -> list[tuple[str, bytes]]:
    files = []
    for ds in study_datasets(spec):
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"MR.{ds.SOPInstanceUID}", buffer.getvalue()))
    return files


def test_two_daemons_place_the_same_study_into_one_destination(tmp_path, daemons, account):
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    runs = [DaemonProcess(tmp_path / f"node{n}", quiet_seconds=QUIET) for n in range(2)]
    daemons.extend(runs)
    for run in runs:
        run.add_rule("lab", lab)
    # The first study spans several placement batches, so that the nodes,
    # placing it in opposite orders, both begin with files the other has not.
    per_series = 5 * BATCH // 8
    first = encoded(
        StudySpec(patient_id="TWIN1", series=4, instances=per_series, rows=32, columns=32)
    )
    second = encoded(StudySpec(patient_id="TWIN2", series=2, instances=150, rows=32, columns=32))
    # The same study reaches both nodes, as two receivers fed by one scanner:
    # file k of node 0 is written with file N-1-k of node 1, so the nodes
    # read, and place, each study in opposite orders and their placements
    # cross. Each node names its files its own way.
    names = [
        [f"MR.{hashlib.sha256(f'{n}{name}'.encode()).hexdigest()}" for name, _ in first + second]
        for n in range(2)
    ]
    before = paths_under(tmp_path)
    for run in runs:
        run.start()
    for run in runs:
        run.wait_event("watching")
    entered: dict[str, str] = {}
    # Each node first places a small study of its own, so that both have
    # their placer for the lab running before the race below.
    for n, run in enumerate(runs):
        for name, data in encoded(StudySpec(patient_id=f"WARM{n}", series=1, instances=2)):
            (run.inbox / name).write_bytes(data)
            entered[str(run.inbox / name)] = hashlib.sha256(data).hexdigest()
    for run in runs:
        run.wait_event("manifest_written")
        run.wait_drained()
    for study in (first, second):
        offset = 0 if study is first else len(first)
        for k in range(len(study)):
            for n, index in ((0, k), (1, len(study) - 1 - k)):
                path = runs[n].inbox / names[n][offset + index]
                data = study[index][1]
                path.write_bytes(data)
                entered[str(path)] = hashlib.sha256(data).hexdigest()
    # Both nodes have read every file and wait for the studies to go quiet.
    # Held still until then, node 1 is let go first and node 0 as soon as
    # node 1 has begun writing the first study: node 0 then begins at the
    # end node 1 has not reached, however busy the machine is.
    for run in runs:
        wait_for(lambda r=run: pending_files(r) == len(first) + len(second), 30, "files read")
    for run in runs:
        assert run.process is not None
        run.process.send_signal(signal.SIGSTOP)
    held: list[int] = []
    try:
        placed_lines = [line for run in runs for line in run.logs("study_placed")]
        assert len(placed_lines) == 2, "placed before the pause"
        time.sleep(QUIET + 0.5)
        runs[1].process.send_signal(signal.SIGCONT)
        wait_for(lambda: files_under(lab / "TWIN1"), 30, "node 1 writing", every=0.005)
        # Node 1's placer is held while node 0 begins: node 0 then places
        # files node 1 has not, whatever the machine's load.
        held = placers_of(runs[1])
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        written = len(files_under(lab / "TWIN1"))
        runs[0].process.send_signal(signal.SIGCONT)
        wait_for(lambda: len(files_under(lab / "TWIN1")) > written, 30, "node 0 writing")
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        for run in runs:
            run.process.send_signal(signal.SIGCONT)
    for run in runs:
        run.wait_drained(timeout=60)
    for run in runs:
        wait_for(lambda r=run: len(r.logs("manifest_written")) >= 3, 30, "the manifests")
        assert run.terminate() == 0

    placed = lab_files(lab)
    assert len(placed) == len(first) + len(second) + 4, "exactly one copy of each instance"
    assert not [p for p in placed if "~" in p.name], "no instance went beside itself"
    assert not [p for p in files_under(lab) if p.name.startswith(TEMP_PREFIX)]
    for patient, files in (("TWIN1", first), ("TWIN2", second)):
        manifest = json.loads((lab / patient / "SMITH^Memory" / "manifest.json").read_text())
        assert manifest["files"] == len(files), "neither node's manifest lost the other's entries"
    new_by_node: dict[str, list[int]] = {}
    for run in runs:
        for line in run.logs("study_placed"):
            if line["patient"].startswith("WARM"):
                continue
            new_by_node.setdefault(line["patient"], []).append(int(line["new"]))
    assert any(min(new) > 0 for new in new_by_node.values()), (
        f"the nodes never placed a study at the same moment: {new_by_node}"
    )
    counts = account(
        entered,
        [lab],
        [run.state for run in runs],
        None,
        root=tmp_path,
        before=before,
        allowed=[path for run in runs for path in own(run)],
        exact=True,
        unique_uids=True,
        extra={"new_by_node": new_by_node},
    )
    assert counts["entered"] == 2 * (len(first) + len(second)) + 4
    assert counts["distinct_contents"] == counts["lab_files"] == len(first) + len(second) + 4
    assert all(not any(run.inbox_files()) for run in runs)
