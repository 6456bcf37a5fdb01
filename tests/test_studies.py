"""Readiness and quiescence, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import yaml
from harness import (
    FakeClock,
    assert_accounted,
    in_process_daemon,
    prepare,
    skip_or_fail,
    snapshot,
)
from pydicom.uid import generate_uid

from watcher import delivery as delivery_module
from watcher import engine as engine_module
from watcher import headers
from watcher import placing as placing_module
from watcher.bookkeeping import write_journal
from watcher.daemon import Daemon
from watcher.engine import BATCH, POOL_THRESHOLD, header_pool
from watcher.inbox import InboxWatcher
from watcher.placement import TEMP_PREFIX, Folder
from watcher.studies import COUNT_GRACE_SECONDS, Arrivals, Studies
from watcher.synthetic import UID_ROOT, StudySpec, make_dataset, write_dataset, write_study


def instance(study: str, sop: str, path: str = "") -> headers.Instance:
    values = {"StudyInstanceUID": study, "SOPInstanceUID": sop, "PatientID": "P"}
    return headers.Instance(path=path or f"/inbox/{sop}", size=10, values=values)


def test_a_study_complete_by_count_waits_a_short_grace_for_the_next_series():
    studies = Studies(headers.BASE_FIELDS)
    studies.add(instance("S1", "1"), now=10)
    complete = lambda study: (60.0, True)  # noqa: E731 - the count is reached
    assert (
        studies.due(now=10 + COUNT_GRACE_SECONDS / 2, quiet=60, max_age=3600, policy=complete) == []
    )
    studies.add(instance("S1", "2"), now=11)  # the next series begins: the grace starts again
    assert studies.due(now=10 + COUNT_GRACE_SECONDS, quiet=60, max_age=3600, policy=complete) == []
    due = studies.due(now=11 + COUNT_GRACE_SECONDS, quiet=60, max_age=3600, policy=complete)
    assert [(s.uid, why) for s, why in due] == [("S1", "expected_count")]


def test_a_study_is_due_only_after_quiet_seconds_without_arrivals():
    studies = Studies(headers.BASE_FIELDS)
    studies.add(instance("S1", "1"), now=0)
    studies.add(instance("S1", "2"), now=50)
    assert studies.due(now=100, quiet=60, max_age=3600) == []
    due = studies.due(now=110, quiet=60, max_age=3600)
    assert [(s.uid, why) for s, why in due] == [("S1", "quiet")]
    assert len(due[0][0].instances) == 2


def test_interleaved_studies_complete_independently():
    studies = Studies(headers.BASE_FIELDS)
    for t in range(0, 100, 10):
        studies.add(instance("A", f"a{t}"), now=t)
        if t < 30:
            studies.add(instance("B", f"b{t}"), now=t)
    assert [s.uid for s, _ in studies.due(now=85, quiet=60, max_age=3600)] == ["B"]
    assert sorted(s.uid for s, _ in studies.due(now=150, quiet=60, max_age=3600)) == ["A", "B"]


def test_a_study_that_never_goes_quiet_is_due_at_its_maximum_age():
    studies = Studies(headers.BASE_FIELDS)
    for t in range(0, 400, 5):
        studies.add(instance("T", f"t{t}"), now=t)
    due = studies.due(now=400, quiet=60, max_age=300)
    assert [(s.uid, why) for s, why in due] == [("T", "max_age")]


def test_parking_doubles_the_wait_up_to_a_cap_and_reports_changes_once():
    studies = Studies(headers.BASE_FIELDS)
    study = studies.add(instance("P", "1"), now=0)
    changes = [
        Studies.park(study, "root missing", now, first=30, longest=100) for now in (0, 1, 2, 3)
    ]
    assert changes == [True, False, False, False]
    assert study.next_try == 3 + 100 and study.attempts == 4
    assert Studies.park(study, "disk full", 4, first=30, longest=100) is True
    assert studies.due(now=50, quiet=0, max_age=0) == []
    assert [why for _, why in studies.due(now=104, quiet=0, max_age=0)] == ["retry"]


def test_repeated_values_are_stored_once_per_study():
    studies = Studies(headers.BASE_FIELDS)
    a = studies.add(instance("S", "1"), now=0)
    studies.add(instance("S", "2"), now=0)
    first, second = a.instances.values()
    index = a.fields.index("StudyInstanceUID")
    assert first.values[index] is second.values[index]
    assert a.values(second)["SOPInstanceUID"] == "2"


def test_arrivals_wait_for_a_close_or_for_the_size_to_settle():
    arrivals = Arrivals()
    arrivals.observe("a", size=10, mtime=100.0, now=100.0)
    arrivals.observe("b", size=10, mtime=100.0, now=100.0, closed=True)
    assert arrivals.ready(now=100.5, settle=2, wall_now=100.5) == ["b"]
    arrivals.observe("a", size=20, mtime=101.0, now=101.0)  # still growing
    assert "a" not in arrivals.ready(now=102.5, settle=2, wall_now=102.5)
    assert "a" in arrivals.ready(now=103.0, settle=2, wall_now=103.0)


def test_an_unroutable_file_is_quarantined_only_after_it_stopped_changing():
    arrivals = Arrivals()
    arrivals.observe("x", size=5, mtime=0.0, now=0.0)
    arrivals.failed("x", "truncated", now=1.0, retry_after=1.0)
    assert arrivals.ready(now=1.5, settle=0, wall_now=1.5) == []
    assert arrivals.to_quarantine(now=30, grace=60) == []
    arrivals.observe("x", size=9, mtime=40.0, now=40.0)  # it grew: start again
    assert arrivals.ready(now=40.0, settle=0, wall_now=40.0) == ["x"]
    arrivals.failed("x", "truncated", now=41.0, retry_after=1.0)
    assert arrivals.to_quarantine(now=99, grace=60) == []
    assert arrivals.to_quarantine(now=100, grace=60) == [("x", "truncated")]


def test_a_failed_quarantine_is_tried_again_on_a_doubling_schedule_until_the_file_changes():
    arrivals = Arrivals()
    arrivals.observe("x", size=5, mtime=0.0, now=0.0)
    arrivals.failed("x", "not DICOM", now=0.0, retry_after=1.0)
    assert arrivals.held() == []
    assert arrivals.quarantine_failed("x", "EACCES", now=10, first=30, longest=100) == (1, 30)
    assert arrivals.held() == ["x"]
    assert arrivals.to_quarantine(now=39, grace=0) == []
    assert arrivals.to_quarantine(now=40, grace=0) == [("x", "not DICOM")]
    assert arrivals.quarantine_failed("x", "EACCES", now=40, first=30, longest=100) == (2, 60)
    assert arrivals.quarantine_failed("x", "EACCES", now=100, first=30, longest=100) == (3, 100)
    assert arrivals.to_quarantine(now=199, grace=0) == []
    arrivals.observe("x", size=6, mtime=150.0, now=150.0)  # it changed: seen anew
    assert arrivals.held() == []
    arrivals.failed("x", "not DICOM", now=150.0, retry_after=1.0)
    assert arrivals.to_quarantine(now=150, grace=0) == [("x", "not DICOM")]
    assert arrivals.quarantine_failed("gone", "EACCES", now=0, first=30, longest=100) == (0, 0.0)


def refuse_removal(monkeypatch: pytest.MonkeyPatch, paths: Iterable[str | Path]) -> None:
    """Make `os.unlink` refuse these files (given by path, or by name in a
    folder handle), as an inbox the daemon may not write in does; the tests
    run as root, whom permissions do not stop."""
    refused = {os.fspath(path) for path in paths}
    unlink = os.unlink

    def refusing_unlink(path, *args, dir_fd=None, **kwargs):  # type: ignore[no-untyped-def]
        full = os.fspath(path)
        if dir_fd is not None:
            full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), full)
        if full in refused:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return unlink(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    """The captured log lines of one event."""
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]


def parked_in_two_turns(
    daemon: Daemon, clock: FakeClock, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    """Two turns (two seconds apart) read a study and park it, with `why`."""
    caplog.set_level(logging.INFO)
    daemon.tick()
    clock.now += 2
    daemon.tick()
    [parked] = logged(caplog, "study_parked")
    assert why in parked
    assert not logged(caplog, "study_placed")


def placed_once_removal_works(
    daemon: Daemon,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With `refuse_removal` undone, the retry (10 s later) places the study."""
    monkeypatch.undo()
    clock.now += 10
    daemon.tick()
    assert logged(caplog, "study_placed")


