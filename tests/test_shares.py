"""Lab destinations on a real network share (sshfs over a private sshd on
loopback, tests/share.py) whose server fails, beside a lab on local disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import assert_accounted, lab_files, snapshot, wait_for
from share import Share

from watcher import bookkeeping, placement
from watcher.placement import TEMP_PREFIX
from watcher.synthetic import StudySpec, write_study


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Share]:
    made = Share(tmp_path / "share")
    yield made
    made.close()


def _two_labs(daemon, tmp_path: Path, share: Share, **settings: object):
    """Lab smith's tree on the share, lab jones's on local disk; each takes
    the studies whose description names it."""
    smith, jones = share.mount / "smith", tmp_path / "nas" / "jones"
    smith.mkdir()
    jones.mkdir(parents=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": [{"StudyDescription": "^SMITH"}]},
            "jones": {"destinations": [str(jones)], "claims": [{"StudyDescription": "^JONES"}]},
        },
        **settings,
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


#: How long a frozen share is given before it is hung, in these tests.
TIMEOUT = 3


def _smith_study_under_way(run, share: Share, series: int, instances: int) -> dict[str, str]:
    """Send smith a study and wait until its first files are on the share;
    returns what entered the inbox."""
    spec = StudySpec(
        series=series, instances=instances, description="SMITH^Memory", rows=32, columns=32
    )
    write_study(spec, run.inbox)
    entered = snapshot(run.inbox)
    wait_for(lambda: lab_files(share.export / "smith"), 60, "smith's placement under way")
    return entered


def _state_of(run, destination: Path) -> dict[str, object]:
    shown = run.status().get("destinations", [])
    return next((d for d in shown if d["destination"] == str(destination)), {})


@pytest.mark.parametrize("when", ["idle", "placing"])
def test_a_frozen_share_stalls_only_its_own_lab_and_everything_is_placed_once_it_answers(
    daemon, tmp_path, share, when
):
    # Smith's file server stops answering (its sftp-server is stopped): what
    # touches the mount waits in the kernel. Jones's studies are placed on
    # time, new arrivals are read, the status stays fresh and says smith's
    # destination is hung; once the server answers, all of it is placed, once.
    run, smith, jones = _two_labs(daemon, tmp_path, share, destination_timeout_seconds=TIMEOUT)
    run.start()
    run.wait_event("watching")
    big = StudySpec(series=4, instances=200, description="SMITH^Memory", rows=32, columns=32)
    if when == "placing":
        write_study(big, run.inbox)
        wait_for(lambda: lab_files(share.export / "smith"), 60, "smith's placement under way")
    share.freeze()
    try:
        if when == "idle":
            write_study(big, run.inbox)
        jones_spec = StudySpec(
            series=1, instances=2, patient_id="SUBJ02", description="JONES^Vision"
        )
        write_study(jones_spec, run.inbox)
        [placed] = run.wait_event("study_placed", timeout=30)
        assert placed["lab"] == "jones", "the other lab is not held up"
        [hung] = run.wait_event("destination_hung", timeout=30)
        assert hung["destination"] == str(smith)
        later = StudySpec(series=1, instances=3, patient_id="SUBJ03", description="JONES^Later")
        write_study(later, run.inbox)
        placed = run.wait_event("study_placed", count=2, timeout=30)
        assert [line["lab"] for line in placed] == ["jones", "jones"], "new arrivals are read"
        state = wait_for(
            lambda: _state_of(run, smith).get("state") == "hung" and _state_of(run, smith), 10
        )
        assert state["since"] and state["reason"]  # type: ignore[index]
        assert time.time() - float(run.status()["updated"]) < 5, "the status stays fresh"  # type: ignore[arg-type]
        assert len(run.logs("destination_hung")) == 1, "one warning line"
        assert run.inbox_files(), "smith's study waits in the inbox"
    finally:
        share.thaw()
    run.wait_drained(timeout=120)
    run.wait_event("destination_healthy", timeout=30)
    wait_for(lambda: [x for x in run.logs("study_placed") if x["lab"] == "smith"], 60)
    assert run.terminate() == 0
    placed_smith = lab_files(share.export / "smith")
    assert len(placed_smith) == 800, "each instance once"
    assert not [p for p in share.export.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    [manifest] = (share.export / "smith").rglob("manifest.json")
    assert json.loads(manifest.read_text())["files"] == 800
    assert len(lab_files(jones)) == 5


def test_a_rule_reload_while_a_share_is_frozen_holds_up_no_other_lab(daemon, tmp_path, share):
    """A rule reload finds where each lab rule's destination really is: a
    lookup on smith's frozen share waits in the kernel, so a reload's
    lookups get 2 s in all. Smith adds 20 rules into the frozen share (one
    wait each would hold the loop for 40 s); meanwhile jones's edit takes
    effect and jones's studies are placed, and smith's new rules are loaded
    once the share answers."""
    run, smith, jones = _two_labs(daemon, tmp_path, share, destination_timeout_seconds=TIMEOUT)
    run.start()
    run.wait_event("watching")
    share.freeze()
    try:
        # made on the server's side: no cache of the mount knows it, so its
        # lookup goes to the frozen server
        for number in range(20):
            (share.export / "smith" / f"new{number:02d}").mkdir()
            run.add_rule(
                f"smith/new{number:02d}", smith / f"new{number:02d}", match={"PatientID": "^NEW"}
            )
        run.add_rule("jones/all", jones, path="edited/{SOPInstanceUID}.dcm")
        write_study(StudySpec(series=1, instances=2, description="JONES^Vision"), run.inbox)
        [placed] = run.wait_event("study_placed", timeout=15)
        assert placed["lab"] == "jones"
        assert len(list((jones / "edited").glob("*.dcm"))) == 2, "jones's edit took effect"
        held = [line["problem"] for line in run.logs("rule_problem")]
        assert held and all("/new" in p and "does not answer" in p for p in held), held
    finally:
        share.thaw()
    wait_for(
        lambda: any("smith/new19" in line["rules"] for line in run.logs("rules_loaded")),
        60,
        "smith's new rules loaded once its share answers",
    )
    write_study(StudySpec(series=1, instances=2, patient_id="NEW01"), run.inbox)
    wait_for(lambda: len(lab_files(share.export / "smith" / "new19")) == 2, 60, "new19's study")
    assert run.terminate() == 0


def test_sigterm_while_a_share_is_frozen_ends_the_daemon_within_the_timeout(
    daemon, tmp_path, share
):
    run, smith, jones = _two_labs(daemon, tmp_path, share, destination_timeout_seconds=TIMEOUT)
    run.start()
    run.wait_event("watching")
    entered = _smith_study_under_way(run, share, series=4, instances=200)
    share.freeze()
    try:
        time.sleep(0.5)
        began = time.monotonic()
        assert run.terminate(timeout=TIMEOUT + 15) == 0
        took = time.monotonic() - began
        assert took < TIMEOUT + 10, f"stopped after {took:.1f} s"
    finally:
        share.thaw()
    run.start()
    run.wait_drained(timeout=120)
    wait_for(lambda: len(lab_files(share.export / "smith")) == 800, 60, "all of smith's study")
    assert run.terminate() == 0
    counts = assert_accounted(entered, [share.export / "smith"], run.state, run.inbox)
    assert counts["placed"] == 800 and counts["still_in_inbox"] == 0
    assert not [p for p in share.export.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def _scratch_temporaries(folder: Path) -> list[Path]:
    """Temporary files in the scratch folders below `folder`."""
    return [
        p
        for p in folder.glob(f"{TEMP_PREFIX}*/{TEMP_PREFIX}*")
        if p.is_file() and p.parent.parent == folder
    ]


def test_a_daemon_killed_while_placing_onto_a_share_leaves_no_temporary_file_behind(
    daemon, tmp_path, share
):
    # SIGKILL while the share holds temporary files in scratch folders (the
    # share frozen meanwhile, so that none goes): the next start removes
    # them with their folders, and places everything once.
    run, smith, jones = _two_labs(daemon, tmp_path, share, destination_timeout_seconds=TIMEOUT)
    run.start()
    run.wait_event("watching")
    spec = StudySpec(series=4, instances=200, description="SMITH^Memory", rows=32, columns=32)
    write_study(spec, run.inbox)
    entered = snapshot(run.inbox)
    served = share.export / "smith"
    wait_for(lambda: _scratch_temporaries(served), 60, "temporary files in scratch folders")
    share.freeze()
    try:
        run.kill()  # SIGKILL
        left = _scratch_temporaries(served)
    finally:
        share.thaw()
    assert left, "the kill left no temporary file: the test missed its aim"
    run.start()
    [cleaned] = run.wait_event("cleaned_interrupted_placement", timeout=60)
    assert int(cleaned["temporary_files"]) >= len(left)
    run.wait_drained(timeout=120)
    wait_for(lambda: len(lab_files(served)) == 800, 60, "all of smith's study")
    assert run.terminate() == 0
    counts = assert_accounted(entered, [served], run.state, run.inbox)
    assert counts["placed"] == 800 and counts["still_in_inbox"] == 0
    assert not [p for p in share.export.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_a_slow_share_gets_everything_and_does_not_slow_the_other_lab(daemon, tmp_path):
    # Smith's file server is 10 ms of round trip away: its study takes a while,
    # and jones's study, arriving after smith's placement began, is placed
    # meanwhile.
    slow = Share(tmp_path / "share", delay=0.005)
    try:
        run, smith, jones = _two_labs(daemon, tmp_path, slow)
        run.start()
        run.wait_event("watching")
        entered = _smith_study_under_way(run, slow, series=2, instances=100)
        later = StudySpec(series=1, instances=3, patient_id="SUBJ02", description="JONES^Vision")
        write_study(later, run.inbox)
        entered.update(snapshot(run.inbox))
        [first] = run.wait_event("study_placed", timeout=60)
        assert first["lab"] == "jones", "jones's study did not wait for smith's share"
        named = [p for p in lab_files(slow.export / "smith") if TEMP_PREFIX not in str(p)]
        assert len(named) < 200, "smith's was still under way"
        placed = run.wait_event("study_placed", count=2, timeout=120)
        assert placed[1]["lab"] == "smith"
        run.wait_drained()
        assert run.terminate() == 0
        counts = assert_accounted(entered, [slow.export / "smith", jones], run.state, run.inbox)
        assert counts["placed"] == 203 and counts["still_in_inbox"] == 0
    finally:
        slow.close()


def _named_after_fsync(server_log: Path) -> tuple[list[str], list[str]]:
    """From the share server's log: the files given their final names (by a
    link or a rename of a temporary file), and those of them whose bytes
    were not fsynced on the server before."""
    fsynced: set[str] = set()
    named, unflushed = [], []
    for line in server_log.read_text().splitlines():
        if line.startswith("fsync "):
            fsynced.add(line.split('"')[1])
        elif line.startswith(("hardlink old ", "posix-rename old ", "rename old ")):
            old, new = line.split('"')[1], line.split('"')[3]
            if not os.path.basename(new).startswith(TEMP_PREFIX):
                named.append(new)
                if old not in fsynced:
                    unflushed.append(new)
    return named, unflushed


@pytest.mark.parametrize("command", ["sort", "run --once"])
def test_every_file_placed_onto_a_share_is_flushed_on_its_server_before_it_is_named(
    tmp_path, share, command
):
    # A batch of many files shares one syncfs on a local disk; on a FUSE
    # mount syncfs returns without asking the server (sshfs sends nothing),
    # so each file needs its own fsync, which sshfs sends as fsync@openssh.com.
    inbox, out = tmp_path / "inbox", share.mount / "out"
    out.mkdir()
    write_study(StudySpec(series=2, instances=6), inbox)
    path = "{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm"
    if command == "sort":
        argv = ["sort", str(inbox), "--dest", str(out), "--path", path]
    else:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "all.yaml").write_text(
            json.dumps({"match": {}, "destination": str(out), "path": path})
        )
        config = tmp_path / "dicom-watcher.yaml"
        config.write_text(
            json.dumps(
                {
                    "inbox": str(inbox),
                    "rules": str(rules),
                    "state": str(tmp_path / "state"),
                    "settle_seconds": 0,
                }
            )
        )
        argv = ["run", "--once", "--quiet-seconds", "0", "--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "watcher", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    named, unflushed = _named_after_fsync(share.server_log)
    placed = [p for p in named if p.endswith(".dcm")]
    assert len(placed) == 12, (named, done.stderr)
    assert not unflushed, f"named on the server before their bytes were flushed: {unflushed}"


def test_a_batch_onto_a_share_is_placed_side_by_side_each_file_once_with_its_own_outcome(
    tmp_path, share
):
    # The jobs bound for the share are dealt out over several batches that
    # work at once; each outcome must still be its own job's, in order.
    sources = tmp_path / "sources"
    sources.mkdir()
    local, remote = tmp_path / "local", share.mount / "out"
    local.mkdir()
    remote.mkdir()
    jobs = []
    for number in range(40):
        source = sources / f"{number:03d}"
        source.write_bytes(f"instance {number}\n".encode() * (number + 1))
        jobs.append(placement.Job(str(source), remote, f"S{number % 5}/{number:03d}.dcm"))
        if number % 4 == 0:
            jobs.append(placement.Job(str(source), local, f"S{number % 5}/{number:03d}.dcm"))
    (share.export / "out" / "S0").mkdir()
    (share.export / "out" / "S0" / "000.dcm").write_bytes(b"another instance")
    jobs.append(placement.Job(str(sources / "missing"), remote, "S1/missing.dcm"))

    placing = placement.batch_placement(jobs)
    assert isinstance(placing, placement.SpreadPlacement) and len(placing.batches) > 2
    placing.write()
    placing.flush()
    results = placing.finish()

    *placed, missing = results
    assert isinstance(missing, FileNotFoundError)
    for job, result in zip(jobs[:-1], placed, strict=True):
        assert isinstance(result, placement.Placement), (job, result)
        assert result.path.read_bytes() == Path(job.source).read_bytes()
        wanted = job.root / job.relative
        assert result.path == wanted or (result.beside == wanted and job.relative == "S0/000.dcm")
    assert (share.export / "out" / "S0" / "000.dcm").read_bytes() == b"another instance"
    on_share = [p for p in (share.export / "out").rglob("*") if p.is_file()]
    assert len(on_share) == 40 + 1, "each file once, beside the one that was there"
    assert not [p for p in on_share if p.name.startswith(TEMP_PREFIX)]
    assert len([p for p in local.rglob("*") if p.is_file()]) == 10


def _spread_jobs(sources: Path, root: Path, count: int = 96) -> list[placement.Job]:
    """Jobs for `count` small files into two folders below `root`: enough to
    be placed side by side, more than a few a batch."""
    sources.mkdir(exist_ok=True)
    jobs = []
    for number in range(count):
        source = sources / f"{number:03d}"
        source.write_bytes(f"instance {number}\n".encode() * (number + 1))
        jobs.append(placement.Job(str(source), root, f"S{number % 2}/{number:03d}.dcm"))
    return jobs


def _place_spread(
    jobs: list[placement.Job], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[placement.Placement | BaseException], list[str]]:
    """Place the jobs side by side (`SpreadPlacement`, as onto a share),
    knowing that their filesystem has no O_TMPFILE (as from the batch
    before); returns their outcomes and where each temporary file was made."""
    device = jobs[0].root.stat().st_dev
    monkeypatch.setattr(placement, "_NO_TMPFILE", {*placement._NO_TMPFILE, device})
    made: list[str] = []
    real_new_file = placement._new_file

    def new_file(*args: Any) -> tuple[int, str | None]:
        fd, temporary = real_new_file(*args)
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd, temporary

    monkeypatch.setattr(placement, "_new_file", new_file)
    placing = placement.SpreadPlacement(jobs, list(range(len(jobs))))
    placing.write()
    placing.flush()
    results = placing.finish()
    monkeypatch.setattr(placement, "_new_file", real_new_file)
    return results, made


def _server_requests(server_log: Path) -> list[tuple[str, list[str]]]:
    """From the share server's log: each request's kind and the paths it names."""
    requests = []
    for line in server_log.read_text().splitlines():
        requests.append((line.split(" ", 1)[0], line.split('"')[1::2]))
    return requests


def _place_spread_and_log(
    tmp_path: Path, share: Share, root: Path, monkeypatch
) -> tuple[list[placement.Job], list[tuple[str, list[str]]]]:
    """Place `_spread_jobs` into `root` side by side, check each file arrived
    whole, and return the jobs and the requests the server logged meanwhile."""
    jobs = _spread_jobs(tmp_path / "sources", root)
    before = len(share.server_log.read_text().splitlines())
    results, _ = _place_spread(jobs, monkeypatch)
    for job, result in zip(jobs, results, strict=True):
        assert isinstance(result, placement.Placement), result
        assert result.path.read_bytes() == Path(job.source).read_bytes()
    return jobs, _server_requests(share.server_log)[before:]


def test_files_placed_side_by_side_get_their_temporary_names_in_scratch_folders(
    tmp_path, share, monkeypatch
):
    # Creating or removing a name holds its folder's lock for a round trip
    # to the server: the temporary names go into scratch folders below the
    # root, so that the target folders see nothing but the links.
    root = share.mount / "out"
    root.mkdir()
    jobs, requests = _place_spread_and_log(tmp_path, share, root, monkeypatch)
    created = [paths[0] for kind, paths in requests if kind == "open" and TEMP_PREFIX in paths[0]]
    assert len(created) == len(jobs)
    export = share.export / "out"
    for path in created:
        scratch = Path(path).parent
        assert scratch.parent == export and scratch.name.startswith(TEMP_PREFIX), path
    linked = [paths for kind, paths in requests if kind == "hardlink"]
    assert sorted(Path(new).parent.name for _, new in linked) == ["S0"] * 48 + ["S1"] * 48
    assert [p for p in export.rglob("*") if p.name.startswith(TEMP_PREFIX)] == [], (
        "the scratch folders go with their batches"
    )


def test_a_folder_on_another_filesystem_of_the_server_gets_the_temporary_names_itself(
    tmp_path, share, monkeypatch
):
    # On the server, a folder of the lab's tree is a filesystem of its own
    # (a dataset of its own, say): sshfs shows one, and a link from the
    # scratch folder into it fails (EXDEV on the server, EPERM through
    # sshfs). Those files are written again beside their final names.
    root, served = share.mount / "out", share.export / "out" / "S1"
    served.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(served)], check=True)
    try:
        _, requests = _place_spread_and_log(tmp_path, share, root, monkeypatch)
        linked = [paths for kind, paths in requests if kind == "hardlink"]
        assert any(Path(old).parent == served for old, _ in linked), "written again in S1"
        assert [p for p in share.export.rglob("*") if p.name.startswith(TEMP_PREFIX)] == []
    finally:
        subprocess.run(["umount", "-l", str(served)], check=False)


@dataclass
class Tree:
    """A lab's destination root and another lab's folder beside it on one
    filesystem, as placements see them (`root`, `jones`) and as the file
    server does (`served`, `jones_served`: the same folders on local disk)."""

    root: Path
    served: Path
    jones: Path
    jones_served: Path


@pytest.fixture(params=["sshfs", "local disk"])
def tree(request, tmp_path: Path) -> Iterator[Tree]:
    """The trees on a share, and on local disk, where links are followed (this
    machine's sshfs refuses to read one: EPERM)."""
    if request.param == "local disk":
        out, jones = tmp_path / "nas" / "out", tmp_path / "nas" / "jones"
        for folder in (out, jones):
            folder.mkdir(parents=True)
        yield Tree(out, out, jones, jones)
        return
    share = Share(tmp_path / "share")
    try:
        for name in ("out", "jones"):
            (share.export / name).mkdir()
        yield Tree(
            share.mount / "out", share.export / "out", share.mount / "jones", share.export / "jones"
        )
    finally:
        share.close()


def _made_in(tree: Tree, made: list[str]) -> None:
    """Every temporary file was made in the lab's tree, none in jones's."""
    assert made
    root = os.path.realpath(tree.root)
    outside = [path for path in made if not path.startswith(f"{root}/")]
    assert outside == [], "temporary files made outside the lab's tree"
    assert list(tree.jones_served.iterdir()) == []


def test_a_link_planted_at_the_scratch_folder_name_is_not_followed(tmp_path, tree, monkeypatch):
    # A lab that knows (or guesses) the name of a scratch folder to come puts
    # a link there into another lab's folder: the scratch folder is then not
    # made, and the temporary names go into their target folders.
    name = f"{TEMP_PREFIX}planted"
    monkeypatch.setattr(placement, "_scratch_name", lambda: name)
    (tree.served / name).symlink_to(tree.jones)
    jobs = _spread_jobs(tmp_path / "sources", tree.root)

    results, made = _place_spread(jobs, monkeypatch)

    assert all(isinstance(r, placement.Placement) for r in results), results
    _made_in(tree, made)
    assert (tree.served / name).is_symlink(), "the lab's link is left alone"
    assert len(lab_files(tree.served)) == len(jobs)


def test_a_scratch_folder_swapped_for_a_link_once_made_is_not_followed(tmp_path, tree, monkeypatch):
    # The lab swaps the scratch folder for a link into another lab's folder
    # between its making and its opening: it is opened without following.
    real_mkdir = os.mkdir
    swapped = []

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if dir_fd is not None and str(path).startswith(TEMP_PREFIX):
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(tree.jones, path, dir_fd=dir_fd)
            swapped.append(path)

    monkeypatch.setattr(placement.os, "mkdir", mkdir_then_swap)
    jobs = _spread_jobs(tmp_path / "sources", tree.root)

    results, made = _place_spread(jobs, monkeypatch)
    monkeypatch.setattr(placement.os, "mkdir", real_mkdir)

    assert swapped, "no scratch folder was made"
    assert all(isinstance(r, placement.Placement) for r in results), results
    _made_in(tree, made)
    assert len(lab_files(tree.served)) == len(jobs)


def test_crash_cleanup_removes_the_scratch_folders_below_a_journaled_root(tree):
    # A placement killed mid-way left a scratch folder with temporary files
    # below the root of a journaled folder; the lab keeps, under names like
    # ours, a link to another lab's folder and a folder of its own files.
    (tree.served / "S1").mkdir()
    theirs = tree.jones_served / f"{TEMP_PREFIX}work.dcm"
    theirs.write_bytes(b"jones's")
    left = tree.served / f"{TEMP_PREFIX}a1b2c3"
    left.mkdir()
    for number in range(3):
        (left / f"{TEMP_PREFIX}d4e5f6{number}.1.dcm").write_bytes(b"half")
    (tree.served / f"{TEMP_PREFIX}link").symlink_to(tree.jones)
    own = tree.served / f"{TEMP_PREFIX}own"
    own.mkdir()
    (own / "notes.txt").write_text("the lab's")

    removed, kept = bookkeeping.clean_folders({placement.Folder(tree.root, ("S1",))})

    assert removed == 3 and kept == set()
    assert not left.exists()
    assert theirs.read_bytes() == b"jones's"
    assert (own / "notes.txt").read_text() == "the lab's"
