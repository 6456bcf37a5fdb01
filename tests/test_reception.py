"""The daemon yields to the receiver: it runs below storescp's priority, and
a file it reads late still counts as arrived when it was written."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from harness import DaemonProcess, FakeClock, in_process_daemon

from watcher.priority import NICENESS
from watcher.synthetic import StudySpec, write_study


def niceness(pid: int, task: int | None = None) -> int:
    """A thread's (or a process's main thread's) niceness, from /proc."""
    stat = Path(f"/proc/{pid}/task/{task or pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def threads(pid: int) -> list[int]:
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]


def children(pid: int) -> list[int]:
    found = []
    for task in threads(pid):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def autogroup_nice(pid: int | str) -> int | None:
    """The niceness of a process's autogroup; None for a process in the root
    group, whose /proc file is empty (a session that never left the boot
    session's group, as in some containers)."""
    text = Path(f"/proc/{pid}/autogroup").read_text()
    return int(text.rsplit("nice", 1)[1]) if text else None


needs_autogroup = pytest.mark.skipif(
    not Path("/proc/self/autogroup").exists(),
    reason="this kernel has no autogroups (/proc/self/autogroup)",
)


@needs_autogroup
def test_the_daemon_and_all_it_starts_run_below_the_receiver(tmp_path):
    """As its session's leader (as under systemd) the daemon lowers its own
    niceness and its autogroup's; its threads and placers inherit both."""
    daemon = DaemonProcess(tmp_path)
    lab = tmp_path / "lab"
    lab.mkdir()
    daemon.add_rule("all", lab, path="{PatientID}/{InstanceNumber:05d}.dcm")
    try:
        daemon.start(new_session=True)
        daemon.wait_event("started")
        write_study(StudySpec(series=1, instances=3), daemon.inbox)
        daemon.wait_event("study_placed")
        assert daemon.process is not None
        pid = daemon.process.pid
        assert autogroup_nice(pid) == NICENESS
        assert len(threads(pid)) > 1
        assert {niceness(pid, task) for task in threads(pid)} == {NICENESS}
        placers = children(pid)
        assert placers, "no placer process"
        assert {niceness(child) for child in placers} == {NICENESS}
        (line,) = daemon.logs("priority")
        assert line["yields_to_receiver"] == f"nice {NICENESS}, autogroup nice {NICENESS}"
    finally:
        daemon.close()


@needs_autogroup
def test_a_daemon_started_from_a_shell_leaves_the_shells_session_alone(tmp_path):
    """Started in someone else's session, the daemon lowers its own niceness
    only: the session's autogroup holds the shell too."""
    ours = autogroup_nice("self")
    if ours is not None and ours >= NICENESS:
        pytest.skip(f"this session's autogroup already runs at nice {ours}")
    daemon = DaemonProcess(tmp_path)
    try:
        daemon.start()
        daemon.wait_event("started")
        assert daemon.process is not None
        assert niceness(daemon.process.pid) == NICENESS
        assert autogroup_nice(daemon.process.pid) == ours
        assert autogroup_nice("self") == ours
        (line,) = daemon.logs("priority")
        assert line["yields_to_receiver"] == f"nice {NICENESS}"
    finally:
        daemon.close()


def test_run_once_keeps_the_priority_it_was_given(tmp_path):
    """`run --once` is an operator's command in the foreground, not the daemon."""
    daemon = DaemonProcess(tmp_path)
    daemon.start("--once")
    assert daemon.process is not None
    assert daemon.process.wait(30) == 0
    assert daemon.logs("started")
    assert daemon.logs("priority") == []


def read_late(tmp_path: Path, mtime_before_seen: float, read_after: float) -> tuple[float, float]:
    """A file seen by the daemon and read `read_after` s later; its
    modification time `mtime_before_seen` s before it was seen. Returns
    (when it was seen, its study's last arrival)."""
    clock = FakeClock(1_800_000_000.0)
    daemon, _lab = in_process_daemon(tmp_path, clock, quiet_seconds=60)
    (path,) = write_study(StudySpec(series=1, instances=1), daemon.config.inbox)
    seen = clock.now
    os.utime(path, (seen - mtime_before_seen, seen - mtime_before_seen))
    daemon._observe(str(path), seen, closed=True)
    clock.now += read_after  # the daemon was busy elsewhere, or yielded
    daemon._read_ready(clock.now)
    (study,) = daemon.studies
    return seen, study.last_arrival