def test_daemon_ticks_place_a_study_exactly_when_quiet_by_the_injected_clock(tmp_path):
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=60)
    write_study(StudySpec(series=1, instances=3), daemon.config.inbox)
    daemon.tick()
    assert len(daemon.studies) == 1
    clock.now += 59
    daemon.tick()
    assert list(lab.rglob("*.dcm")) == []
    clock.now += 1
    daemon.tick()
    assert len(list(lab.rglob("*.dcm"))) == 3
    assert not any(daemon.config.inbox.iterdir())


def write_series(
    inbox: Path, study: str, series: str, number: int, instances: Iterable[int], **tags: object
) -> None:
    for instance in instances:
        ds = make_dataset(
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            SeriesNumber=number,
            InstanceNumber=instance,
            **tags,
        )
        write_dataset(ds, inbox / f"MR.{ds.SOPInstanceUID}")


def placed_files(lab: Path) -> int:
    return len(list(lab.rglob("*.dcm")))


def test_a_study_complete_by_images_in_acquisition_waits_for_every_series(tmp_path):
    clock = FakeClock()
    rule = {"expected_instances": "ImagesInAcquisition"}
    daemon, lab = in_process_daemon(tmp_path, clock, rule, quiet_seconds=60, rescan_seconds=0)
    inbox, study, first, second = daemon.config.inbox, *(generate_uid(UID_ROOT) for _ in range(3))
    write_series(inbox, study, first, 1, [1, 2], ImagesInAcquisition=2)  # whole
    write_series(inbox, study, second, 2, [1], ImagesInAcquisition=3)  # 1 of 3
    daemon.tick()
    clock.now += 2 * COUNT_GRACE_SECONDS
    daemon.tick()
    assert placed_files(lab) == 0, "one whole series is not the whole study"
    write_series(inbox, study, second, 2, [2, 3], ImagesInAcquisition=3)
    daemon.tick()
    clock.now += 2 * COUNT_GRACE_SECONDS
    daemon.tick()
    assert placed_files(lab) == 5, "every series whole: placed long before the quiet period"


