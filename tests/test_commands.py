"""`preview` and `status` (and `sort --dry-run`): what they print, what they
leave untouched, their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml
from harness import FakeClock, in_process_daemon

from watcher import cli
from watcher.synthetic import StudySpec, write_study

# --- sort --dry-run counts what it would place ---------------------------------------------


def test_dry_run_summary_counts_the_copies_it_would_make(tmp_path, capsys):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    write_study(StudySpec(series=2, instances=3), inbox)
    status = cli.main(["sort", str(inbox), "--dest", str(dest), "--dry-run"])
    out = capsys.readouterr().out
    assert status == 0
    summary = next(line for line in out.splitlines() if "files=" in line)
    assert summary.startswith("dry run (nothing written): files=6 placed=6 ")
    assert os.listdir(dest) == []


# --- preview -----------------------------------------------------------------------------


def test_preview_shows_rules_targets_unmatched_and_not_routable_and_writes_nothing(
    tmp_path, capsys
):
    lab = tmp_path / "lab"
    lab.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "smith.yaml").write_text(
        f"match: {{StudyDescription: '^SMITH'}}\ndestination: {lab}\n"
        "path: '{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm'\n"
    )
    inbox = tmp_path / "inbox"
    write_study(StudySpec(patient_id="P1", series=1, instances=3), inbox)
    write_study(StudySpec(patient_id="P2", series=1, instances=2, description="OTHER"), inbox)
    (inbox / "notes.txt").write_text("not DICOM")
    before = sorted(p for p in tmp_path.rglob("*"))
    status = cli.main(["preview", str(inbox), "--rules", str(rules)])
    out = capsys.readouterr().out
    assert status == 0
    assert sorted(p for p in tmp_path.rglob("*")) == before, "preview writes nothing"
    assert f"rule smith -> {lab} (3 files)" in out
    assert "P1/001/00001.dcm" in out and "P1/001/00002.dcm" in out and "... and 1 more" in out
    assert "unmatched: 2 file(s)" in out
    assert f"not routable: {inbox / 'notes.txt'}: not a DICOM file" in out
    assert out.rstrip().endswith("2 stud(ies), 5 instance(s), 1 not routable")


def test_preview_with_a_broken_rule_is_one_error_and_exit_2(tmp_path, capsys):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("match: {StudyDescription: '[x'}\ndestination: /x\npath: a\n")
    status = cli.main(["preview", str(tmp_path), "--rules", str(rules)])
    captured = capsys.readouterr()
    assert status == 2
    assert f"{rules / 'bad.yaml'}:1: bad regular expression" in captured.err
    assert "Traceback" not in captured.err


# --- status: parked studies and their reason; a daemon that is gone --------------------------


def test_status_shows_a_parked_study_with_its_error_then_not_running_when_gone(tmp_path, capsys):
    clock = FakeClock(time.time())
    missing = tmp_path / "nas" / "smith"  # the share is not mounted
    daemon, _ = in_process_daemon(tmp_path, clock, {"destination": str(missing)}, quiet_seconds=1)
    config_file = tmp_path / "dicom-watcher.yaml"
    config_file.write_text(yaml.safe_dump({"inbox": "inbox", "rules": "rules", "state": "state"}))
    write_study(StudySpec(patient_id="PARKED", series=1, instances=2), tmp_path / "inbox")
    for _ in range(3):
        daemon.tick()
        clock.now += 2
    daemon._write_status()

    assert cli.main(["status", "--config", str(config_file), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is True
    [study] = status["studies"]
    assert study["patient"] == "PARKED" and study["files"] == 2
    assert study["next"].startswith("parked: next try in")
    assert "does not exist" in study["last_error"] and study["attempts"] >= 1

    assert cli.main(["status", "--config", str(config_file)]) == 0
    human = capsys.readouterr().out
    line = next(line for line in human.splitlines() if "PARKED" in line)
    assert "parked: next try in" in line and "last error:" in line and "does not exist" in line
    assert human.startswith("dicom-watcher running")

    # The daemon is gone: a pid that no longer exists.
    saved = json.loads((tmp_path / "state" / "status.json").read_text())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    saved["pid"] = gone.pid
    (tmp_path / "state" / "status.json").write_text(json.dumps(saved))
    assert cli.main(["status", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.startswith("dicom-watcher NOT RUNNING")
    # Alive but silent for minutes (hung): not running either.
    saved["pid"], saved["updated"] = os.getpid(), time.time() - 600
    (tmp_path / "state" / "status.json").write_text(json.dumps(saved))
    assert cli.main(["status", "--config", str(config_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is False


def test_status_without_a_status_file_is_one_error(tmp_path, capsys):
    config = tmp_path / "dicom-watcher.yaml"
    config.write_text("state: ./nothing-here\n")
    assert cli.main(["status", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "no status in" in err and err.count("\n") == 1


def test_preview_of_a_path_with_no_instances_exits_1(tmp_path, capsys):
    """A mistyped path is not "nothing to do": it exits 1, saying why."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "all.yaml").write_text("match: {}\ndestination: /nas/x\npath: '{PatientID}.dcm'\n")
    status = cli.main(["preview", str(tmp_path / "no-such-study"), "--rules", str(rules)])
    out = capsys.readouterr().out
    assert status == 1
    assert f"not routable: {tmp_path / 'no-such-study'}: cannot read" in out
