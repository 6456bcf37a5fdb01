"""Lab destinations on a real network share (sshfs over a private sshd on
loopback, tests/share.py) whose server fails, beside a lab on local disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import assert_accounted, lab_files, snapshot
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
    share.detach()
    share.attach()
    run.wait_event("study_placed", count=2, timeout=60)
    run.wait_drained()
    counts = assert_accounted(entered, [share.export / "smith", jones], run.state, run.inbox)
    assert counts["placed"] == 5 and counts["still_in_inbox"] == 0
    assert len(lab_files(share.export / "smith")) == 3