def test_a_study_complete_by_a_number_of_instances_waits_for_the_last(tmp_path):
    clock = FakeClock()
    daemon, lab = in_process_daemon(
        tmp_path, clock, {"expected_instances": 3}, quiet_seconds=60, rescan_seconds=0
    )
    inbox, study, series = daemon.config.inbox, generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    write_series(inbox, study, series, 1, [1, 2])
    daemon.tick()
    clock.now += 2 * COUNT_GRACE_SECONDS
    daemon.tick()
    assert placed_files(lab) == 0, "2 of 3 instances"
    write_series(inbox, study, series, 1, [3])
    daemon.tick()
    clock.now += 2 * COUNT_GRACE_SECONDS
    daemon.tick()
    assert placed_files(lab) == 3


def test_the_longest_quiet_period_of_the_matching_rules_decides(tmp_path):
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, {"quiet_seconds": 30}, quiet_seconds=60)
    other = tmp_path / "other"
    other.mkdir()
    quick = {"match": {}, "destination": str(other), "path": "{SOPInstanceUID}.dcm"}
    (daemon.config.rules / "quick.yaml").write_text(yaml.safe_dump({**quick, "quiet_seconds": 2}))
    daemon._reload_rules()
    write_study(StudySpec(series=1, instances=2), daemon.config.inbox)
    daemon.tick()
    clock.now += 5
    daemon.tick()
    assert placed_files(lab) == placed_files(other) == 0, "quiet for 5 s of the 30 one rule wants"
    clock.now += 25
    daemon.tick()
    assert placed_files(lab) == placed_files(other) == 2


def test_run_once_with_quiet_seconds_zero_overrides_a_rules_own_quiet_period(tmp_path):
    clock = FakeClock()
    config = in_process_daemon(tmp_path, clock, {"quiet_seconds": 600})[0].config
    write_study(StudySpec(series=1, instances=2), config.inbox)
    once = Daemon(config, once=True, clock=clock, stop=threading.Event(), quiet_override=0)
    runner = threading.Thread(target=once.run)
    runner.start()
    runner.join(timeout=20)
    once.stop.set()  # (had it waited the rule's 600 s)
    runner.join()
    assert placed_files(tmp_path / "lab") == 2


def test_a_start_after_a_crash_removes_the_temporary_files_its_journal_lists(tmp_path, caplog):
    # What a kill in the middle of a placement leaves: the journal of the
    # folders it wrote into, temporary files there (a share without unnamed
    # files, a manifest being replaced), and the files it had placed.
    caplog.set_level(logging.INFO)
    config = in_process_daemon(tmp_path, FakeClock())[0].config
    lab = tmp_path / "lab"
    listed, other = lab / "P1" / "1", lab / "P2" / "1"
    for folder in (listed, other):
        folder.mkdir(parents=True)
        (folder / "1.dcm").write_bytes(b"placed")
        (folder / f"{TEMP_PREFIX}a1b2c3.2.dcm").write_bytes(b"half")
    (listed / f"{TEMP_PREFIX}d4e5f6.manifest.json").write_text("{")
    journal = config.state / "placing.json"
    write_journal(journal, {Folder(lab, ("P1", "1")), Folder(lab, ("gone",))})

    prepare(config)

    assert sorted(p.name for p in listed.iterdir()) == ["1.dcm"]
    assert len(list(other.iterdir())) == 2, "a folder the journal does not list is left alone"
    assert not journal.exists()
    [cleaned] = logged(caplog, "cleaned_interrupted_placement")
    assert "temporary_files=2 " in cleaned and "folders_left=0" in cleaned


def test_an_older_journal_of_bare_paths_is_cleaned_too(tmp_path):
    config = in_process_daemon(tmp_path, FakeClock())[0].config
    folder = tmp_path / "lab" / "P1"
    folder.mkdir()
    (folder / f"{TEMP_PREFIX}a1b2c3.2.dcm").write_bytes(b"half")
    journal = config.state / "placing.json"
    journal.write_text(json.dumps({"folders": [str(folder)]}))

    prepare(config)

    assert list(folder.iterdir()) == []
    assert not journal.exists()


