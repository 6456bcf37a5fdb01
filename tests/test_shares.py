"""Lab destinations on a real network share (sshfs over a private sshd on
loopback, tests/share.py) whose server fails, beside a lab on local disk."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import assert_accounted, lab_files, snapshot, wait_for
from share import Share

from watcher.synthetic import StudySpec, write_study


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Share]:
    made = Share(tmp_path / "share")
    yield made
    made.close()


def _two_labs(daemon, tmp_path: Path, share: Share):
    """Lab smith's tree on the share, lab jones's on local disk; each takes
    the studies whose description names it."""
    smith, jones = share.mount / "smith", tmp_path / "nas" / "jones"
    smith.mkdir()
    jones.mkdir(parents=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": [{"StudyDescription": "^SMITH"}]},
            "jones": {"destinations": [str(jones)], "claims": [{"StudyDescription": "^JONES"}]},
        }
    )
    path = "{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm"
    run.add_rule("smith/all", smith, path=path)
    run.add_rule("jones/all", jones, path=path)
    return run, smith, jones


def test_a_share_whose_server_died_parks_its_lab_alone_until_it_is_mounted_again(
    daemon, tmp_path, share
):
    run, smith, jones = _two_labs(daemon, tmp_path, share)
    run.start()
    run.wait_event("started")
    share.kill_server()
    write_study(StudySpec(series=1, instances=3, description="SMITH^Memory"), run.inbox)
    write_study(
        StudySpec(series=1, instances=2, patient_id="SUBJ02", description="JONES^Vision"),
        run.inbox,
    )
    entered = snapshot(run.inbox)
    [parked] = run.wait_event("study_parked")
    assert parked["patient"] == "SUBJ01"
    placed = run.wait_event("study_placed")
    assert [line["lab"] for line in placed] == ["jones"], "the other lab is not held up"
    assert len(lab_files(jones)) == 2
    assert len(run.inbox_files()) == 3, "the parked study's files wait in the inbox"
    [down] = run.wait_event("destination_unavailable")
    assert down["destination"] == str(smith)

    def state_of(destination: Path) -> dict[str, object]:
        shown = run.status().get("destinations", [])
        return next(d for d in shown if d["destination"] == str(destination))  # type: ignore[index, union-attr]

    unavailable = wait_for(
        lambda: state_of(smith)["state"] == "unavailable" and state_of(smith), 10
    )
    assert unavailable["reason"] and unavailable["since"]  # type: ignore[index]
    assert state_of(jones)["state"] == "healthy"
    shown = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--config", str(run.config_path)],
        capture_output=True,
        text=True,
    )
    assert f"destination {smith}: unavailable since " in shown.stdout
    share.detach()
    share.attach()
    run.wait_event("study_placed", count=2, timeout=60)
    run.wait_event("destination_healthy")
    wait_for(lambda: state_of(smith)["state"] == "healthy", 10, "smith's share healthy again")
    run.wait_drained()
    counts = assert_accounted(entered, [share.export / "smith", jones], run.state, run.inbox)
    assert counts["placed"] == 5 and counts["still_in_inbox"] == 0
    assert len(lab_files(share.export / "smith")) == 3
