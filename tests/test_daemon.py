"""The daemon, run for real as a subprocess on temporary folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import yaml
from harness import (
    DaemonProcess,
    assert_accounted,
    files_under,
    lab_files,
    sha256,
    snapshot,
    wait_for,
    write_in_chunks,
)

from watcher.engine import BATCH
from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec, make_dataset, study_datasets, write_dataset, write_study

CORPUS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent


def uids_in(folder: Path) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files_under(folder)}


def test_burst_of_interleaved_studies_is_placed_and_the_inbox_drains(daemon, lab, tmp_path):
    run = daemon()
    run.add_rule("smith", lab)
    run.start()
    specs = [StudySpec(patient_id=f"P{n}", series=3, instances=40) for n in range(3)]
    studies = [list(study_datasets(spec)) for spec in specs]
    entered = {}
    # Interleave the three studies instance by instance, as three senders would.
    for batch in zip(*studies, strict=True):
        for ds in batch:
            path = write_dataset(ds, run.inbox / f"MR.{ds.SOPInstanceUID}")
            entered[str(path)] = sha256(path)
    run.wait_event("study_placed", count=3)
    run.wait_drained()
    assert run.terminate() == 0
    placed = run.logs("study_placed")
    assert sorted(int(line["files"]) for line in placed) == [120, 120, 120]
    assert {line["patient"] for line in placed} == {"P0", "P1", "P2"}
    for n in range(3):
        assert len(lab_files(lab / f"P{n}")) == 120
        study_folder = lab / f"P{n}" / "SMITH^Memory"
        assert sorted(p.name for p in study_folder.iterdir() if p.is_dir()) == [
            "001_T1_MPRAGE",
            "002_rfMRI_REST",
            "003_DWI_AP",
        ]  # one folder per series
        manifest = json.loads((study_folder / "manifest.json").read_text())
        assert manifest["files"] == 120 and manifest["patient_id"] == f"P{n}"
    counts = assert_accounted(entered, [lab], run.state)
    assert counts["placed"] == 360


def test_a_file_written_slowly_is_read_only_when_complete(daemon, lab):
    run = daemon(settle_seconds=0.3, quarantine_after_seconds=1.0)
    run.add_rule("smith", lab)
    run.start()
    source = write_dataset(make_dataset(Rows=64, Columns=64), run.root / "slow.dcm")
    data = source.read_bytes()
    # Pauses longer than settle_seconds: the writer still has the file open.
    write_in_chunks(run.inbox / "MR.slow", data, chunks=6, pause=0.5)
    run.wait_drained()
    run.wait_event("study_placed")
    placed = lab_files(lab)
    assert len(placed) == 1 and placed[0].read_bytes() == data
    assert not run.logs("quarantined")


def test_unreadable_files_are_quarantined_with_their_reason(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    run.start()
    (run.inbox / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (run.inbox / "notes.txt").write_text("not a scan")
    (run.inbox / "empty.dcm").write_bytes(b"")
    good = write_dataset(make_dataset(Rows=32, Columns=32), run.root / "whole.dcm").read_bytes()
    (run.inbox / "cut.dcm").write_bytes(good[: int(len(good) * 0.6)])
    run.wait_event("quarantined", count=4)
    run.wait_drained()
    quarantined = {p.name: p for p in files_under(run.state / "quarantine")}
    reasons = {
        name: p.read_text() for name, p in quarantined.items() if name.endswith(".reason.txt")
    }
    assert "truncated" in reasons["cut.dcm.reason.txt"]
    assert "empty" in reasons["empty.dcm.reason.txt"]
    assert "not a DICOM file" in reasons["notes.txt.reason.txt"]
    assert quarantined["cut.dcm"].read_bytes() == good[: int(len(good) * 0.6)]
    assert lab_files(lab) == []


def test_one_folder_per_study_inbox_and_folders_created_while_running(daemon, lab):
    run = daemon(empty_folder_seconds=0.5)
    run.add_rule("smith", lab)
    run.start()
    run.wait_event("watching")
    # storescp -su: a sub-folder per study, created after the watch started.
    for n in range(2):
        write_study(StudySpec(patient_id=f"S{n}", series=2, instances=5), run.inbox / f"study{n}")
    run.wait_event("study_placed", count=2)
    run.wait_drained()
    wait_for(lambda: len(lab_files(lab)) == 20, 10, "20 instances (and no temporary manifest)")
    wait_for(lambda: not any(run.inbox.iterdir()), 10, "the emptied study folders to go")


def test_kill_9_mid_placement_loses_nothing_and_duplicates_nothing(daemon, lab):
    run = daemon(quiet_seconds=0.5)
    run.add_rule("smith", lab)
    spec = StudySpec(series=4, instances=250, rows=32, columns=32)
    write_study(spec, run.inbox)
    entered = snapshot(run.inbox)
    run.start()
    # Kill as the first files reach the lab: some are linked into place,
    # none has left the inbox yet. The restart must find those, not copy
    # them again beside themselves.
    placing = lambda: any(path.is_file() for path in lab.rglob("*"))  # noqa: E731
    wait_for(placing, 60, "the first files in the lab", every=0.001)
    run.kill()
    assert run.inbox_files() and lab_files(lab), "the kill missed the placement: nothing tested"
    run.start()
    run.wait_drained(timeout=120)
    run.wait_event("study_placed")
    assert run.terminate() == 0
    counts = assert_accounted(entered, [lab], run.state)
    assert counts["placed"] == 1000
    assert len(lab_files(lab)) == 1000  # no duplicates under suffixed names
    assert not [p for p in lab.rglob(f"{TEMP_PREFIX}*")]


def retry_states(run) -> list[Path]:
    """The saved retry states (not the temporary file of one being replaced)."""
    return [p for p in (run.state / "retry").glob("*.json") if not p.name.startswith(TEMP_PREFIX)]


def test_missing_destination_parks_the_study_then_places_it_when_it_appears(daemon, tmp_path):
    mount = tmp_path / "nas"
    mount.mkdir()
    destination = mount / "smithlab"  # not there: the share is "unmounted"
    run = daemon()
    run.add_rule("smith", destination)
    run.start()
    write_study(StudySpec(series=1, instances=4), run.inbox)
    entered = snapshot(run.inbox)
    parked = run.wait_event("study_parked")
    assert "does not exist" in parked[0]["error"]
    time.sleep(3)  # several retries happen meanwhile
    assert len(run.logs("study_parked")) == 1, "a parked study is logged once per change of state"
    assert list(mount.iterdir()) == [], "nothing may be created under a missing root"
    assert len(run.inbox_files()) == 4
    retry_files = retry_states(run)
    assert len(retry_files) == 1
    assert json.loads(retry_files[0].read_text())["attempts"] >= 1
    wait_for(
        lambda: any(s["next"].startswith("parked") for s in run.status().get("studies", [])),
        10,
        "the parked study in status",
    )
    destination.mkdir()
    run.wait_event("study_resumed", timeout=30)
    run.wait_drained()
    run.wait_event("study_placed")  # its manifest is written too
    assert not retry_states(run)
    assert_accounted(entered, [destination], run.state)


def test_retry_state_survives_a_restart_without_hammering(daemon, tmp_path):
    destination = tmp_path / "nas" / "absent"
    run = daemon(park_first_seconds=30, park_max_seconds=60)
    run.add_rule("smith", destination)
    run.start()
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_parked")
    assert run.terminate() == 0
    saved = json.loads(retry_states(run)[0].read_text())
    run.start()
    restored = run.wait_event("retry_state_restored")
    assert int(restored[0]["attempts"]) == saved["attempts"]
    assert int(restored[0]["next_try_in"]) > 20
    time.sleep(2)  # a retry would have failed by now, and saved one attempt more
    [state] = retry_states(run)
    assert json.loads(state.read_text())["attempts"] == saved["attempts"], (
        "the restart must not try again at once"
    )


def test_rules_reload_and_a_broken_file_keeps_its_last_good_version(daemon, lab):
    run = daemon()
    rule = run.add_rule("smith", lab, match={"StudyDescription": "^SMITH"})
    run.start()
    run.wait_event("rules_loaded")
    rule.write_text("match:\n  StudyDescription: '^SMITH'\ndestination: [unclosed\n")
    problem = run.wait_event("rule_problem")
    assert f"{rule}:" in problem[0]["problem"]
    write_study(StudySpec(series=1, instances=3), run.inbox)
    run.wait_event("study_placed")
    run.wait_drained()
    assert len(lab_files(lab)) == 3


def test_unmatched_studies_are_kept_whole_and_routed_again_when_rules_change(daemon, lab, tmp_path):
    run = daemon()
    run.add_rule("smith", lab, match={"StudyDescription": "^SMITH"})
    run.start()
    spec = StudySpec(series=2, instances=3, description="JONES^Pilot")
    write_study(spec, run.inbox)
    entered = snapshot(run.inbox)
    run.wait_event("study_unmatched")
    run.wait_drained()
    kept = files_under(run.state / "unmatched")
    assert len(kept) == 6 and {p.parent.name for p in kept} == {spec.study_uid}
    jones = tmp_path / "nas" / "joneslab"
    jones.mkdir()
    run.add_rule("jones", jones, match={"StudyDescription": "^JONES"})
    [rerouted] = run.wait_event("unmatched_rerouted")
    assert rerouted["files"] == "6"
    [placed] = run.wait_event("study_placed")
    assert placed["study"] == spec.study_uid and placed["files"] == "6"
    assert len(lab_files(jones)) == 6
    assert len(list(jones.rglob("manifest.json"))) == 1, "placed as any study is"
    assert files_under(run.state / "unmatched") == []
    assert_accounted(entered, [jones], run.state)


def test_a_late_series_goes_into_the_same_study_folder(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    run.start()
    spec = StudySpec(series=1, instances=3)
    write_study(spec, run.inbox)
    run.wait_event("study_placed")
    late = make_dataset(
        StudyInstanceUID=spec.study_uid,
        SeriesNumber=7,
        SeriesDescription="late",
        PatientID=spec.patient_id,
        StudyDescription=spec.description,
    )
    write_dataset(late, run.inbox / "MR.late")
    placed = run.wait_event("study_placed", count=2)
    assert placed[0]["destination"] == placed[1]["destination"]
    study_folder = lab / spec.patient_id / spec.description
    assert sorted(p.name for p in study_folder.iterdir()) == [
        "001_T1_MPRAGE",
        "007_late",
        "manifest.json",
    ]


def test_sigterm_finishes_and_exits_zero_and_once_drains(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    run.start()
    run.wait_event("started")
    assert run.terminate() == 0
    assert run.logs("stopped")
    write_study(StudySpec(series=2, instances=3), run.inbox)
    once = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "run",
            "--once",
            "--quiet-seconds",
            "0",
            "--config",
            str(run.config_path),
        ],
        capture_output=True,
        timeout=60,
    )
    assert once.returncode == 0, once.stderr
    assert run.inbox_files() == []
    assert len(lab_files(lab)) == 6


# A command's loop waiting on its stop, as `web` does from the moment it
# listens, while SIGTERM comes. A handler that set a threading.Event hung
# the process whenever the signal landed while the main thread held the
# event's lock (3 runs in 5 when the loop waits in short turns).
STOP_LOOP = """
import logging, sys, threading
from watcher.stopping import stop_on_signals
logging.basicConfig(level=logging.INFO, format="%(message)s")
stop = stop_on_signals()
other = threading.Thread(target=stop.wait)
other.start()
print("waiting", flush=True)
while not stop.wait(0):
    pass