def test_crash_cleanup_does_not_follow_a_link_a_lab_put_in_place_of_a_journaled_folder(tmp_path):
    # Lab smith's placement crashed, leaving its folder P1 in the journal.
    # Before the restart smith replaces P1 with a link into jones's tree,
    # where jones's own program keeps files whose names start like ours.
    config = in_process_daemon(tmp_path, FakeClock())[0].config
    smith, jones = tmp_path / "nas" / "smith", tmp_path / "nas" / "jones"
    (jones / "P1").mkdir(parents=True)
    smith.mkdir(parents=True)
    theirs = jones / "P1" / f"{TEMP_PREFIX}work.dcm"
    theirs.write_bytes(b"jones's")
    (smith / "P1").symlink_to(jones / "P1")
    journal = config.state / "placing.json"
    write_journal(journal, {Folder(smith, ("P1",), smith), Folder(smith, ("P1",))})

    prepare(config)

    assert theirs.read_bytes() == b"jones's"
    assert not journal.exists(), "a folder now reached through a link is dropped"


def test_an_empty_inbox_folder_is_kept_until_empty_folder_seconds_passed(tmp_path):
    clock = FakeClock(time.time())  # (folder ages are read from the disk's clock)
    daemon, _ = in_process_daemon(tmp_path, clock, rescan_seconds=0, empty_folder_seconds=600)
    fresh = daemon.config.inbox / "study-just-made"  # storescp -su made it for a new study
    fresh.mkdir()
    daemon.tick()
    clock.now += 300
    daemon.tick()
    assert fresh.is_dir(), "a folder empty for less than empty_folder_seconds is kept"
    clock.now += 301
    daemon.tick()
    assert not fresh.exists()
    clock.now += 601  # the inbox itself is now empty, and long unchanged
    daemon.tick()
    assert daemon.config.inbox.is_dir(), "never the inbox itself"


def test_daemon_forces_a_trickling_study_at_its_maximum_age(tmp_path, caplog):
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=60, max_study_age_seconds=300)
    spec = StudySpec(series=1, instances=1)
    caplog.set_level(logging.WARNING)
    for n in range(11):
        ds = make_dataset(StudyInstanceUID=spec.study_uid, InstanceNumber=n + 1)
        write_dataset(ds, daemon.config.inbox / f"MR.{n}")
        daemon.tick()
        clock.now += 30
    assert len(list(lab.rglob("*.dcm"))) == 11
    assert any("event=study_forced" in r.getMessage() for r in caplog.records)


def test_a_dead_observer_is_restarted_and_logged(tmp_path, caplog):
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=0)
    daemon.watcher = InboxWatcher(daemon.config.inbox, poll=False, poll_seconds=1)
    daemon.watcher.start()
    try:
        dead = daemon.watcher.observer
        assert dead is not None
        dead.stop()
        dead.join(5)
        caplog.set_level(logging.ERROR)
        daemon.tick()
        assert daemon.watcher.healthy()
        assert daemon.watcher.observer is not dead
        assert any("event=watcher_died" in r.getMessage() for r in caplog.records)
    finally:
        daemon.watcher.stop()


