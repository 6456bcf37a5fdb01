"""Lab automation through the real daemon: hooks, manifests, permissions,
precedence, lab bounds, per-rule completion, and state/ kept private."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from harness import DaemonProcess, FakeClock, in_process_daemon, lab_files, skip_or_fail, wait_for

from watcher.hooks import DaemonStore, HookRunner, make_job
from watcher.labjobs import Mailbox, Result, finish, post, prepare
from watcher.manifest import Entry, manifest_path, write_manifest
from watcher.placement import Placement
from watcher.rules import Hook, single_rule
from watcher.synthetic import StudySpec, make_dataset, write_dataset, write_study

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "rules" / "automation"

RECORDER = """#!/bin/sh
# A stand-in for a real program: records its arguments, one per line, and
# the DW_ environment, then exits with $RECORDER_STATUS (default 0). The
# arguments' file appears last, and whole: a reader that sees it finds both.
out="$RECORDER_DIR/$(basename "$0").$$"
env | grep '^DW_' | sort > "$out.env.partial" && mv "$out.env.partial" "$out.env"
for argument in "$@"; do printf '%s\\n' "$argument"; done > "$out.args.partial"
mv "$out.args.partial" "$out.args"
exit "${RECORDER_STATUS:-0}"
"""


@pytest.fixture
def stand_ins(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ folder with recording stand-ins (sbatch, record), and where they write."""
    bin_folder, records = tmp_path / "bin", tmp_path / "records"
    bin_folder.mkdir()
    records.mkdir()
    for name in ("sbatch", "record"):
        program = bin_folder / name
        program.write_text(RECORDER)
        program.chmod(0o755)
    return bin_folder, records


