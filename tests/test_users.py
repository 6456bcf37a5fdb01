"""Lab tenancy with real accounts: the daemon runs as an unprivileged service
user that may write every lab's tree, labs' trees and rule folders are
setgid to the labs' groups, and each attack is made by a member of a lab,
with that member's own permissions. The content-hash account at the end of
each test shows that nothing is lost and nothing reaches a lab it does not
belong to."""

from __future__ import annotations

import os
import sys

import pytest
from harness import assert_accounted, lab_files, paths_under, wait_for

from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec

LABS = ["smith", "jones"]
PATH = "{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm"


def test_the_daemon_runs_as_the_service_user_and_the_tree_is_the_labs(centre, accounts):
    smith = accounts.members["smith"]
    jones = accounts.members["jones"]
    centre.lab_rule("smith", "memory")
    centre.lab_rule("jones", "vision")
    for_smith = centre.receive(StudySpec(series=1, instances=3, description="SMITH^Memory"))
    for_jones = centre.receive(StudySpec(series=1, instances=2, description="JONES^Vision"))
    entered = for_smith | for_jones
    belongs = {p: [centre.nas / "smith"] for p in for_smith}
    belongs |= {p: [centre.nas / "jones"] for p in for_jones}
    before = paths_under(centre.root)
    centre.start()
    centre.wait_event("study_placed", count=2)
    centre.wait_drained()
    assert centre.process is not None
    assert os.stat(f"/proc/{centre.process.pid}").st_uid == accounts.service.uid
    placed = lab_files(centre.nas / "smith")
    assert len(placed) == 3
    # The lab's group on every file, linked or copied, and its member reads them...
    assert {p.stat().st_gid for p in placed} == {accounts.labs["smith"]}
    assert smith.run(["cat", str(placed[0])]).returncode == 0
    # ... and no other lab's member can.
    denied = jones.run(["cat", str(placed[0])])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    counts = assert_accounted(
        entered,
        [centre.nas / lab for lab in LABS],
        centre.state,
        centre.inbox,
        root=centre.root,
        before=before,
        exact=True,
        unique_uids=True,
        belongs=belongs,
    )
    assert counts["placed"] == 5 and counts["still_in_inbox"] == 0
    assert len(lab_files(centre.nas / "jones")) == 2


def test_a_lab_member_cannot_take_another_labs_studies_or_run_code_as_the_service(centre, accounts):
    jones_tree = centre.nas / "jones"
    centre.lab_rule("jones", "vision")
    # A member of smith writes what a hostile lab would: a rule naming jones,
    # one writing into jones's tree, a catch-all that wants to take every
    # study, and a hook that would act as the service user.
    grab = centre.lab_rule("smith", "grab", lab="jones", destination=str(jones_tree))
    centre.lab_rule("smith", "all", exclusive=True, priority=10**9)
    pwned = jones_tree / "pwned"
    centre.lab_rule(
        "smith",
        "hook",
        exclusive=True,
        priority=10**9 + 1,  # of smith's rules, this one takes smith's study
        hooks=[
            {
                "command": [
                    "/bin/sh",
                    "-c",
                    f"id -un > {centre.nas / 'smith' / 'who'}; touch {pwned}",
                ]
            }
        ],
    )
    for_smith = centre.receive(StudySpec(series=1, instances=3, description="SMITH^Memory"))
    for_jones = centre.receive(StudySpec(series=1, instances=2, description="JONES^Vision"))
    for_nobody = centre.receive(StudySpec(series=1, instances=1, description="CORE^Phantom"))
    entered = for_smith | for_jones | for_nobody
    belongs = {p: [centre.nas / "smith"] for p in for_smith}
    belongs |= {p: [jones_tree] for p in for_jones} | {p: [] for p in for_nobody}
    before = paths_under(centre.root)
    centre.start()
    centre.wait_event("study_unmatched")
    centre.wait_event("study_placed", count=2)
    centre.wait_event("hook_held")
    centre.wait_drained()
    [problem] = [p["problem"] for p in centre.logs("rule_problem")]
    assert problem.startswith(f"{grab}:4: lab: jones in a rule of lab smith's folder")
    assert not pwned.exists() and not (centre.nas / "smith" / "who").exists()
    held = list((centre.state / "hooks" / "labs" / "smith" / "jobs").glob("*.json"))
    assert len(held) == 1
    placed_for = {line["rule"] for line in centre.logs("study_placed")}
    assert placed_for == {"smith/hook", "jones/vision"}
    counts = assert_accounted(
        entered,
        [centre.nas / lab for lab in LABS],
        centre.state,
        centre.inbox,
        root=centre.root,
        before=before,
        exact=True,
        belongs=belongs,
    )
    assert counts["unmatched"] == 1
    assert len(lab_files(jones_tree)) == 2, "jones gets its own study, and only it"