def inotify_instances() -> int:
    """How many inotify instances this process holds open."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while listed (the listing's own)
            count += os.readlink(fd) == "anon_inode:inotify"
    return count


def test_inotify_watch_limit_falls_back_to_polling(tmp_path, caplog):
    limit_file = Path("/proc/sys/fs/inotify/max_user_watches")
    try:
        original = limit_file.read_text()
        limit_file.write_text(original)
    except OSError as error:
        skip_or_fail(f"cannot change the inotify watch limit here: {error.strerror}")
    inbox = tmp_path / "inbox"
    for n in range(20):  # one folder per study, as storescp -su makes
        (inbox / f"study{n}").mkdir(parents=True)
    watcher = InboxWatcher(inbox, poll=False, poll_seconds=0.2)
    caplog.set_level(logging.WARNING)
    inotify_before = inotify_instances()
    threads_before = set(threading.enumerate())
    limit_file.write_text("3\n")
    try:
        watcher.start()
        watcher.check_coverage(21)
        watcher.check_coverage(21)  # a shortfall that persists
    finally:
        limit_file.write_text(original)
    try:
        assert watcher.poll is True
        assert any("event=inotify_limit" in r.getMessage() for r in caplog.records)
        # The abandoned inotify observer is gone, with its threads and instance.
        assert inotify_instances() == inotify_before
        polling = {watcher.observer} | set(watcher.observer.emitters)
        assert set(threading.enumerate()) - threads_before - polling == set()
        write_dataset(make_dataset(), inbox / "study3" / "new.dcm")
        kind, path, _seen = watcher.events.get(timeout=10)
        assert path.endswith("new.dcm") or "study3" in path
    finally:
        watcher.stop()


def test_the_event_handler_never_raises(tmp_path, caplog):
    from watcher.inbox import InboxHandler

    class Broken:
        event_type = "created"
        is_directory = False

        @property
        def src_path(self) -> str:
            raise OSError(errno.EIO, "boom")

    handler = InboxHandler(events=None)  # type: ignore[arg-type]
    caplog.set_level(logging.ERROR)
    handler.on_any_event(Broken())  # type: ignore[arg-type]
    assert any("event=watch_handler_error" in r.getMessage() for r in caplog.records)


def _die() -> None:
    os._exit(1)


def test_workers_killed_while_idle_park_the_study_and_it_is_placed_without_them(tmp_path, caplog):
    # `run --once` keeps its worker processes between turns. When one is
    # killed (the OOM killer) while idle, the pool is broken: the study in
    # hand is parked whole, the loss is logged once, and the study is placed
    # without workers when its retry comes.
    clock = FakeClock()
    daemon, lab = in_process_daemon(
        tmp_path, clock, once=True, quiet_seconds=1, park_first_seconds=5
    )
    write_study(StudySpec(series=2, instances=(BATCH + 10) // 2), daemon.config.inbox)
    daemon.tick()  # read, by this process; the study is not quiet yet
    broken = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(BrokenProcessPool):
        broken.submit(_die).result()
    daemon.delivery.workers = broken
    caplog.set_level(logging.WARNING)
    clock.now += 2
    daemon.tick()
    assert daemon.delivery.workers is None
    assert sum("event=workers_lost" in r.getMessage() for r in caplog.records) == 1
    assert sum("event=study_parked" in r.getMessage() for r in caplog.records) == 1
    assert list(lab.rglob("*.dcm")) == []
    assert len(list(daemon.config.inbox.iterdir())) == BATCH + 10
    clock.now += 10
    daemon.tick()
    assert len(list(lab.rglob("*.dcm"))) == BATCH + 10
    assert not any(daemon.config.inbox.iterdir())


def test_workers_killed_while_idle_do_not_stop_the_next_reading(tmp_path, caplog):
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, once=True, quiet_seconds=1)
    broken = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(BrokenProcessPool):
        broken.submit(_die).result()
    daemon.delivery.workers = broken
    write_study(StudySpec(series=1, instances=POOL_THRESHOLD + 4), daemon.config.inbox)
    caplog.set_level(logging.WARNING)
    daemon.tick()  # enough files for the pool: read here instead
    assert daemon.delivery.workers is None
    assert sum("event=workers_lost" in r.getMessage() for r in caplog.records) == 1
    assert sum(len(study.instances) for study in daemon.studies) == POOL_THRESHOLD + 4
    clock.now += 2
    daemon.tick()
    assert len(list(lab.rglob("*.dcm"))) == POOL_THRESHOLD + 4


#: The journal the checks below read (set before the workers are forked).
_JOURNAL: list[Path] = []


def write_three_two_batch_studies(inbox: Path) -> int:
    """Studies P0, P1 and P2 in folders of their own, each of two series
    and a little more than one batch; returns the files a study has."""
    per_study = BATCH + 10
    for n in range(3):
        write_study(
            StudySpec(patient_id=f"P{n}", series=2, instances=per_study // 2), inbox / f"study{n}"
        )
    return per_study


def _journaled() -> set[str]:
    return {
        entry["path"] for entry in json.loads(_JOURNAL[0].read_text(encoding="utf-8"))["folders"]
    }


def _place_after_checking_the_journal(batch, retry):  # type: ignore[no-untyped-def]
    """Runs in a worker: refuses a batch that would write into a folder the
    journal does not list (a crash there would leave its temporaries)."""
    listed = _journaled()
    for _, routes in batch:
        for route in routes:
            folder = str(route.rule.destination / route.relative_path.rpartition("/")[0])
            assert folder in listed, f"{folder} written into before it was journaled"
    return _PLACE_MOVING(batch, retry)


_PLACE_MOVING = delivery_module._place_moving


def test_once_workers_begin_the_next_study_before_the_last_is_finished_all_journaled_first(
    tmp_path, monkeypatch
):
    # Three studies of two batches each, placed in one turn by the kept
    # workers: the next study's first batch is begun before the study before
    # it is finished (its manifest written), and every folder a batch or a
    # manifest writes into is in the journal before, which is gone after.
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, once=True, quiet_seconds=1)
    per_study = write_three_two_batch_studies(daemon.config.inbox)
    _JOURNAL[:] = [daemon.delivery.journal]
    monkeypatch.setattr(delivery_module, "_place_moving", _place_after_checking_the_journal)
    events: list[tuple[str, str]] = []
    workers = header_pool(threads_running=False)  # forked: the check above is theirs too
    submit = workers.submit

    def recording_submit(function, batch, *args):  # type: ignore[no-untyped-def]
        if function is _place_after_checking_the_journal:  # not a read
            events.append(("begin", batch[0][0].values["PatientID"]))
        return submit(function, batch, *args)

    monkeypatch.setattr(workers, "submit", recording_submit)
    end_placement = daemon.delivery._end_placement

    def recording_end(placing, journal):  # type: ignore[no-untyped-def]
        events.append(("end", placing.study.patient))
        end_placement(placing, journal)

    monkeypatch.setattr(daemon.delivery, "_end_placement", recording_end)
    write_manifest = placing_module.write_manifest

    def checked_write_manifest(path, **fields):  # type: ignore[no-untyped-def]
        assert str(path.parent) in _journaled(), "a manifest written before it was journaled"
        return write_manifest(path, **fields)

    monkeypatch.setattr(placing_module, "write_manifest", checked_write_manifest)
    daemon.delivery.workers = workers
    try:
        daemon.tick()  # read, by the workers
        clock.now += 2
        daemon.tick()  # all three are due: placed in this turn
    finally:
        daemon.delivery.workers = None
        workers.shutdown()
    assert len(list(lab.rglob("*.dcm"))) == 3 * per_study
    assert len(list(lab.rglob("manifest.json"))) == 3
    assert not any(daemon.config.inbox.rglob("MR.*"))
    ends = [patient for kind, patient in events if kind == "end"]
    assert sorted(ends) == ["P0", "P1", "P2"]
    for first, following in itertools.pairwise(ends):
        before_end = events[: events.index(("end", first))]
        assert ("begin", following) in before_end, f"{following} waited for {first}: {events}"
    assert not daemon.delivery.journal.exists()


_MAIN_PID = os.getpid()


def _place_or_die_on_p1(batch, retry):  # type: ignore[no-untyped-def]
    """In a worker, dies (the OOM killer) when given a batch of patient P1."""
    if os.getpid() != _MAIN_PID and batch[0][0].values["PatientID"] == "P1":
        os._exit(1)
    return _PLACE_MOVING(batch, retry)


def test_a_worker_killed_mid_placement_parks_the_studies_in_flight_and_the_rest_go_on(
    tmp_path, monkeypatch, caplog
):
    # A worker dies while the workers place three studies (the pool then
    # stops the other one, perhaps mid-batch). The studies whose batches were
    # lost are parked, the others are placed without workers; at the retry
    # everything is placed once, each study finished (logged) once.
    clock = FakeClock()
    daemon, lab = in_process_daemon(
        tmp_path, clock, once=True, quiet_seconds=1, park_first_seconds=5
    )
    per_study = write_three_two_batch_studies(daemon.config.inbox)
    entered = snapshot(daemon.config.inbox)
    monkeypatch.setattr(delivery_module, "_place_moving", _place_or_die_on_p1)
    daemon.delivery.workers = header_pool(threads_running=False)
    caplog.set_level(logging.INFO)
    daemon.tick()  # read, by the workers
    clock.now += 2
    daemon.tick()  # placed until P1's batch kills its worker
    assert daemon.delivery.workers is None
    parked = logged(caplog, "study_parked")
    assert any("patient=P1" in line for line in parked)
    assert daemon.config.inbox.joinpath("study1").exists() and any(
        daemon.config.inbox.joinpath("study1").iterdir()
    ), "a study whose batch was lost stays in the inbox"
    clock.now += 10
    daemon.tick()  # the retry, without workers
    assert not any(daemon.config.inbox.rglob("MR.*"))
    counts = assert_accounted(entered, [lab], daemon.state, exact=True, unique_uids=True)
    assert counts["placed"] == 3 * per_study
    placed = [r.getMessage() for r in caplog.records if "event=study_placed" in r.getMessage()]
    assert sorted(line.split("patient=")[1].split()[0] for line in placed) == ["P0", "P1", "P2"]
    assert sum("event=workers_lost" in r.getMessage() for r in caplog.records) == 1
    for manifest in lab.rglob("manifest.json"):
        assert json.loads(manifest.read_text())["files"] == per_study


def test_a_journal_that_cannot_be_written_stops_the_next_study_after_the_batches_in_flight(
    tmp_path, monkeypatch, caplog
):
    # The state folder's disk fills while the workers place the first study,
    # and the second one's journal cannot be written: the first study's
    # batches in flight are taken and it is finished (manifest, study_placed)
    # before the error is raised; the other two stay pending, and are placed
    # once the disk has room again.
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, once=True, quiet_seconds=1)
    per_study = write_three_two_batch_studies(daemon.config.inbox)
    entered = snapshot(daemon.config.inbox)
    add = delivery_module.Journal.add
    disk_full = True
    journaled: list[str] = []  # the patients, in the order they are prepared

    def add_or_fail(journal, folders):  # type: ignore[no-untyped-def]
        patient = min(folder.path for folder in folders).relative_to(lab).parts[0]
        if disk_full and journaled and patient != journaled[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(journal.path))
        journaled.append(patient)
        add(journal, folders)

    monkeypatch.setattr(delivery_module.Journal, "add", add_or_fail)
    caplog.set_level(logging.INFO)

    def placed() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if "event=study_placed" in r.getMessage()]
        return sorted(line.split("patient=")[1].split()[0] for line in lines)

    daemon.delivery.workers = header_pool(threads_running=False)
    try:
        daemon.tick()  # read, by the workers
        clock.now += 2
        with pytest.raises(OSError, match="No space left"):
            daemon.tick()  # the first placed by both workers, the second not journaled
        first = journaled[0]
        assert placed() == [first]
        [manifest] = lab.joinpath(first).rglob("manifest.json")
        assert json.loads(manifest.read_text())["files"] == per_study
        others = sorted({"P0", "P1", "P2"} - {first})
        assert sorted(study.patient for study in daemon.studies) == others
        disk_full = False
        daemon.tick()
    finally:
        if daemon.delivery.workers is not None:
            daemon.delivery.workers.shutdown()
            daemon.delivery.workers = None
    assert not any(daemon.config.inbox.rglob("MR.*"))
    counts = assert_accounted(entered, [lab], daemon.state, exact=True, unique_uids=True)
    assert counts["placed"] == 3 * per_study
    assert placed() == ["P0", "P1", "P2"]
    for manifest in lab.rglob("manifest.json"):
        assert json.loads(manifest.read_text())["files"] == per_study
    assert not daemon.delivery.journal.exists()


def test_a_study_is_reported_placed_after_the_removal_of_its_files_is_flushed_once(
    tmp_path, monkeypatch
):
    # Batches remove their sources without flushing the inbox; the study's
    # inbox folders are flushed once, when its last batch is taken: after
    # every source is gone, before its manifest is written.
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=1)
    sources = write_study(StudySpec(series=2, instances=BATCH // 2 + 5), daemon.config.inbox / "s")
    flushes: list[tuple[set[str], int, int]] = []
    flush_folders = delivery_module.flush_folders

    def recording_flush(folders):  # type: ignore[no-untyped-def]
        folders = set(folders)
        left = sum(source.exists() for source in sources)
        flushes.append((folders, left, len(list(lab.rglob("manifest.json")))))
        flush_folders(folders)

    monkeypatch.setattr(delivery_module, "flush_folders", recording_flush)
    fsynced: list[str] = []
    fsync_folder = engine_module._fsync_folder_path
    monkeypatch.setattr(
        engine_module, "_fsync_folder_path", lambda path: fsynced.append(path) or fsync_folder(path)
    )
    daemon.tick()
    clock.now += 2
    daemon.tick()  # two batches
    assert len(list(lab.rglob("*.dcm"))) == len(sources) > BATCH
    assert flushes == [({str(sources[0].parent)}, 0, 0)]
    assert fsynced == [str(sources[0].parent)]  # once for the study, not once a batch


def test_a_study_whose_inbox_cannot_be_flushed_is_placed_and_the_failure_logged(
    tmp_path, monkeypatch, caplog
):
    # Its copies are durable, only the removal of its sources may not be: the
    # study is placed (manifest, study_placed) and the failure is logged.
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=1)
    sources = write_study(StudySpec(series=1, instances=3), daemon.config.inbox)

    def fail(folders):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, "Input/output error", str(daemon.config.inbox))

    monkeypatch.setattr(delivery_module, "flush_folders", fail)
    caplog.set_level(logging.INFO)
    daemon.tick()
    clock.now += 2
    daemon.tick()
    assert len(list(lab.rglob("*.dcm"))) == 3
    assert len(list(lab.rglob("manifest.json"))) == 1
    assert not any(source.exists() for source in sources)
    messages = [record.getMessage() for record in caplog.records]
    assert any("event=inbox_flush_failed" in m and "Input/output error" in m for m in messages)
    assert any("event=study_placed" in m for m in messages)


def test_a_source_the_daemon_may_not_remove_parks_its_study_and_loses_nothing(
    tmp_path, monkeypatch, caplog
):
    # An inbox the daemon cannot write in (its receiver's permissions): the
    # copies are made and durable, the sources stay, and the study is parked
    # with the reason, instead of the error stopping the daemon. Once the
    # removal works, the retry finds the copies present and removes the sources.
    clock = FakeClock()
    daemon, lab = in_process_daemon(
        tmp_path, clock, once=True, quiet_seconds=1, park_first_seconds=5
    )
    sources = write_study(StudySpec(series=1, instances=3), daemon.config.inbox)
    refuse_removal(monkeypatch, sources)
    parked_in_two_turns(daemon, clock, caplog, "placed, but cannot be removed: Permission denied")
    assert len(list(lab.rglob("*.dcm"))) == 3
    assert all(source.exists() for source in sources)

    placed_once_removal_works(daemon, clock, monkeypatch, caplog)
    assert not any(source.exists() for source in sources)
    assert len(list(lab.rglob("*.dcm"))) == 3


def test_a_file_no_rule_takes_that_the_daemon_may_not_remove_parks_its_study(
    tmp_path, monkeypatch, caplog
):
    # A study half of which no rule takes, in an inbox the daemon cannot
    # write in: the files a rule takes are placed, the others are kept in
    # unmatched/ and stay in the inbox too, and the study is parked with the
    # reason, instead of the error stopping the daemon. Once the removal
    # works, the retry removes them and the study is finished.
    clock = FakeClock()
    daemon, lab = in_process_daemon(tmp_path, clock, quiet_seconds=1, park_first_seconds=5)
    template = "{PatientID}/{SeriesNumber}/{InstanceNumber}.dcm"
    rule = f"match: {{SeriesNumber: '^1$'}}\ndestination: {lab}\npath: '{template}'\n"
    (daemon.config.rules / "lab.yaml").write_text(rule)
    daemon.rulebook.refresh()
    sources = write_study(StudySpec(series=2, instances=3), daemon.config.inbox)
    entered = snapshot(daemon.config.inbox)
    series = {str(path): headers.read_instance(path).values["SeriesNumber"] for path in sources}
    second = {path for path, number in series.items() if number == "2"}
    assert len(second) == 3
    refuse_removal(monkeypatch, second)
    why = "kept in unmatched, but cannot be removed: Permission denied"
    parked_in_two_turns(daemon, clock, caplog, why)
    assert len(list(lab.rglob("*.dcm"))) == 3
    assert {str(path) for path in sources if path.exists()} == second
    assert len(list((daemon.state / "unmatched").rglob("*"))) == 1 + 3  # its folder

    placed_once_removal_works(daemon, clock, monkeypatch, caplog)
    assert not any(path.exists() for path in sources)
    assert not list((daemon.state / "retry").iterdir())
    counts = assert_accounted(entered, [lab], daemon.state, exact=True, unique_uids=True)
    assert counts["placed"] == 3 and counts["unmatched"] == 3


def test_a_bad_file_that_cannot_leave_the_inbox_is_tried_again_later_and_once_ends(
    tmp_path, monkeypatch, caplog
):
    # A file that is not DICOM, in an inbox the daemon may not write in: its
    # quarantine fails (the copy is kept, the file stays). The daemon says so
    # once and tries again on the doubling schedule of parked studies, not
    # at every turn of its loop; `run --once` ends with status 1 instead of
    # waiting for it for ever. Once the removal works, it is quarantined.
    clock = FakeClock()
    daemon, _ = in_process_daemon(
        tmp_path, clock, quiet_seconds=1, quarantine_after_seconds=5, park_first_seconds=30
    )
    bad = daemon.config.inbox / "not-dicom.bin"
    bad.write_bytes(b"not a DICOM file\n" * 10)
    refuse_removal(monkeypatch, [bad])
    caplog.set_level(logging.DEBUG)

    daemon.tick()
    clock.now += 6
    for _ in range(20):  # four seconds of turns
        daemon.tick()
        clock.now += 0.2
    [failed] = logged(caplog, "quarantine_failed")
    assert "Permission denied" in failed and "next_try_in=30" in failed
    assert [r.levelname for r in caplog.records if r.getMessage() == failed] == ["ERROR"]
    clock.now += 30
    daemon.tick()
    [_, again] = logged(caplog, "quarantine_failed")
    assert "next_try_in=60" in again
    assert bad.exists()
    daemon._write_status()  # status says which file waits, and why
    [held] = json.loads((daemon.state / "status.json").read_text())["quarantine_failed"]
    assert held["path"] == str(bad) and held["attempts"] == 2 and held["next_try_in"] == 60
    assert "Permission denied" in held["error"] and "not a DICOM file" in held["reason"]
    config = tmp_path / "config.yaml"
    config.write_text(f"state: {daemon.state}\n", encoding="utf-8")
    human = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"{bad}  not quarantined (not a DICOM file" in human.stdout

    once = Daemon(daemon.config, once=True, stop=threading.Event())
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(once.run()))
    runner.start()
    runner.join(20)
    if runner.is_alive():
        once.stop.set()
        runner.join()
        pytest.fail("run --once waited for a file it cannot quarantine")
    assert result == [1]
    assert logged(caplog, "once_incomplete")

    monkeypatch.undo()
    clock.now += 60
    daemon.tick()
    assert not bad.exists()
    # (the two daemons' clocks put their copies under two dates)
    reasons = list((daemon.state / "quarantine").rglob("*.reason.txt"))
    assert reasons and all("not a DICOM file" in r.read_text() for r in reasons)


def test_temporaries_that_cannot_be_removed_are_told_once_not_at_every_retry(tmp_path, caplog):
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("an undeletable file needs root and chattr (e2fsprogs)")
    caplog.set_level(logging.INFO)
    config = in_process_daemon(tmp_path, FakeClock())[0].config
    folder = tmp_path / "lab" / "P1"
    folder.mkdir(parents=True)
    stuck = folder / f"{TEMP_PREFIX}a1b2c3.1.dcm"
    stuck.write_bytes(b"half")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable files")
    try:
        (config.state / "placing.json").write_text(json.dumps({"folders": [str(folder)]}))
        daemon = prepare(config)
        for _ in range(3):  # the retries of a study parked on that folder
            daemon.delivery.clean_interrupted()
            daemon.settle()
        [cleaned] = logged(caplog, "cleaned_interrupted_placement")
        assert "folders_left=1" in cleaned
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


def test_a_forked_worker_dies_on_sigterm_though_its_parent_catches_it():
    """The daemon's SIGTERM handler (its stop flag) is inherited by forked
    workers; they reset it, or a broken pool could never end them, nor their
    parent's death (PR_SET_PDEATHSIG sends SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    pool = header_pool(threads_running=False)
    try:
        assert pool.submit(os.getpid).result(timeout=60) != os.getpid()
        workers = list(pool._processes.values())  # type: ignore[attr-defined]
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(10)
        assert [w.exitcode for w in workers] == [-signal.SIGTERM] * len(workers)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