def test_a_file_read_late_counts_as_arrived_when_it_was_written(tmp_path):
    """The quiet period starts at the file's last write: a daemon that let
    the receiver go first places the study no later for it."""
    seen, arrived = read_late(tmp_path, mtime_before_seen=0.5, read_after=3.0)
    assert arrived == pytest.approx(seen - 0.5, abs=0.01)


def test_a_file_moved_in_with_an_old_time_counts_as_arrived_when_it_was_seen(tmp_path):
    """`cp -p` or `mv` keeps an older modification time: that is not when the
    file arrived, and would end its study's quiet period too soon."""
    seen, arrived = read_late(tmp_path, mtime_before_seen=3600, read_after=3.0)
    assert arrived == seen


def test_a_file_written_in_the_future_counts_as_arrived_when_it_was_read(tmp_path):
    """A clock ahead (a writer on another host) never puts an arrival after
    the read that found the file."""
    seen, arrived = read_late(tmp_path, mtime_before_seen=-3600, read_after=3.0)
    assert arrived == seen + 3.0


def test_a_file_written_during_a_long_turn_counts_from_its_write(tmp_path):
    """A turn that starts at T and drains events for 3 s reads files written
    meanwhile: they arrived when written, not at T (their study would be
    placed 3 s early)."""
    clock = FakeClock(time.time())
    daemon, _lab = in_process_daemon(tmp_path, clock, quiet_seconds=60)
    turn_start = clock.now
    (path,) = write_study(StudySpec(series=1, instances=1), daemon.config.inbox)
    written = turn_start + 3
    os.utime(path, (written, written))
    clock.now = written + 0.2  # the drain went on; the file is read now
    daemon._observe(str(path), written, closed=True)
    daemon._read_ready(turn_start)
    (study,) = daemon.studies
    assert study.last_arrival == pytest.approx(written, abs=0.01)


def test_an_event_counts_from_when_the_watcher_saw_it_not_when_the_loop_took_it(tmp_path):
    """The inbox's events wait in a queue while the loop yields; a file whose
    own time cannot be trusted (moved in with an old one) counts from when
    its event came, not from when the loop got round to it."""
    from watcher.inbox import InboxWatcher

    clock = FakeClock(time.time())
    daemon, _lab = in_process_daemon(tmp_path, clock, quiet_seconds=60)
    daemon.watcher = InboxWatcher(daemon.config.inbox, False, 1.0, clock)
    daemon.watcher.start()
    try:
        (source,) = write_study(StudySpec(series=1, instances=1), tmp_path / "elsewhere")
        os.utime(source, (clock.now - 3600, clock.now - 3600))
        seen = clock.now
        source.rename(daemon.config.inbox / source.name)
        deadline = time.monotonic() + 10
        while daemon.watcher.events.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not daemon.watcher.events.empty(), "no inbox event"
        clock.now = seen + 3  # the loop takes the event 3 s later
        daemon.tick()
    finally:
        daemon.watcher.stop()
    (study,) = daemon.studies
    assert study.last_arrival == seen


def test_a_study_is_not_quiet_while_files_wait_unread(tmp_path):
    """A daemon that reads late does not know which study its unread files
    belong to: until they are as old as the quiet period, no study that
    merely went quiet is placed (it could be split)."""
    clock = FakeClock(time.time())
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=60)
    write_study(StudySpec(series=1, instances=1), daemon.config.inbox)
    daemon.tick()
    (study,) = daemon.studies
    start = clock.now
    # one more file, 4 s later, still being written (not closed, not settled)
    daemon.config = dataclasses.replace(daemon.config, settle_seconds=600)
    (late,) = write_study(StudySpec(series=1, instances=1), tmp_path / "late")
    arrived = daemon.config.inbox / late.name
    late.rename(arrived)
    os.utime(arrived, (start + 4, start + 4))
    daemon._observe(str(arrived), start + 4)
    clock.now = start + 61  # the first study's own quiet period is over
    daemon.tick()
    assert list(lab.rglob("*.dcm")) == []
    assert study.uid not in daemon.delivery.in_flight
    clock.now = start + 65  # the unread file too is 60 s old
    daemon.tick()
    assert len(list(lab.rglob("*.dcm"))) == 1