def environment(bin_folder: Path, records: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{bin_folder}:{os.environ['PATH']}", "RECORDER_DIR": str(records), **extra}


def example_rule(run: DaemonProcess, name: str, destination: Path, **changes: object) -> Path:
    """An example rule file from rules/automation, pointed at `destination`."""
    rule = yaml.safe_load((EXAMPLES / name).read_text())
    rule.update(destination=str(destination), **changes)
    path = run.rules / name
    path.write_text(yaml.safe_dump(rule))
    return path


def recorded(records: Path, program: str) -> list[tuple[list[str], dict[str, str]]]:
    calls = []
    for args in sorted(records.glob(f"{program}.*.args")):
        env_file = args.with_suffix(".env")
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        calls.append((args.read_text().splitlines(), env))
    return calls


def test_dcm2niix_example_converts_the_placed_study(daemon, lab):
    if not shutil.which("dcm2niix"):
        skip_or_fail("dcm2niix is not installed (apt-get install dcm2niix)")
    run = daemon()
    example_rule(run, "dcm2niix.yaml", lab)
    run.start()
    write_study(StudySpec(series=2, instances=8, rows=16, columns=16), run.inbox)
    run.wait_event("hook_done", timeout=60)
    study = lab / "SUBJ01" / "20261125_SMITH^Memory"
    converted = sorted(p.name for p in study.glob("*.nii.gz"))
    assert converted == ["1_T1_MPRAGE.nii.gz", "2_rfMRI_REST.nii.gz"], converted
    assert (study / "1_T1_MPRAGE.json").exists()  # the BIDS sidecar
    assert run.logs("hook_output"), "the converter's output is in the log"
    assert json.loads((study / "manifest.json").read_text())["files"] == 16


def test_slurm_example_submits_with_study_folder_and_manifest(daemon, lab, stand_ins):
    bin_folder, records = stand_ins
    run = daemon()
    example_rule(run, "slurm.yaml", lab, quiet_seconds=0.5)
    run.start(env=environment(bin_folder, records))
    write_study(StudySpec(patient_id="S7", series=1, instances=3), run.inbox)
    run.wait_event("hook_done")
    [(args, env)] = recorded(records, "sbatch")
    study = lab / "S7" / "20261125_SMITH^Memory"
    assert args == [
        "--job-name=dw-smithlab-S7",
        "--output=/nas/smithlab/logs/%j.out",
        "/nas/smithlab/code/preprocess.sbatch",
        str(study),
        str(study / "manifest.json"),
    ]
    assert env["DW_STUDY_FOLDER"] == str(study)
    assert env["DW_FILES"] == "3" and env["DW_LAB"] == "smithlab"
    manifest = json.loads(Path(args[-1]).read_text())
    assert manifest["files"] == 3, "the manifest is complete when the hook runs"
    # The operator's hook, run by the daemon, is recorded in the manifest too
    # (by the destination's placer, soon after).
    manifest = wait_for(
        lambda: (m := json.loads(Path(args[-1]).read_text()))["hooks"][0]["state"] == "done" and m,
        10,
        "the hook's end in the manifest",
    )
    [hook] = manifest["hooks"]
    assert (hook["hook"], hook["state"], hook["exit_status"], hook["attempts"]) == (
        "sbatch",
        "done",
        0,
        1,
    )
    assert hook["queued"] and hook["started"] and hook["finished"]


def test_bids_example_layout_permissions_and_count_completion(daemon, tmp_path):
    bids = tmp_path / "nas" / "joneslab"
    bids.mkdir(parents=True)
    group = grp.getgrnam("daemon")
    run = daemon(quiet_seconds=60)
    example_rule(run, "bids-sourcedata.yaml", bids, group="daemon")
    run.start()
    spec = StudySpec(
        patient_id="042",
        description="JONES^Motor",
        series=2,
        instances=3,
        extra={"ImagesInAcquisition": 3},
    )
    write_study(spec, run.inbox)
    # Complete by ImagesInAcquisition long before the 60 s quiet period.
    run.wait_event("study_complete_by_count", timeout=20)
    run.wait_event("study_placed")
    session = bids / "sourcedata" / "sub-042" / "ses-20261125"
    placed = [p for p in lab_files(bids) if p.suffix == ".dcm"]
    assert len(placed) == 6
    assert sorted(p.name for p in session.iterdir() if p.is_dir()) == [
        "001-T1_MPRAGE",
        "002-rfMRI_REST",
    ]
    for path in placed:
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == group.gr_gid
    for folder in (bids / "sourcedata", session, session / "001-T1_MPRAGE"):
        info = folder.stat()
        assert stat.S_IMODE(info.st_mode) == 0o2750 and info.st_gid == group.gr_gid, folder


def test_manifest_lists_every_instance_and_grows_with_a_late_series(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    run.start()
    spec = StudySpec(series=2, instances=4)
    write_study(spec, run.inbox)
    run.wait_event("manifest_written")
    study = lab / spec.patient_id / spec.description
    manifest = json.loads((study / "manifest.json").read_text())
    assert manifest["study_instance_uid"] == spec.study_uid and manifest["files"] == 8
    for item in manifest["instances"]:
        data = (study / item["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item["sha256"] and len(data) == item["size"]
    assert {item["series_number"] for item in manifest["instances"]} == {"1", "2"}
    late = make_dataset(
        StudyInstanceUID=spec.study_uid,
        SeriesNumber=9,
        SeriesDescription="late",
        PatientID=spec.patient_id,
        StudyDescription=spec.description,
    )
    write_dataset(late, run.inbox / "MR.late")
    run.wait_event("manifest_written", count=2)
    manifest = json.loads((study / "manifest.json").read_text())
    assert manifest["files"] == 9
    assert any(item["path"].startswith("009_late/") for item in manifest["instances"])
    assert not list(study.glob(".dicom-watcher-tmp*"))


def test_manifest_lines_are_json_for_any_value_and_a_merge_keeps_earlier_entries(tmp_path):
    # Values with quotes, backslashes, control and non-ASCII characters: the
    # manifest is valid JSON with every value as given, one instance a line,
    # in path order; a second write adds to the entries of the first.
    [rule] = single_rule(tmp_path / "lab", "{PatientID}/{SeriesNumber}/{InstanceNumber}.dcm").rules
    odd = ["1.2.3", 'quote " back \\ slash', "tab\tnew\nline\x01", "Ünïcödé \u2028 名前", ""]

    def entries(names: list[str]) -> list[Entry]:
        folder = tmp_path / "lab" / "P" / "1"
        return [
            Entry(
                f"uid-{name}",
                f"series {value}",
                value,
                Placement(folder, name, "placed", 7, None, "ab"),
            )
            for name, value in zip(names, odd, strict=False)
        ]

    path = manifest_path(rule, "P/1/x.dcm", "1.2.3")
    path.parent.mkdir(parents=True)
    first = entries(["b.dcm", "a.dcm", "e.dcm"])
    second = entries(["d.dcm", "c.dcm"])
    write_manifest(path, study_uid="1.2.3", rule=rule, patient='P "1"', entries=first)
    written = write_manifest(path, study_uid="1.2.3", rule=rule, patient='P "1"', entries=second)
    text = path.read_text(encoding="utf-8")
    manifest = json.loads(text)
    assert written["files"] == manifest["files"] == 5 and manifest["bytes"] == 35
    assert manifest["patient_id"] == 'P "1"'
    listed = manifest["instances"]
    assert [item["path"] for item in listed] == [
        "1/a.dcm",
        "1/b.dcm",
        "1/c.dcm",
        "1/d.dcm",
        "1/e.dcm",
    ]
    by_path = {f"1/{e.placement.name}": e for e in first + second}
    for item in listed:
        entry = by_path[item["path"]]
        assert item == {
            "sop_instance_uid": entry.sop_instance_uid,
            "series_instance_uid": entry.series_instance_uid,
            "series_number": entry.series_number,
            "path": item["path"],
            "size": 7,
            "sha256": "ab",
        }
    lines = text.splitlines()
    assert sum(line.lstrip().startswith('{"sop_instance_uid"') for line in lines) == 5


def test_a_failing_hook_is_retried_a_bounded_number_of_times(daemon, lab, stand_ins):
    bin_folder, records = stand_ins
    run = daemon(hook_retry_seconds=0.2)
    run.add_rule("smith", lab, hooks=[{"command": ["record", "{study_uid}"], "retries": 2}])
    run.start(env=environment(bin_folder, records, RECORDER_STATUS="3"))
    write_study(StudySpec(series=1, instances=2), run.inbox)
    gave_up = run.wait_event("hook_gave_up", timeout=30)
    failures = run.logs("hook_failed")
    assert [f["status"] for f in failures] == ["3", "3"]
    assert gave_up[0]["attempts"] == "3"
    assert len(recorded(records, "record")) == 3
    assert len(list((run.state / "hooks" / "failed").glob("*.json"))) == 1
    assert not list((run.state / "hooks").glob("*.json")), "no job left pending"
    run.wait_settled()  # (the manifest's records of the job are written by its placer)
    assert len(lab_files(lab)) == 2, "a failed hook does not undo the placement"


def test_a_hook_that_hangs_is_killed_at_its_timeout(daemon, lab, tmp_path):
    marker = tmp_path / "still-running"
    script = tmp_path / "hang.sh"
    # The hook starts a child, which would touch a marker if it were not killed.
    script.write_text(f"#!/bin/sh\n(sleep 3; touch {marker}) &\nsleep 3600\n")
    script.chmod(0o755)
    run = daemon()
    run.add_rule("smith", lab, hooks=[{"command": [str(script)], "timeout": 1, "retries": 0}])
    run.start()
    write_study(StudySpec(series=1, instances=1), run.inbox)
    gave_up = run.wait_event("hook_gave_up", timeout=30)
    assert "timed out" in gave_up[0]["reason"]
    time.sleep(3.5)
    assert not marker.exists(), "the hook's whole process group was killed"


def test_header_values_cannot_break_out_of_an_argument(daemon, lab, stand_ins, tmp_path):
    bin_folder, records = stand_ins
    pwned = tmp_path / "pwned"
    hostile = f'--exec=x"; touch {pwned}; echo "$(touch {pwned})`touch {pwned}` a b'
    run = daemon()
    run.add_rule(
        "smith",
        lab,
        path="{PatientID}/{SeriesNumber}/{InstanceNumber}.dcm",
        hooks=[{"command": ["record", "--patient={patient}", "{patient}", "{study_folder}"]}],
    )
    run.start(env=environment(bin_folder, records))
    write_dataset(make_dataset(PatientID=hostile), run.inbox / "MR.hostile")
    run.wait_event("hook_done")
    [(args, env)] = recorded(records, "record")
    assert len(args) == 3, "one argument stays one argument"
    assert args[0].startswith("--patient=_-exec=x") and args[1] == args[0][len("--patient=") :]
    assert not args[1].startswith("-"), "a value never starts like an option"
    assert "$(touch" in args[1] and args[1].endswith(" a b"), "kept as text, not run"
    assert Path(args[2]).parent == lab and Path(args[2]).name.startswith("_-exec")
    assert not pwned.exists(), "nothing was run by a shell"
    assert env["DW_PATIENT"] == args[1]


def test_hooks_run_at_most_hook_concurrency_at_once(daemon, lab, tmp_path):
    log_file = tmp_path / "spans.txt"
    script = tmp_path / "span.sh"
    script.write_text(
        f"#!/bin/sh\necho start $1 >> {log_file}\nsleep 0.5\necho end $1 >> {log_file}\n"
    )
    script.chmod(0o755)
    run = daemon(hook_concurrency=1, quiet_seconds=0.3)
    run.add_rule("smith", lab, hooks=[{"command": [str(script), "{study_uid}"]}])
    run.start()
    for n in range(3):
        write_study(StudySpec(patient_id=f"C{n}", series=1, instances=1), run.inbox)
    run.wait_event("hook_done", count=3, timeout=30)
    lines = log_file.read_text().split()
    events = lines[0::2]
    assert events == ["start", "end"] * 3, "never two hooks at once"


def test_exclusive_rule_takes_instances_alone_and_check_warns_about_overlap(
    daemon, tmp_path, capsys
):
    from watcher.cli import main

    shared, private = tmp_path / "nas" / "archive", tmp_path / "nas" / "private"
    shared.mkdir(parents=True)
    private.mkdir(parents=True)
    run = daemon()
    run.add_rule("archive", shared)
    run.add_rule(
        "private", private, match={"StudyDescription": "^SMITH"}, exclusive=True, priority=5
    )
    assert main(["check", "--rules", str(run.rules)]) == 0
    out = capsys.readouterr().out
    assert "rules private and archive may match the same instances" in out
    assert "private is exclusive" in out
    run.start()
    write_study(StudySpec(series=1, instances=2, description="SMITH^Secret"), run.inbox)
    write_study(
        StudySpec(patient_id="OTHER", series=1, instances=3, description="OTHER"), run.inbox
    )
    run.wait_event("study_placed", count=2)
    run.wait_drained()
    assert len(lab_files(private)) == 2 and len(lab_files(shared)) == 3


def test_every_matching_rule_gets_its_own_copy_by_default(daemon, tmp_path):
    first, second = tmp_path / "nas" / "a", tmp_path / "nas" / "b"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    run = daemon()
    run.add_rule("a", first)
    run.add_rule("b", second, match={"InstitutionName": "(?i)princeton"})
    run.start()
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_placed", count=2)
    assert len(lab_files(first)) == 2 and len(lab_files(second)) == 2


def test_a_lab_rule_writing_into_another_labs_area_is_refused(daemon, tmp_path):
    smith, jones = tmp_path / "nas" / "smith", tmp_path / "nas" / "jones"
    smith.mkdir(parents=True)
    jones.mkdir(parents=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": "all"},
            "jones": {"destinations": [str(jones)], "claims": "all"},
        }
    )
    run.add_rule("smith/copy", smith, match={"StudyDescription": "^SMITH"})
    sneaky = run.add_rule("jones/copy", smith / "stolen", match={"StudyDescription": "^SMITH"})
    check = subprocess.run(
        [sys.executable, "-m", "watcher", "check", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
        cwd=run.root,
    )
    assert check.returncode == 1
    assert f"{sneaky}:" in check.stdout and "outside labs.jones.destinations" in check.stdout
    run.start()
    problem = run.wait_event("rule_problem")
    assert "refused" in problem[0]["problem"]
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("study_placed")
    run.wait_drained()
    assert not (smith / "stolen").exists()
    assert len(lab_files(smith)) == 2


def test_a_rule_with_its_own_short_quiet_period_and_a_count(daemon, lab, tmp_path):
    other = tmp_path / "nas" / "counted"
    other.mkdir(parents=True)
    run = daemon(quiet_seconds=120)
    run.add_rule("fast", lab, match={"StudyDescription": "^FAST"}, quiet_seconds=0.5)
    run.add_rule("counted", other, match={"StudyDescription": "^COUNT"}, expected_instances=4)
    run.start()
    write_study(StudySpec(series=1, instances=2, description="FAST"), run.inbox)
    write_study(StudySpec(series=2, instances=2, description="COUNT"), run.inbox)
    run.wait_event("study_placed", count=2, timeout=30)  # long before 120 s
    assert len(run.logs("study_complete_by_count")) == 1
    assert len(lab_files(lab)) == 2 and len(lab_files(other)) == 4


def test_a_hooks_states_are_recorded_by_the_loops_thread(tmp_path):
    """A job's start is told from the thread that runs it; its record goes
    through the placers, which belong to the loop's thread (two threads at
    once there crashed the daemon: BufferError on the placer's pipe)."""
    clock = FakeClock(time.time())
    failing = {"command": ["sh", "-c", "exit 3"], "retries": 0}
    daemon, lab = in_process_daemon(tmp_path, clock, {"hooks": [failing]}, quiet_seconds=1)
    told: list[tuple[threading.Thread, str]] = []
    records = daemon.delivery.records
    record_state = records.hook_changed

    def recording(job, record):  # type: ignore[no-untyped-def]
        told.append((threading.current_thread(), str(record["state"])))
        record_state(job, record)

    records.hook_changed = recording  # type: ignore[method-assign]
    for path in write_study(StudySpec(series=1, instances=2), daemon.config.inbox):
        daemon._observe(str(path), clock.now, closed=True)
    deadline = time.monotonic() + 30
    while "gave_up" not in [state for _, state in told]:
        assert time.monotonic() < deadline, f"the hook did not end: {told}"
        clock.now += 2
        daemon.tick()
        time.sleep(0.05)
    assert [state for _, state in told] == ["pending", "running", "gave_up"]
    assert {thread for thread, _ in told} == {threading.main_thread()}
    daemon.settle()
    (manifest,) = lab.rglob("manifest.json")
    (hook,) = json.loads(manifest.read_text())["hooks"]
    assert hook["state"] == "gave_up" and hook["exit_status"] == 3


def test_a_hook_pending_at_a_crash_runs_after_the_restart(daemon, lab, stand_ins):
    bin_folder, records = stand_ins
    run = daemon(hook_concurrency=1)
    # Two hooks, one at a time: the second is still waiting when the daemon dies.
    run.add_rule(
        "smith",
        lab,
        hooks=[
            {"command": ["sleep", "5"], "name": "slow"},
            {"command": ["record", "{study_uid}"], "name": "after"},
        ],
    )
    run.start(env=environment(bin_folder, records))
    write_study(StudySpec(series=1, instances=1), run.inbox)
    run.wait_event("hook_started")
    run.kill()
    assert recorded(records, "record") == []
    assert len(list((run.state / "hooks").glob("*.json"))) == 2
    run.start(env=environment(bin_folder, records))
    resumed = run.wait_event("hook_resumed", count=2)
    assert {line["hook"] for line in resumed} == {"slow", "after"}
    wait_for(lambda: recorded(records, "record"), 30, "the pending hook to run")
    run.wait_event("hook_done", count=2)
    assert not list((run.state / "hooks").glob("*.json"))


def test_a_failed_hooks_retry_state_is_saved_and_a_restart_does_not_reset_it(tmp_path):
    clock = FakeClock(1000.0)
    folder = tmp_path / "state" / "hooks"
    (folder / "failed").mkdir(parents=True)
    store = DaemonStore(folder)
    runner = HookRunner(store, concurrency=1, retry_seconds=60, clock=clock)
    hook = Hook(command=("sh", "-c", "exit 3"), timeout=10, retries=2, name="fails")
    values = {"lab": "smith", "study_uid": "1.2.3", "study_folder": str(tmp_path)}
    job = make_job(hook, values, cwd=tmp_path)
    store.submit(job)
    runner.add(job)
    runner.poll()
    runner.wait(10)  # the first attempt fails
    [saved] = folder.glob("*.json")
    job = json.loads(saved.read_text())
    assert job["retries_left"] == 1 and job["attempt"] == 1
    assert job["next_try"] == pytest.approx(1060.0)
    clock.now = 1061.0
    runner.poll()
    runner.wait(10)  # the second fails: the wait doubles
    job = json.loads(saved.read_text())
    assert job["retries_left"] == 0 and job["attempt"] == 2
    assert job["next_try"] == pytest.approx(1061.0 + 120.0)

    restarted = HookRunner(DaemonStore(folder), concurrency=1, retry_seconds=60, clock=clock)
    for pending in restarted.store.resume():  # type: ignore[attr-defined]
        restarted.add(pending)
    [resumed] = restarted.waiting
    assert resumed.retries_left == 0 and resumed.next_try == pytest.approx(1181.0)
    restarted.poll()
    assert not restarted.running, "not run again before its time"


# --- a lab's hooks are never run by the daemon; state/ is the daemon's alone ----------------


def test_a_lab_rules_hook_is_held_for_its_runner_and_the_operators_runs(
    daemon, tmp_path, stand_ins
):
    bin_folder, records = stand_ins
    smith = tmp_path / "nas" / "smith"
    smith.mkdir(parents=True)
    run = daemon(labs={"smith": {"destinations": [str(smith)], "claims": "all"}})
    lab_rule = run.add_rule(
        "smith/convert", smith, hooks=[{"command": ["record", "lab", "{study_uid}"]}]
    )
    run.add_rule(
        "archive", tmp_path / "nas", hooks=[{"command": ["record", "operator", "{study_uid}"]}]
    )
    check = subprocess.run(
        [sys.executable, "-m", "watcher", "check", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
    )
    assert (
        f"{lab_rule}: warning: its hooks never run: labs.smith.hook_user is not set" in check.stdout
    )
    config = yaml.safe_load(run.config_path.read_text())
    config["labs"]["smith"]["hook_user"] = "no-such-account-here"
    run.config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [sys.executable, "-m", "watcher", "check", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
    )
    assert "labs.smith.hook_user no-such-account-here is no account on this machine" in (
        check.stdout
    )
    assert f"{lab_rule}: note: its hooks run as no-such-account-here by lab smith's runner" in (
        check.stdout
    )
    run.start(env=environment(bin_folder, records))
    write_study(StudySpec(series=1, instances=2), run.inbox)
    [held] = run.wait_event("hook_held")
    assert held["lab"] == "smith" and held["waits_for"] == "dicom-watcher hooks --lab smith"
    run.wait_event("hook_done")
    [(argv, _)] = recorded(records, "record")
    assert argv[0] == "operator"
    [job] = (run.state / "hooks" / "labs" / "smith" / "jobs").glob("*.json")
    assert json.loads(job.read_text())["argv"][:2] == ["record", "lab"]
    assert stat.S_IMODE(job.stat().st_mode) & 0o022 == 0


def _forged_job(folder: Path, name: str, records: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / f"{name}.json"
    fields = {"argv": ["record", "forged"], "env": {}, "cwd": str(folder), "timeout": 10}
    fields |= {"retries_left": 0, "label": "forged", "lab": "x", "study": "1", "id": name}
    job.write_text(json.dumps(fields))
    return job


def test_a_job_file_others_could_have_written_is_refused_not_run(daemon, lab, stand_ins):
    bin_folder, records = stand_ins
    run = daemon()
    run.add_rule("smith", lab)
    writable = _forged_job(run.state / "hooks", "writable", records)
    writable.chmod(0o666)
    trusted_job = _forged_job(run.state / "hooks", "trusted", records)
    trusted_job.chmod(0o600)
    run.start(env=environment(bin_folder, records))
    [refused] = run.wait_event("hook_job_refused")
    assert refused["path"] == str(writable) and "writable by others" in refused["reason"]
    run.wait_event("hook_done")  # the daemon's own job file runs
    assert [argv for argv, _ in recorded(records, "record")] == [["forged"]]
    assert writable.exists()  # kept for the operator to look at


@pytest.mark.skipif(os.geteuid() != 0, reason="a file owned by another user needs root")
def test_a_job_file_owned_by_another_user_is_refused(daemon, lab, stand_ins):
    bin_folder, records = stand_ins
    run = daemon()
    run.add_rule("smith", lab)
    job = _forged_job(run.state / "hooks", "foreign", records)
    job.chmod(0o644)
    os.chown(job, 4242, 4242)
    run.start(env=environment(bin_folder, records))
    [refused] = run.wait_event("hook_job_refused")
    assert "belongs to uid 4242" in refused["reason"]
    write_study(StudySpec(series=1, instances=1), run.inbox)
    run.wait_event("study_placed")
    assert recorded(records, "record") == []


def test_a_state_folder_others_can_write_is_made_private_at_start(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    (run.state / "hooks").mkdir(parents=True)
    run.state.chmod(0o777)
    (run.state / "hooks").chmod(0o777)
    run.start()
    made = run.wait_event("state_made_private", count=2)
    assert {line["folder"] for line in made} == {str(run.state), str(run.state / "hooks")}
    for folder in (run.state, run.state / "hooks", run.state / "retry"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o022 == 0, folder


@pytest.mark.skipif(os.geteuid() != 0, reason="a folder owned by another user needs root")
def test_a_state_folder_owned_by_another_user_stops_the_start(daemon, lab):
    run = daemon()
    run.add_rule("smith", lab)
    run.state.mkdir()
    os.chown(run.state, 4242, 4242)
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "run", "--once", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"state folder {run.state} belongs to uid 4242" in result.stderr


def test_finishing_a_job_never_opens_what_the_hook_user_left_at_its_results_name(tmp_path):
    mailbox = Mailbox(tmp_path / "state", "smith")
    prepare(mailbox, None)
    (mailbox.state / "hooks" / "failed").mkdir()
    hook = Hook(command=("/bin/true",), name="ok")
    job = make_job(hook, {"lab": "smith", "study_uid": "1.2.3"}, cwd=tmp_path)
    post(mailbox, job)
    result = Result(id=job.id, state="gave_up", attempts=1, exit_status=1)
    where = mailbox.results / f"{job.id}.json"
    os.mkfifo(where)  # would block a reader: never opened
    finish(mailbox, job, result, mailbox.state / "hooks" / "failed")
    kept = json.loads((mailbox.state / "hooks" / "failed" / f"{job.id}.json").read_text())
    assert kept["result"]["state"] == "gave_up" and not where.exists()
    job2 = make_job(hook, {"lab": "smith", "study_uid": "1.2.4"}, cwd=tmp_path)
    post(mailbox, job2)
    (mailbox.results / f"{job2.id}.json").mkdir()  # cannot be unlinked: reported, not raised
    finish(mailbox, job2, Result(id=job2.id, state="done"), None)
    assert not (mailbox.jobs / f"{job2.id}.json").exists()


def test_a_link_at_a_labs_results_folder_is_refused_and_what_it_points_at_untouched(
    daemon, tmp_path
):
    smith = tmp_path / "nas" / "smith"
    smith.mkdir(parents=True)
    run = daemon(labs={"smith": {"destinations": [str(smith)], "claims": "all"}})
    failed = run.state / "hooks" / "failed"
    failed.mkdir(parents=True, mode=0o750)
    lab = run.state / "hooks" / "labs" / "smith"
    lab.mkdir(parents=True, mode=0o750)
    (lab / "results").symlink_to(failed)
    run.start()
    [refused] = run.wait_event("lab_jobs_unavailable")
    assert "must be a folder, not a link" in refused["error"]
    assert stat.S_IMODE(failed.stat().st_mode) == 0o750
    assert run.terminate() == 0
