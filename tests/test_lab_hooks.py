"""A lab's hooks under the lab's own account: the daemon (the service user)
posts each job for the lab's runner (`dicom-watcher hooks --lab`, run as the
lab's hook user), which runs it and records the result for the daemon to
put in the study's manifest. Real accounts, made by the fixtures (root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml
from harness import REPO, lab_files, skip_or_fail, wait_for

from watcher.synthetic import StudySpec

SMITH = StudySpec(series=1, instances=2, description="SMITH^Memory")


def manifest_hooks(tree: Path) -> list[dict[str, object]]:
    [manifest] = tree.rglob("manifest.json")
    return json.loads(manifest.read_text())["hooks"]


def wait_hook_state(tree: Path, state: str, timeout: float = 30.0) -> list[dict[str, object]]:
    def states() -> list[dict[str, object]] | None:
        try:
            hooks = manifest_hooks(tree)
        except (ValueError, KeyError, OSError):
            return None
        return hooks if hooks and all(h["state"] == state for h in hooks) else None

    return wait_for(states, timeout, f"every hook of the manifest in {tree} to be {state}")  # type: ignore[return-value]


def test_a_labs_hook_runs_as_its_hook_user_and_the_manifest_shows_it(centre, accounts):
    smith = centre.nas / "smith"
    centre.lab_rule(
        "smith",
        "whoami",
        hooks=[
            {"name": "whoami", "command": ["/bin/sh", "-c", "id -un > whoami", "{study_folder}"]}
        ],
    )
    centre.receive(SMITH)
    centre.start()
    centre.wait_event("hook_held")
    [pending] = manifest_hooks(smith)
    assert pending["state"] == "pending" and pending["hook"] == "whoami"
    centre.start_runner("smith")
    [done] = wait_hook_state(smith, "done")
    assert done["exit_status"] == 0 and done["attempts"] == 1
    assert done["started"] and done["finished"]
    [who] = smith.rglob("whoami")
    assert who.read_text().strip() == accounts.hook_users["smith"].name
    centre.wait_event("hook_result")
    assert not list((centre.state / "hooks" / "labs" / "smith" / "jobs").iterdir())

    # status: per lab, what waits and whether the runner lives.
    # (The status is written every 2 s: the one after the job ended.)
    def smith_idle() -> dict[str, object] | None:
        hooks = centre.status().get("hooks") or {}
        lab = hooks.get("labs", {}).get("smith")  # type: ignore[union-attr]
        return lab if lab and lab["running"] == 0 else None

    lab = wait_for(smith_idle, 10, "the finished job out of the status")
    assert lab["runner"] == "alive" and lab["waiting"] == 0 and lab["failed"] == 0  # type: ignore[index]
    shown = subprocess.run(
        [str(centre.python), "-m", "watcher", "status", "--config", str(centre.config_path)],
        capture_output=True,
        text=True,
    )
    assert (
        "hooks of lab smith: waiting 0, running 0, failed 0; runner (dwtest-smith-hooks): alive"
        in shown.stdout
    )


def test_a_labs_hook_cannot_write_another_labs_tree_or_the_state(centre, accounts):
    smith, jones = centre.nas / "smith", centre.nas / "jones"
    targets = [jones / "pwned", centre.state / "pwned", centre.state / "hooks" / "pwned"]
    centre.lab_rule(
        "smith",
        "reach",
        hooks=[
            {
                "name": "reach",
                "command": ["/bin/sh", "-c", 'for t; do touch "$t" || exit 7; done', "sh"]
                + [str(t) for t in targets],
                "retries": 0,
            }
        ],
    )
    centre.receive(SMITH)
    centre.start()
    centre.start_runner("smith")
    [gave_up] = wait_hook_state(smith, "gave_up")
    assert gave_up["exit_status"] == 7
    output = " ".join(line["line"] for line in centre.runner_logs("smith", "hook_output"))
    assert "Permission denied" in output
    assert not any(t.exists() for t in targets)
    [kept] = (centre.state / "hooks" / "failed").glob("*.json")
    assert json.loads(kept.read_text())["result"]["state"] == "gave_up"
    status = wait_for(lambda: centre.status()["hooks"]["labs"]["smith"]["failed"], 10, "failed")  # type: ignore[index]
    assert status == 1


def test_forged_or_edited_jobs_and_results_are_refused_and_reported(centre, accounts):
    smith = centre.nas / "smith"
    centre.lab_rule("smith", "ok", hooks=[{"name": "ok", "command": ["/bin/true"]}])
    centre.start()
    centre.wait_event("started")
    mailbox = centre.state / "hooks" / "labs" / "smith"
    # No one but the daemon may write the jobs folder: not another lab, not
    # the lab, not a member of the service user's group.
    for account in (
        accounts.members["jones"],
        accounts.members["smith"],
        accounts.hook_users["smith"],
        accounts.operator,
    ):
        denied = account.write(mailbox / "jobs" / "forged.json", "{}")
        assert denied.returncode != 0, account.name
    # The lab's members cannot even read the jobs (they pass through the hook
    # user's own group), nor write a result; one that got there anyway is
    # refused by the daemon, and the manifest keeps the job's own state.
    centre.receive(SMITH)
    centre.wait_event("hook_held")
    member = accounts.members["smith"]
    assert member.run(["ls", str(mailbox / "jobs")]).returncode != 0
    [job_id] = [p.stem for p in (mailbox / "jobs").glob("*.json")]
    assert member.write(mailbox / "results" / f"{job_id}.json", "{}").returncode != 0
    planted = mailbox / "results" / f"{job_id}.json"
    planted.write_text(json.dumps({"id": job_id, "state": "done", "attempts": 1, "exit_status": 0}))
    os.chown(planted, member.uid, accounts.hook_users["smith"].gid)
    [refused] = centre.wait_event("hook_result_refused")
    assert refused["path"] == str(planted) and f"belongs to uid {member.uid}" in refused["reason"]
    assert manifest_hooks(smith)[0]["state"] == "pending"
    planted.unlink()
    # A job file that got there anyway (a wrong owner, or writable by its
    # group) is refused by the runner and reported, never run.
    marker = smith / "forged-ran"
    forged = {
        "argv": ["/bin/sh", "-c", f"touch {marker}"], "env": {}, "cwd": str(smith),
        "timeout": 10, "retries_left": 0, "label": "forged", "lab": "smith", "study": "1",
    }  # fmt: skip
    foreign = mailbox / "jobs" / "aaaaaaaaaaaa.json"
    foreign.write_text(json.dumps({**forged, "id": "aaaaaaaaaaaa"}))
    os.chown(foreign, accounts.members["jones"].uid, accounts.labs["smith"])
    foreign.chmod(0o640)
    by_operator = mailbox / "jobs" / "dddddddddddd.json"
    by_operator.write_text(json.dumps({**forged, "id": "dddddddddddd"}))
    os.chown(by_operator, accounts.operator.uid, accounts.service.gid)
    by_operator.chmod(0o644)
    edited = mailbox / "jobs" / "bbbbbbbbbbbb.json"
    edited.write_text(json.dumps({**forged, "id": "bbbbbbbbbbbb"}))
    os.chown(edited, accounts.service.uid, accounts.labs["smith"])
    edited.chmod(0o660)
    centre.start_runner("smith")
    refused_jobs = centre.wait_runner_event("smith", "hook_job_refused", count=3)
    reasons = {Path(r["path"]).name: r["reason"] for r in refused_jobs}
    assert f"belongs to uid {accounts.members['jones'].uid}" in reasons[foreign.name]
    assert f"belongs to uid {accounts.operator.uid}" in reasons[by_operator.name]
    assert "writable by others" in reasons[edited.name]
    [done] = wait_hook_state(smith, "done")
    assert done["id"] == job_id and done["started"], "the runner's result"
    assert not marker.exists()


def test_a_runner_killed_mid_job_runs_it_once_more_to_completion(centre, accounts):
    smith = centre.nas / "smith"
    script = "sleep 3; echo ran >> count"
    centre.lab_rule("smith", "slow", hooks=[{"name": "slow", "command": ["/bin/sh", "-c", script]}])
    centre.receive(SMITH)
    centre.start()
    runner = centre.start_runner("smith")
    centre.wait_runner_event("smith", "hook_started")
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    centre.start_runner("smith")
    [interrupted] = centre.wait_runner_event("smith", "hook_interrupted")
    assert interrupted["leftover_ended"] == "True"  # the killed runner's hook
    [done] = wait_hook_state(smith, "done")
    time.sleep(4)  # what the first attempt would still have written
    [count] = smith.rglob("count")
    assert count.read_text() == "ran\n"
    assert done["attempts"] == 1


def test_jobs_pending_across_a_daemon_restart_are_not_lost(centre, accounts):
    smith = centre.nas / "smith"
    centre.lab_rule(
        "smith", "mark", hooks=[{"name": "mark", "command": ["/bin/sh", "-c", "touch marked"]}]
    )
    centre.receive(SMITH)
    centre.start()
    centre.wait_event("hook_held")
    assert centre.terminate() == 0
    centre.start()
    centre.wait_event("started", count=2)
    centre.start_runner("smith")
    wait_hook_state(smith, "done")
    assert len(list(smith.rglob("marked"))) == 1
    assert len([p for p in lab_files(smith) if p.suffix == ".dcm"]) == 2


def test_the_runner_refuses_root_the_service_user_and_other_accounts(centre, accounts):
    centre.start()
    centre.wait_event("started")
    command = [str(centre.python), "-m", "watcher", "hooks", "--lab", "smith"]
    command += ["--config", str(centre.config_path), "--once"]
    as_root = subprocess.run(command, capture_output=True, text=True)
    assert as_root.returncode != 0 and "refusing to run lab smith's hooks as root" in as_root.stderr
    as_service = accounts.service.run(command)
    assert "refusing to run lab smith's hooks as the service user" in as_service.stderr
    as_other = accounts.hook_users["jones"].run(command)
    assert as_other.returncode != 0
    assert "lab smith's hooks run as dwtest-smith-hooks" in as_other.stderr or (
        "cannot reach" in as_other.stderr
    )


# --- the automation examples, under a lab's runner -------------------------------------------


def _example(name: str, tree: Path, **changes: object) -> dict[str, object]:
    rule = yaml.safe_load((REPO / "rules" / "automation" / name).read_text())
    rule.pop("lab", None)
    rule.pop("group", None)
    rule["destination"] = str(tree)
    return {**rule, **changes}


def test_the_dcm2niix_example_converts_under_the_runner(centre, accounts):
    if shutil.which("dcm2niix") is None:
        skip_or_fail("dcm2niix is not installed (Debian package dcm2niix)")
    smith = centre.nas / "smith"
    rule = _example("dcm2niix.yaml", smith, match={"Modality": "^MR$"})
    centre.lab_rule("smith", "nifti", **{k: v for k, v in rule.items() if k != "name"})
    centre.receive(
        StudySpec(series=1, instances=3, description="SMITH^Memory", rows=16, columns=16)
    )
    centre.start()
    centre.start_runner("smith")
    [done] = wait_hook_state(smith, "done", timeout=60)
    assert done["hook"] == "dcm2niix"
    converted = list(smith.rglob("*.nii.gz"))
    assert converted and all(p.stat().st_uid == accounts.hook_users["smith"].uid for p in converted)
    assert list(smith.rglob("*.json"))


def test_the_bids_example_fills_rawdata_under_the_runner(centre, accounts):
    if shutil.which("dcm2niix") is None:
        skip_or_fail("dcm2niix is not installed (Debian package dcm2niix)")
    jones = centre.nas / "jones"
    rule = _example("bids-sourcedata.yaml", jones, match={"StudyDescription": "^JONES"})
    rule.pop("expected_instances")
    centre.lab_rule("jones", "bids", **{k: v for k, v in rule.items() if k != "name"})
    spec = StudySpec(patient_id="042", description="JONES^Motor", series=2, instances=3)
    centre.receive(spec)
    centre.start()
    centre.start_runner("jones")
    [done] = wait_hook_state(jones, "done", timeout=60)
    assert done["hook"] == "bids-rawdata" and done["exit_status"] == 0
    session = jones / "rawdata" / "sub-042" / "ses-20261125"
    assert sorted(p.name for p in session.glob("*.nii.gz")) == [
        "T1_MPRAGE_1.nii.gz",
        "rfMRI_REST_2.nii.gz",
    ]
    assert (session / "T1_MPRAGE_1.json").is_file()


def test_the_slurm_example_submits_as_the_labs_account(centre, accounts):
    smith = centre.nas / "smith"
    # A stand-in sbatch that records who submitted what.
    bin_folder = centre.root / "bin"
    bin_folder.mkdir()
    sbatch = bin_folder / "sbatch"
    sbatch.write_text(
        '#!/bin/sh\n{ id -un; printf "%s\\n" "$@"; } > "$DW_STUDY_FOLDER/sbatch.args"\n'
    )
    sbatch.chmod(0o755)
    rule = _example("slurm.yaml", smith, quiet_seconds=0.5)
    centre.lab_rule("smith", "cluster", **{k: v for k, v in rule.items() if k != "name"})
    centre.receive(StudySpec(patient_id="S7", series=1, instances=3, description="SMITH^Memory"))
    centre.start()
    centre.start_runner("smith", env={"PATH": f"{bin_folder}:/usr/bin:/bin"})
    [done] = wait_hook_state(smith, "done")
    assert done["hook"] == "sbatch"
    [args] = smith.rglob("sbatch.args")
    study = args.parent
    assert args.read_text().splitlines() == [
        accounts.hook_users["smith"].name,
        "--job-name=dw-smith-S7",
        "--output=/nas/smithlab/logs/%j.out",
        "/nas/smithlab/code/preprocess.sbatch",
        str(study),
        str(study / "manifest.json"),
    ]


# --- what a lab can put in its runner's results or its tree does not reach the daemon --------


def _posted(centre, lab: str) -> str:
    """The id of the one job posted for `lab`."""
    jobs = centre.state / "hooks" / "labs" / lab / "jobs"
    [job] = wait_for(lambda: list(jobs.glob("*.json")), 30, f"a job for {lab}")  # type: ignore[misc]
    return job.stem


def test_crafted_results_are_refused_and_never_stop_the_daemon(centre, accounts):
    smith, jones = centre.nas / "smith", centre.nas / "jones"
    centre.lab_rule("smith", "mark", hooks=[{"name": "mark", "command": ["/bin/true"]}])
    centre.lab_rule("jones", "mark", hooks=[{"name": "mark", "command": ["/bin/true"]}])
    centre.receive(SMITH)
    centre.start()
    smith_job = _posted(centre, "smith")
    hook_user = accounts.hook_users["smith"]
    results = centre.state / "hooks" / "labs" / "smith" / "results"
    crafted = {
        "nested": "[" * 100000 + "]" * 100000,
        "string-times": json.dumps({"id": smith_job, "state": "done", "started": "x"}),
        "huge-times": json.dumps({"id": smith_job, "state": "done", "finished": 1e300}),
        "odd-state": json.dumps({"id": smith_job, "state": "owned", "attempts": 1}),
    }
    for text in crafted.values():
        assert hook_user.write(results / f"{smith_job}.json", text).returncode == 0
        time.sleep(1.5)  # a hook sync or two
    assert hook_user.write(results / "runner.json", crafted["nested"]).returncode == 0
    # Another lab's job id in this lab's results changes nothing of that lab's.
    centre.receive(StudySpec(series=1, instances=1, patient_id="SUBJ02", description="JONES^X"))
    jones_job = _posted(centre, "jones")
    forged = json.dumps({"id": jones_job, "state": "done", "attempts": 1, "exit_status": 0})
    assert hook_user.write(results / f"{jones_job}.json", forged).returncode == 0
    time.sleep(2.5)
    assert centre.process is not None and centre.process.poll() is None, "the daemon runs on"
    wait_for(lambda: centre.logs("hook_result_refused"), 20, "the crafted results reported")
    assert not centre.logs("hook_result")
    assert manifest_hooks(smith)[0]["state"] == "pending"
    assert manifest_hooks(jones)[0]["state"] == "pending"
    assert wait_for(lambda: centre.status().get("hooks"), 10)


def test_a_lock_a_lab_holds_on_its_study_folder_never_stalls_the_daemon(centre, accounts):
    smith, jones = centre.nas / "smith", centre.nas / "jones"
    centre.lab_rule("smith", "mark", hooks=[{"name": "mark", "command": ["/bin/true"]}])
    centre.lab_rule("jones", "vision")
    centre.receive(SMITH)
    centre.start()
    centre.wait_event("hook_held")
    [study] = [p.parent for p in smith.rglob("manifest.json")]
    holder = accounts.members["smith"].popen(["flock", "-s", str(study), "sleep", "15"])
    try:
        time.sleep(0.5)
        centre.start_runner("smith")
        [unrecorded] = centre.wait_event("hook_state_unrecorded")
        assert "stayed locked by another process" in unrecorded["error"]
        # Meanwhile the daemon goes on: another lab's study is placed.
        centre.receive(StudySpec(series=1, instances=1, patient_id="SUBJ02", description="JONES^X"))
        centre.wait_event("study_placed", count=2)
        assert manifest_hooks(smith)[0]["state"] == "pending"
    finally:
        holder.wait(30)
    wait_hook_state(smith, "done")  # written once the lab lets go
    assert len(lab_files(jones)) == 1


def test_check_warns_when_a_hook_users_group_is_shared(centre, accounts, capsys):
    from watcher import cli

    cli.main(["check", "--config", str(centre.config_path)])
    assert "is shared with" not in capsys.readouterr().out
    config = yaml.safe_load(centre.config_path.read_text())
    # The lab member's own group is the lab's: every member is in it.
    config["labs"]["smith"]["hook_user"] = accounts.members["smith"].name
    centre.config_path.write_text(yaml.safe_dump(config))
    cli.main(["check", "--config", str(centre.config_path)])
    out = capsys.readouterr().out
    assert (
        f"the group of labs.smith.hook_user {accounts.members['smith'].name} is shared with "
        f"{accounts.hook_users['smith'].name}"
    ) in out


def test_a_lock_a_lab_holds_while_its_study_grows_delays_no_other_lab(centre, accounts):
    # The manifest of smith's study is written in smith's placer, which waits
    # a moment for the lab's lock and gives up; jones's study, arriving at
    # the same time, is placed meanwhile, by jones's placer.
    smith, jones = centre.nas / "smith", centre.nas / "jones"
    centre.lab_rule("smith", "all")
    centre.lab_rule("jones", "vision")
    centre.receive(SMITH)
    centre.start()
    centre.wait_event("study_placed")
    [study] = [p.parent for p in smith.rglob("manifest.json")]
    holder = accounts.members["smith"].popen(["flock", "-s", str(study), "sleep", "20"])
    try:
        time.sleep(0.5)
        # two more series of the study (the first again: new instances, beside)
        centre.receive(StudySpec(series=2, instances=2, study_uid=SMITH.study_uid))
        centre.receive(StudySpec(series=1, instances=1, patient_id="SUBJ02", description="JONES^X"))
        placed = centre.wait_event("study_placed", count=3)
        assert holder.poll() is None, "the lab still holds its lock"
        assert {line["lab"] for line in placed[1:]} == {"smith", "jones"}
        [refused] = centre.wait_event("manifest_failed")
        assert refused["lab"] == "smith" and "stayed locked" in refused["error"]
        assert len(lab_files(jones)) == 1 and len(list(jones.rglob("manifest.json"))) == 1
        assert len(lab_files(smith)) == 6, "the lab's files are placed all the same"
    finally:
        holder.kill()
        holder.wait(30)
    # Once the lab lets go, its manifest is brought up to date after all.
    written = centre.wait_event("manifest_written", count=3)
    assert [line["files"] for line in written if line["lab"] == "smith"][-1] == "6"
    [manifest] = smith.rglob("manifest.json")
    assert json.loads(manifest.read_text())["files"] == 6