other.join(5)
print("stopped", "other thread woke" if not other.is_alive() else "other thread asleep")
"""


def test_a_signal_stops_a_loop_at_any_moment_of_its_wait_in_every_thread():
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", STOP_LOOP], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert child.stdout is not None and child.stdout.readline() == b"waiting\n"
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        try:
            out, err = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            raise AssertionError("SIGTERM did not stop the loop: the process hung") from None
        assert child.returncode == 0, err
        assert out == b"stopped other thread woke\n"
        assert err.decode().splitlines() == ["event=stopping signal=SIGTERM"]


def test_once_drains_pydicom_corpus_and_synthetic_studies_accounting_by_hash(daemon, lab, tmp_path):
    run = daemon()
    run.add_rule(
        "all", lab, path="{PatientID}/{StudyInstanceUID}/{SeriesNumber:03d}/{SOPInstanceUID}.dcm"
    )
    for index, source in enumerate(sorted(p for p in CORPUS.rglob("*") if p.is_file())):
        (run.inbox / f"corpus{index:03d}_{source.name}").write_bytes(source.read_bytes())
    for n in range(2):
        write_study(StudySpec(patient_id=f"SYN{n}", series=2, instances=10), run.inbox / f"syn{n}")
    entered = snapshot(run.inbox)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "run",
            "--once",
            "--quiet-seconds",
            "0",
            "--config",
            str(run.config_path),
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert run.inbox_files() == []
    counts = assert_accounted(entered, [lab], run.state)
    assert counts["quarantine"] >= 20  # DICOMDIRs, text, truncated, no UIDs
    assert counts["placed"] >= 150


def test_status_reports_pending_studies(daemon, lab):
    run = daemon(quiet_seconds=30)
    run.add_rule("smith", lab)
    run.start()
    write_study(StudySpec(patient_id="WAITING", series=1, instances=3), run.inbox)

    def pending():  # the study with its three files read (they arrive one by one)
        status = run.status()
        studies = status.get("studies") or [{}]
        return studies[0].get("files") == 3 and status

    status = wait_for(pending, 20, "a pending study of 3 files in status")
    study = status["studies"][0]
    assert study["patient"] == "WAITING" and study["files"] == 3
    assert study["next"].startswith("complete in")
    assert status["running"] is True
    human = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "WAITING" in human.stdout and "running" in human.stdout


def test_config_errors_are_one_clear_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("inbox: ./in\nquiet_secs: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'quiet_secs'" in result.stderr
    assert "Traceback" not in result.stderr


def test_log_file_and_json_lines(daemon, lab, tmp_path):
    run = daemon()
    run.add_rule("smith", lab)
    log_file = tmp_path / "watcher.log"
    run.start("--log-file", str(log_file))
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_placed")
    wait_for(lambda: log_file.exists() and "study_placed" in log_file.read_text(), 10)
    # logrotate moves the file away; the daemon goes on writing a new one.
    log_file.rename(tmp_path / "watcher.log.1")
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_placed", count=2)
    wait_for(lambda: log_file.exists() and "study_placed" in log_file.read_text(), 10)
    record = json.loads(log_file.read_text().splitlines()[-1])
    assert {"time", "level", "event"} <= record.keys()
    placed = run.logs("study_placed")[0]
    assert {"lab", "patient", "study", "files", "bytes", "seconds", "destination"} <= placed.keys()


def test_two_daemons_on_one_destination_leave_one_copy_each(tmp_path):
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    spec = StudySpec(series=2, instances=100)
    datasets = list(study_datasets(spec))
    runs = [DaemonProcess(tmp_path / f"node{n}", quiet_seconds=0.5) for n in range(2)]
    try:
        for run in runs:
            run.add_rule("lab", lab)
            for ds in datasets:  # the same study received by both nodes
                write_dataset(ds, run.inbox / f"MR.{ds.SOPInstanceUID}")
        entered = snapshot(runs[0].inbox)
        threads = [threading.Thread(target=run.start) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for run in runs:
            run.wait_drained(timeout=60)
            run.wait_event("study_placed")  # its manifest is written too
        assert len(lab_files(lab)) == 200
        assert_accounted(entered, [lab], runs[0].state)
    finally:
        for run in runs:
            run.close()


def test_symlinked_inbox_entries_and_temporaries_are_ignored(daemon, lab, tmp_path):
    run = daemon()
    run.add_rule("smith", lab)
    outside = write_dataset(make_dataset(), tmp_path / "outside.dcm")
    os.symlink(outside, run.inbox / "link.dcm")
    (run.inbox / f"{TEMP_PREFIX}abc.partial").write_bytes(b"partial")
    run.start()
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_placed")
    assert len(lab_files(lab)) == 2
    assert outside.exists()


def test_sigterm_mid_placement_exits_zero_and_a_restart_finishes_without_duplicates(daemon, lab):
    run = daemon(quiet_seconds=0.5)
    run.add_rule("smith", lab)
    # Three placement batches; SIGTERM comes while the first is being placed
    # (its first files are in the lab), and the batch in hand is finished.
    per_series = 3 * BATCH // 4
    write_study(StudySpec(series=4, instances=per_series, rows=32, columns=32), run.inbox)
    entered = snapshot(run.inbox)
    run.start()
    placing = lambda: any(path.is_file() for path in lab.rglob("*"))  # noqa: E731
    wait_for(placing, 60, "the first files in the lab", every=0.001)
    assert run.terminate() == 0
    assert run.logs("stopped")
    left = len(run.inbox_files())
    assert 0 < left < 4 * per_series, "SIGTERM came before or after the placement: nothing tested"
    run.start()
    run.wait_drained(timeout=120)
    run.wait_event("study_placed")  # its manifest is written too
    counts = assert_accounted(entered, [lab], run.state)
    assert counts["placed"] == 4 * per_series and len(lab_files(lab)) == 4 * per_series
    [manifest] = lab.rglob("manifest.json")  # what the stopped run placed is listed too
    assert len(json.loads(manifest.read_text())["instances"]) == 4 * per_series


def run_once(run: DaemonProcess) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "run", "--once", "--quiet-seconds", "0"]
        + ["--config", str(run.config_path), "--log-format", "json"],
        capture_output=True,
        timeout=300,
    )


def json_events(output: bytes, event: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in output.decode().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == event]


def test_once_places_large_studies_batch_by_batch_in_its_workers(daemon, tmp_path):
    # Each study spans two placement batches, which `run --once` places side
    # by side in its worker processes; each batch's outcomes come back to
    # the daemon, which accounts for every file and writes whole manifests.
    # (settle_seconds 0: files just written are read at once, as the bench does,
    # so that no study is placed in two parts.)
    per_study = BATCH + 96
    run = daemon(settle_seconds=0)
    labs = {}
    for n in range(2):
        labs[n] = tmp_path / f"lab{n}"
        labs[n].mkdir()
        run.add_rule(f"lab{n}", labs[n], match={"PatientID": f"^BIG{n}$"}, manifest=True)
        write_study(
            StudySpec(patient_id=f"BIG{n}", series=2, instances=per_study // 2),
            run.inbox / f"study{n}",
        )
    entered = snapshot(run.inbox)
    done = run_once(run)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert run.inbox_files() == []
    counts = assert_accounted(entered, labs.values(), run.state, exact=True, unique_uids=True)
    assert counts["placed"] == 2 * per_study
    for lab in labs.values():
        [manifest] = lab.rglob("manifest.json")
        listed = json.loads(manifest.read_text())["instances"]
        assert len(listed) == per_study
        assert all(sha256(manifest.parent / item["path"]) == item["sha256"] for item in listed)
    placed = json_events(done.stderr, "study_placed")
    assert sorted(int(str(event["files"])) for event in placed) == [per_study, per_study]


def test_once_parks_a_study_whose_lab_is_missing_when_a_worker_finds_it(daemon, tmp_path):
    # The refusal (DestinationUnavailable) is found in a worker process and
    # comes back pickled; the study stays whole in the inbox, the other is placed.
    run = daemon(settle_seconds=0)
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.mkdir()
    run.add_rule("present", present, match={"PatientID": "^OK$"})
    run.add_rule("missing", missing, match={"PatientID": "^GONE$"})
    for patient in ("OK", "GONE"):
        write_study(
            StudySpec(patient_id=patient, series=2, instances=(BATCH + 96) // 2),
            run.inbox / patient,
        )
    gone = {path for path in files_under(run.inbox / "GONE")}
    done = run_once(run)
    assert done.returncode == 1, "a parked study leaves `run --once` incomplete"
    assert set(files_under(run.inbox)) == gone
    assert len(lab_files(present)) == BATCH + 96
    [parked] = json_events(done.stderr, "study_parked")
    assert f"destination {missing} unavailable" in str(parked["error"])
    assert not missing.exists(), "a missing destination is never created"


def start_once(run: DaemonProcess) -> subprocess.Popen[bytes]:
    """`run --once` in the background, in a session of its own (with its workers)."""
    return subprocess.Popen(
        [sys.executable, "-m", "watcher", "run", "--once", "--quiet-seconds", "0"]
        + ["--config", str(run.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_first_files(lab: Path) -> None:
    placing = lambda: any(path.is_file() for path in lab.rglob("*"))  # noqa: E731
    wait_for(placing, 120, "the first files in the lab", every=0.001)


def test_once_killed_while_its_workers_place_several_studies_loses_and_repeats_nothing(daemon, lab):
    # Three studies of two batches each: the workers place one while the
    # next is routed and journaled. After a kill -9 as the first files reach
    # the lab (linked or copied, their sources not yet removed), a second run
    # removes what was left half-done and places everything, once each.
    run = daemon(settle_seconds=0)
    run.add_rule("smith", lab, manifest=True)
    per_study = BATCH + 200
    for n in range(3):
        write_study(
            StudySpec(patient_id=f"P{n}", series=2, instances=per_study // 2, rows=4, columns=4),
            run.inbox / f"study{n}",
        )
    entered = snapshot(run.inbox)
    first = start_once(run)
    try:
        wait_for_first_files(lab)
    finally:
        os.killpg(first.pid, 9)  # its workers with it
        first.wait(timeout=60)
    assert run.inbox_files(), "the kill came after the placement: nothing tested"
    done = run_once(run)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert run.inbox_files() == []
    counts = assert_accounted(entered, [lab], run.state, exact=True, unique_uids=True)
    assert counts["placed"] == 3 * per_study
    assert len(lab_files(lab)) == 3 * per_study  # no duplicates under suffixed names
    assert not list(lab.rglob(f"{TEMP_PREFIX}*"))
    assert not (run.state / "placing.json").exists()


def test_once_stopped_by_sigterm_mid_placement_accounts_for_what_its_workers_placed(daemon, lab):
    # Six batches, placed side by side by the workers: SIGTERM comes as the
    # first are placed. Batches a worker has begun are finished and counted,
    # the others are not begun; a second run places the rest, once each.
    run = daemon(settle_seconds=0)
    run.add_rule("smith", lab, manifest=True)
    per_series = 3 * BATCH // 2
    write_study(StudySpec(series=4, instances=per_series, rows=4, columns=4), run.inbox)
    total = 4 * per_series
    entered = snapshot(run.inbox)
    first = start_once(run)
    try:
        wait_for_first_files(lab)
        first.terminate()
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    left = len(run.inbox_files())
    assert 0 < left < total, "SIGTERM came before or after the placement: nothing tested"
    assert len(lab_files(lab)) == total - left, "every file gone from the inbox is in the lab"
    done = run_once(run)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert run.inbox_files() == []
    counts = assert_accounted(entered, [lab], run.state, exact=True, unique_uids=True)
    assert counts["placed"] == total
    [manifest] = lab.rglob("manifest.json")
    assert len(json.loads(manifest.read_text())["instances"]) == total


def test_a_changed_config_file_is_said_once_and_applies_at_the_next_start(tmp_path):
    """Rule files apply by themselves; the config (labs: with them) only at
    a restart. An operator who edits it is told so, once, not every turn."""
    daemon = DaemonProcess(tmp_path)
    try:
        daemon.start()
        daemon.wait_event("started")
        config = yaml.safe_load(daemon.config_path.read_text())
        daemon.config_path.write_text(yaml.safe_dump({**config, "quiet_seconds": 30}))
        (line,) = daemon.wait_event("config_changed")
        assert line["path"] == str(daemon.config_path.resolve())
        assert "restart" in line["action"]
        time.sleep(1.5)  # several rule checks (rules_check_seconds 0.3)
        assert len(daemon.logs("config_changed")) == 1
    finally:
        daemon.close()


def test_a_lab_folder_without_labs_in_the_config_is_said_not_ignored_silently(tmp_path):
    daemon = DaemonProcess(tmp_path)
    (daemon.rules / "smithlab").mkdir()
    try:
        daemon.start()
        (line,) = daemon.wait_event("rules_warning")
        assert "smithlab/ is not a lab of the config" in line["warning"]
    finally:
        daemon.close()