def test_a_lab_member_cannot_forge_a_job_or_touch_the_state_or_another_labs_rules(centre, accounts):
    smith = accounts.members["smith"]
    centre.start()
    centre.wait_event("started")
    for target in (
        centre.state / "hooks" / "forged.json",
        centre.state / "hooks" / "labs" / "smith" / "jobs" / "forged.json",
        centre.state / "retry" / "forged.json",
        centre.rules / "jones" / "mine.yaml",
        centre.rules / "mine.yaml",
    ):
        result = smith.write(target, "{}")
        assert result.returncode != 0 and "Permission denied" in result.stderr, target
        assert not target.exists()
    # Others may pass through state/ (to reach a lab's jobs) but not list it.
    assert centre.state.stat().st_mode & 0o077 == 0o051
    listing = smith.run(["ls", str(centre.state)])
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    assert centre.terminate() == 0


def test_links_and_fifos_a_member_plants_in_its_tree_never_reach_another_lab(centre, accounts):
    smith = accounts.members["smith"]
    smith_tree, jones_tree = centre.nas / "smith", centre.nas / "jones"
    victim = jones_tree / "results.txt"
    victim.write_text("jones's results\n")
    os.chown(victim, accounts.members["jones"].uid, accounts.labs["jones"])
    victim.chmod(0o660)
    untouched = (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_gid)
    (jones_tree / "projects").mkdir()
    centre.lab_rule("smith", "memory", destination=str(smith_tree / "projects"))
    centre.lab_rule("jones", "vision")
    assert smith.run(["mkdir", "-m", "2770", str(smith_tree / "projects")]).returncode == 0
    # A folder for the first study, with links at the manifest's names, and
    # then the projects folder swapped for a link into jones's tree.
    subject = smith_tree / "projects" / "SUBJ01"
    assert smith.run(["mkdir", "-m", "2770", str(subject)]).returncode == 0
    for pid in range(1, 65):
        smith.run(["ln", "-s", str(victim), str(subject / f"{TEMP_PREFIX}{pid}.manifest.json")])
    assert smith.run(["mkfifo", str(subject / "manifest.json")]).returncode == 0
    entered = centre.receive(StudySpec(series=1, instances=2, description="SMITH^Memory"))
    belongs = {p: [smith_tree / "real"] for p in entered}
    before = paths_under(centre.root)
    centre.start()
    [failed] = centre.wait_event("manifest_failed")
    assert "manifest.json is not a regular file" in failed["error"]
    swap = smith.run(
        [
            "/bin/sh",
            "-c",
            'mv "$1/projects" "$1/real" && ln -s "$2" "$1/projects"',
            "sh",
            str(smith_tree),
            str(jones_tree),
        ]
    )
    assert swap.returncode == 0, swap.stderr
    entered |= centre.receive(
        StudySpec(series=1, instances=2, patient_id="SUBJ02", description="SMITH^Memory")
    )
    [parked] = centre.wait_event("study_parked")
    assert "'projects' on the way to it is now a symbolic link" in parked["error"]
    # The daemon goes on for jones.
    for_jones = centre.receive(StudySpec(series=1, instances=1, description="JONES^Vision"))
    entered |= for_jones
    belongs |= {p: [jones_tree / "SUBJ01"] for p in for_jones}
    wait_for(lambda: len(centre.logs("study_placed")) >= 2, 30, "jones's study to be placed")
    assert (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_gid) == untouched
    assert sorted(p.name for p in jones_tree.iterdir()) == ["SUBJ01", "projects", "results.txt"]
    assert list((jones_tree / "projects").iterdir()) == []
    assert centre.terminate() == 0
    # The member's links are left as they were; the member clears them.
    planted = list((smith_tree / "real" / "SUBJ01").glob(f"{TEMP_PREFIX}*"))
    assert len(planted) == 64 and all(os.readlink(p) == str(victim) for p in planted)
    assert smith.run(["rm", *map(str, planted)]).returncode == 0
    counts = assert_accounted(
        entered,
        [smith_tree / "real", jones_tree / "SUBJ01"],
        centre.state,
        centre.inbox,
        root=centre.root,
        before=before | paths_under(smith_tree),
        allowed=[smith_tree],
        belongs=belongs,
    )
    assert counts["still_in_inbox"] == 2, "the parked study waits in the inbox"


if sys.platform != "linux":  # pragma: no cover - accounts are made with Linux tools
    pytestmark = pytest.mark.skip("real accounts are made with Linux tools")
