"""`dicom-watcher sort` end to end through `watcher.cli.main`, on real files."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from support import files_under, sha256, tree

from watcher import cli, engine, headers, placement
from watcher.engine import POOL_THRESHOLD
from watcher.errors import NotRoutable
from watcher.logs import parse_pairs
from watcher.rules import single_rule
from watcher.synthetic import StudySpec, make_dataset, write_dataset, write_study
from watcher.template import MAX_COMPONENT_BYTES

pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")

SMITH_PATH = (
    "{PatientID}/{StudyDate}_{StudyDescription}/{SeriesNumber:03d}_{SeriesDescription}/"
    "{InstanceNumber:05d}.dcm"
)
PNI_PATH = (
    "{StudyDate}/{PatientName.family}/{SeriesNumber:02d}-{ProtocolName|SeriesDescription}/"
    "{SOPInstanceUID}.dcm"
)
SERIES = ["T1_MPRAGE", "rfMRI_REST", "DWI_AP", "fmap_PA"]


class Run:
    """The result of one `main([...])`: exit status, stdout, stderr log lines."""

    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    @property
    def summary(self) -> dict[str, int]:
        line = next(line for line in self.out.splitlines() if "files=" in line)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}

    def events(self, event: str) -> list[dict[str, str]]:
        records = [parse_pairs(line) for line in self.err.splitlines() if "event=" in line]
        return [record for record in records if record.get("event") == event]


@pytest.fixture
def sort(capsys):
    def run(*args: str | os.PathLike[str]) -> Run:
        status = cli.main(["sort", *map(str, args)])
        captured = capsys.readouterr()
        return Run(status, captured.out, captured.err)

    return run


def pydicom_values(path: Path) -> pydicom.Dataset:
    """pydicom's own reading of a source, to compute the names we expect."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def routable(path: Path) -> bool:
    try:
        headers.read_instance(path)
    except NotRoutable:
        return False
    return True


def components_are_safe(relative: str) -> None:
    parts = relative.split("/")
    for part in parts:
        assert part not in ("", ".", "..") and not part.startswith((".", "-")), relative
        assert len(part.encode("utf-8")) <= MAX_COMPONENT_BYTES
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in part), relative
        assert "\\" not in part


# --- (a) pydicom's corpus ----------------------------------------------------------------


def test_sorting_the_pydicom_corpus_places_every_routable_instance_once(
    tmp_path, pydicom_corpus, sort
):
    src = tmp_path / "src"
    shutil.copytree(pydicom_corpus, src)
    dest = tmp_path / "dest"
    dest.mkdir()
    sources = files_under(src)
    before = tree(src)
    good = [p for p in sources if routable(p)]
    bad = {str(p): p for p in sources if not routable(p)}
    good_hashes = Counter(sha256(p) for p in good)
    assert len(good) > 100 and len(bad) > 20

    run = sort(src, "--dest", dest)

    assert run.status == 1  # some files are not routable
    placed = files_under(dest)
    placed_hashes = Counter(sha256(p) for p in placed)
    assert set(placed_hashes) == set(good_hashes), "every routable content, nothing else"
    assert all(count == 1 for count in placed_hashes.values()), "no content placed twice"
    assert len(placed) == len(good_hashes)
    summary = run.summary
    assert summary["files"] == len(sources)
    assert summary["placed"] == len(good_hashes)
    assert summary["already_present"] == len(good) - len(good_hashes)
    assert summary["not_routable"] == len(bad)
    assert summary["unmatched"] == summary["failed"] == summary["skipped"] == 0
    assert summary["bytes"] == sum(p.stat().st_size for p in placed)
    # Every file that was not placed is reported with its reason.
    reported = {event["path"]: event["reason"] for event in run.events("not_routable")}
    assert set(reported) == set(bad)
    for path, reason in reported.items():
        with pytest.raises(NotRoutable) as error:
            headers.read_instance(path)
        assert reason == error.value.reason
    kinds = {
        m.group(2): int(m.group(1)) for m in re.finditer(r"not routable: (\d+) x (.+)", run.out)
    }
    assert sum(kinds.values()) == len(bad)
    assert {"DICOMDIR (a media directory, not an instance)", "truncated"} <= set(kinds)
    # Nothing written anywhere else, nothing changed in the sources.
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]
    assert tree(src) == before
    for path in placed:
        components_are_safe(path.relative_to(dest).as_posix())

    again = sort(src, "--dest", dest)
    assert again.summary["placed"] == 0
    assert again.summary["already_present"] == len(good)
    assert Counter(sha256(p) for p in files_under(dest)) == placed_hashes


# --- (b) two labs by rule files ----------------------------------------------------------


@pytest.fixture
def labs(tmp_path, rules_dir):
    smith = tmp_path / "nas" / "smith"
    pni = tmp_path / "nas" / "pni"
    smith.mkdir(parents=True)
    pni.mkdir(parents=True)
    rules_dir.rule("smithlab", smith, {"StudyDescription": "^SMITH"}, SMITH_PATH)
    rules_dir.rule("pni", pni, {"InstitutionName": "(?i)princeton"}, PNI_PATH)
    return smith, pni


def expected_names(sources: list[Path]) -> dict[str, dict[str, str]]:
    """lab -> relative path -> sha256, computed from pydicom's reading."""
    out: dict[str, dict[str, str]] = {"smith": {}, "pni": {}}
    for path in sources:
        ds = pydicom_values(path)
        if str(ds.StudyDescription).startswith("SMITH"):
            out["smith"][
                f"{ds.PatientID}/{ds.StudyDate}_{ds.StudyDescription}/"
                f"{int(ds.SeriesNumber):03d}_{ds.SeriesDescription}/{int(ds.InstanceNumber):05d}.dcm"
            ] = sha256(path)
        if "princeton" in str(ds.InstitutionName).lower():
            out["pni"][
                f"{ds.StudyDate}/{ds.PatientName.family_name}/{int(ds.SeriesNumber):02d}-"
                f"{ds.ProtocolName}/{ds.SOPInstanceUID}.dcm"
            ] = sha256(path)
    return out


def test_two_labs_each_get_their_copies_under_their_names(tmp_path, rules_dir, labs, sort):
    smith, pni = labs
    inbox = tmp_path / "inbox"
    both = write_study(StudySpec(patient_id="SUBJ01", series=3, instances=4), inbox)
    smith_only = write_study(
        StudySpec(
            patient_id="SUBJ02",
            description="SMITH^Vision",
            institution="Yale",
            series=2,
            instances=3,
        ),
        inbox,
    )
    pni_only = write_study(
        StudySpec(
            patient_id="PNI07",
            patient_name="Curie^Marie",
            description="JONES^Rest",
            institution="PRINCETON Neuroscience Institute",
            study_date="20261126",
            series=4,
            instances=2,
        ),
        inbox,
    )
    sources = both + smith_only + pni_only
    before = tree(inbox)
    expected = expected_names(sources)
    assert len(expected["smith"]) == 12 + 6 and len(expected["pni"]) == 12 + 8

    run = sort(inbox, "--rules", rules_dir)

    assert run.status == 0, run.out + run.err
    assert tree(smith) == expected["smith"]
    assert tree(pni) == expected["pni"]
    per_series = Counter(Path(rel).parent.as_posix() for rel in tree(smith))
    assert per_series["SUBJ01/20261125_SMITH^Memory/002_rfMRI_REST"] == 4
    assert per_series["SUBJ02/20261125_SMITH^Vision/001_T1_MPRAGE"] == 3
    assert sorted(os.listdir(pni)) == ["20261125", "20261126"]
    assert sorted(os.listdir(pni / "20261126" / "Curie")) == [
        "01-T1_MPRAGE",
        "02-rfMRI_REST",
        "03-DWI_AP",
        "04-fmap_PA",
    ]
    assert run.summary["placed"] == 38
    assert run.summary["files"] == len(sources)
    assert tree(inbox) == before, "sort copies unless --move"

    inodes = {p: p.stat().st_ino for p in files_under(smith) + files_under(pni)}
    again = sort(inbox, "--rules", rules_dir)
    assert again.status == 0
    assert again.summary["placed"] == 0
    assert again.summary["already_present"] == 38
    assert tree(smith) == expected["smith"] and tree(pni) == expected["pni"]
    assert {p: p.stat().st_ino for p in files_under(smith) + files_under(pni)} == inodes


def test_an_unmatched_instance_is_reported_and_the_sort_is_incomplete(
    tmp_path, rules_dir, labs, make_dicom, sort
):
    inbox = tmp_path / "inbox"
    make_dicom(inbox, StudyDescription="OTHER^Study", InstitutionName="MIT")
    matched = make_dicom(inbox, StudyDescription="SMITH^Memory", InstitutionName="MIT")
    run = sort(inbox, "--rules", rules_dir)
    assert run.status == 1
    assert run.summary["unmatched"] == 1 and run.summary["placed"] == 1
    smith, pni = labs
    assert [sha256(p) for p in files_under(smith)] == [sha256(matched)]
    assert files_under(pni) == []


# --- (c) --subject ---------------------------------------------------------------------


def test_subject_keeps_only_that_patient(tmp_path, sort):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    write_study(StudySpec(patient_id="SUBJ01", series=2, instances=3), inbox)
    wanted = write_study(StudySpec(patient_id="SUBJ02", series=2, instances=2), inbox)
    write_study(StudySpec(patient_id="SUBJ022", series=1, instances=2), inbox)  # not a prefix match

    run = sort(inbox, "--dest", dest, "--subject", "SUBJ02")

    assert run.status == 0
    assert os.listdir(dest) == ["SUBJ02"]
    assert sorted(tree(dest).values()) == sorted(sha256(p) for p in wanted)
    assert run.summary["placed"] == 4 and run.summary["skipped"] == 8


# --- (d) --move ---------------------------------------------------------------------------


def test_move_places_identical_bytes_then_removes_the_sources(tmp_path, sort):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=2, instances=3), inbox)
    hashes = sorted(sha256(p) for p in sources)

    run = sort(inbox, "--dest", dest, "--move")

    assert run.status == 0
    assert files_under(inbox) == []
    assert sorted(tree(dest).values()) == hashes
    assert all(p.stat().st_nlink == 1 for p in files_under(dest))


def test_move_flushes_each_source_folder_once_its_files_are_removed(tmp_path, sort, monkeypatch):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=1, instances=2), inbox / "a")
    sources += write_study(StudySpec(series=1, instances=2), inbox / "b")
    flushed: list[tuple[str, int]] = []  # (what was flushed, its sources left then)
    fsync = os.fsync

    def recording(fd: int) -> None:
        folder = os.readlink(f"/proc/self/fd/{fd}")
        flushed.append((folder, sum(p.exists() for p in sources if str(p.parent) == folder)))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    run = sort(inbox, "--dest", dest, "--move")

    assert run.status == 0
    source_folders = sorted(
        (folder, left) for folder, left in flushed if folder.startswith(str(inbox))
    )
    assert source_folders == [(str(inbox / "a"), 0), (str(inbox / "b"), 0)]


#: `dicom-watcher sort`, noting in the file $SORTED_BY the process id of each
#: process that sorts a share of the files (worker processes are forked).
SORT_NOTING_PROCESSES = """
import os, sys
from watcher import cli, engine
sort_here = engine.Sorter._sort_here
def noting(self, paths, progress=None):
    with open(os.environ["SORTED_BY"], "a") as note:
        note.write(f"{os.getpid()}\\n")
    return sort_here(self, paths, progress)
engine.Sorter._sort_here = noting
sys.exit(cli.main(["sort", *sys.argv[1:]]))
"""


def sort_noting_processes(
    tmp_path: Path, *args: str | os.PathLike[str], **options: object
) -> tuple[subprocess.CompletedProcess[str], set[int], int]:
    """Run a sort in a new process: (its result, the ids of the processes
    that sorted, its own id)."""
    note = tmp_path / "sorted-by"
    done = subprocess.Popen(
        [sys.executable, "-c", SORT_NOTING_PROCESSES, *map(str, args)],
        env={**os.environ, "SORTED_BY": str(note)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )
    out, err = done.communicate(timeout=120)
    pids = {int(line) for line in note.read_text().split()} if note.exists() else set()
    return subprocess.CompletedProcess(done.args, done.returncode, out, err), pids, done.pid


@pytest.mark.parametrize("extra", [[], ["--move"]], ids=["copy", "move"])
def test_a_sort_large_enough_for_the_workers_places_every_file(tmp_path, extra):
    # Above POOL_THRESHOLD files the batches are sorted in worker processes,
    # each file read and copied (or linked) from one held descriptor.
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=3, instances=(POOL_THRESHOLD + 30) // 3), inbox)
    hashes = sorted(sha256(p) for p in sources)

    done, sorted_by, main = sort_noting_processes(tmp_path, inbox, "--dest", dest, *extra)

    assert done.returncode == 0, done.stderr
    assert f"placed={len(sources)} " in done.stdout
    assert sorted_by and main not in sorted_by, "the workers sorted it all"
    assert sorted(tree(dest).values()) == hashes
    assert len(files_under(inbox)) == (0 if extra else len(sources))


def in_batches_of_eight(tmp_path: Path, monkeypatch, series: int) -> tuple[Path, Path, list[Path]]:
    """(an inbox of 24 files, an empty destination, the files), sorted in
    batches of 8 files."""
    monkeypatch.setattr(engine, "BATCH", 8)
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    return inbox, dest, write_study(StudySpec(series=series, instances=24 // series), inbox)


def test_the_next_batch_is_written_while_the_one_before_is_flushed(tmp_path, sort, monkeypatch):
    # The first batch's data flush waits until the next batch's bytes are
    # being written: done one after the other, nothing is written meanwhile.
    inbox, dest, sources = in_batches_of_eight(tmp_path, monkeypatch, series=2)
    flushing, written_meanwhile = threading.Event(), threading.Event()
    flush_data, write = placement._flush_data, placement._Batch.write
    waited: list[bool] = []  # whether the first flush saw a write begin

    def first_flush_waits(items: list) -> None:
        if not flushing.is_set():
            flushing.set()
            waited.append(written_meanwhile.wait(timeout=10))
        flush_data(items)

    def noting_write(self: placement._Batch, job: placement.Job):
        if flushing.is_set():
            written_meanwhile.set()
        return write(self, job)

    monkeypatch.setattr(placement, "_flush_data", first_flush_waits)
    monkeypatch.setattr(placement._Batch, "write", noting_write)
    run = sort(inbox, "--dest", dest)

    assert run.status == 0, run.err
    assert waited == [True], "the second batch waited for the first one's flush"
    assert sorted(tree(dest).values()) == sorted(sha256(p) for p in sources)


def test_a_sort_names_its_files_in_its_own_thread_and_leaves_the_flushes_to_the_other(
    tmp_path, sort, monkeypatch
):
    # A thread naming files while the sorting thread writes the next ones
    # makes both wait for the interpreter's lock at every file: the other
    # thread only waits for the data flushes, the sorting thread names.
    inbox, dest, sources = in_batches_of_eight(tmp_path, monkeypatch, series=2)
    threads: dict[str, set[str]] = {"flush": set(), "name": set()}
    flush_data, name = placement._flush_data, placement._Batch.name

    def noting_flush(items: list) -> None:
        threads["flush"].add(threading.current_thread().name)
        flush_data(items)

    def noting_name(self: placement._Batch, index: int, item):  # type: ignore[no-untyped-def]
        threads["name"].add(threading.current_thread().name)
        return name(self, index, item)

    monkeypatch.setattr(placement, "_flush_data", noting_flush)
    monkeypatch.setattr(placement._Batch, "name", noting_name)
    run = sort(inbox, "--dest", dest)

    assert run.status == 0, run.err
    here = threading.current_thread().name
    assert threads["name"] == {here}
    assert threads["flush"] and here not in threads["flush"]
    assert sorted(tree(dest).values()) == sorted(sha256(p) for p in sources)


@pytest.mark.parametrize("failing", ["reading", "counting"])
def test_a_sort_stopped_by_an_error_places_what_it_began_and_leaves_nothing_open(
    tmp_path, monkeypatch, failing
):
    # An error (a bug, an interrupt) while the next batch is read, or while
    # the first is counted: the batches begun (read, written, handed to the
    # flushing thread) are waited for and placed whole, nothing is left
    # half-written, and no file stays open.
    inbox, dest, sources = in_batches_of_eight(tmp_path, monkeypatch, series=1)
    hashes = {sha256(p) for p in sources}
    sorter = engine.Sorter(single_rule(dest, "{SOPInstanceUID}.dcm"))
    calls = Counter[str]()

    def fail_at(name: str, when: int, method):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            if calls[name] == when:
                raise RuntimeError(f"{name} failed")
            return method(*args, **kwargs)

        return wrapped

    if failing == "reading":  # the third batch's first file: two are begun
        monkeypatch.setattr(sorter, "_route", fail_at("route", 17, sorter._route))
    else:  # the first batch's first outcome: all three are begun
        monkeypatch.setattr(sorter, "_count", fail_at("count", 1, sorter._count))
    open_before = len(os.listdir("/proc/self/fd"))

    with pytest.raises(RuntimeError, match="failed"):
        sorter.sort_files([str(p) for p in sources])

    assert len(os.listdir("/proc/self/fd")) == open_before
    placed = tree(dest)
    assert not [name for name in placed if name.startswith(".")], placed  # no temporary names
    assert set(placed.values()) <= hashes
    assert len(placed) == (16 if failing == "reading" else 24)


def test_a_disk_full_while_one_batch_is_flushed_fails_that_batch_alone(tmp_path, sort, monkeypatch):
    # The destination's disk is full when the first batch's bytes are
    # flushed, while the next batch is being written: the first batch's
    # files are reported failed, nothing of them is named, their sources
    # stay, and the batches after it are placed.
    inbox, dest, sources = in_batches_of_eight(tmp_path, monkeypatch, series=1)
    flush_data, flushes = placement._flush_data, Counter[str]()

    def full_once(items: list) -> None:
        flushes["data"] += 1
        if flushes["data"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        flush_data(items)

    monkeypatch.setattr(placement, "_flush_data", full_once)
    run = sort(inbox, "--dest", dest, "--path", "{SOPInstanceUID}.dcm")

    assert run.status == 1
    assert run.summary["placed"] == 16 and run.summary["failed"] == 8, run.out
    placed = tree(dest)
    assert len(placed) == 16 and not [name for name in placed if name.startswith(".")]
    assert set(placed.values()) < {sha256(p) for p in sources}
    assert all(p.exists() for p in sources)
    failed = [line.split(": ")[1] for line in run.out.splitlines() if line.startswith("  failed: ")]
    assert sorted(failed) == sorted(str(p) for p in sources)[:8]  # the first batch, whole
    assert not {sha256(Path(path)) for path in failed} & set(placed.values())


def test_a_sort_under_a_low_open_file_limit_places_every_file(tmp_path):
    # With 64 descriptors (soft and hard), batches are small and none is
    # written ahead: every file placed, in the worker processes too.
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=2, instances=(POOL_THRESHOLD + 40) // 2), inbox)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    done, sorted_by, main = sort_noting_processes(
        tmp_path, inbox, "--dest", dest, preexec_fn=low_limit
    )

    assert done.returncode == 0, done.stderr
    assert f"placed={len(sources)} " in done.stdout
    assert sorted_by and main not in sorted_by, "the workers sorted it all"
    assert sorted(tree(dest).values()) == sorted(sha256(p) for p in sources)


def test_a_sort_is_shared_out_evenly_among_the_workers_in_whole_runs_of_files():
    for count, workers, sizes in [
        (6_000, 2, [3_000, 3_000]),
        (20_000, 2, [5_000] * 4),
        (300, 2, [150, 150]),
        (1, 2, [1]),
        (5, 8, [1] * 5),
    ]:
        paths = [f"f{n}" for n in range(count)]
        shares = engine._shares(paths, workers)
        assert [len(share) for share in shares] == sizes
        assert [path for share in shares for path in share] == paths
        assert max(sizes) <= engine.SHARE_BATCHES * engine.BATCH


def test_move_keeps_a_source_until_every_copy_is_placed(tmp_path, rules_dir, make_dicom, sort):
    smith = tmp_path / "nas" / "smith"
    smith.mkdir(parents=True)
    later = tmp_path / "nas" / "later"  # not mounted yet
    # Named so that the available lab comes first in every order (file, name).
    rules_dir.rule("a-smith", smith, {"StudyDescription": "^SMITH"})
    rules_dir.rule("b-later", later, {"StudyDescription": "^SMITH"})
    inbox = tmp_path / "inbox"
    sources = [make_dicom(inbox, InstanceNumber=n) for n in (1, 2)]
    junk = inbox / "notes.txt"
    junk.write_text("not DICOM")
    before = tree(inbox)

    run = sort(inbox, "--rules", rules_dir, "--move")

    assert run.status == 1
    assert run.summary["failed"] == 2
    assert tree(inbox) == before, "no source leaves before all its copies are placed"
    assert sorted(tree(smith).values()) == sorted(sha256(p) for p in sources)
    assert not later.exists()

    later.mkdir()
    hashes = sorted(before[p.name] for p in sources)
    run = sort(inbox, "--rules", rules_dir, "--move")
    assert run.status == 1  # notes.txt is still not DICOM
    assert run.summary["already_present"] == 2 and run.summary["placed"] == 2
    assert [p.name for p in files_under(inbox)] == ["notes.txt"]
    assert sorted(tree(smith).values()) == hashes
    assert sorted(tree(later).values()) == hashes


# --- (e) --dry-run --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--move"]], ids=["copy", "move"])
def test_dry_run_writes_nothing(tmp_path, rules_dir, labs, sort, extra):
    inbox = tmp_path / "inbox"
    sources = write_study(StudySpec(series=2, instances=2), inbox)
    everything = tree(tmp_path)

    run = sort(inbox, "--rules", rules_dir, "--dry-run", *extra)

    assert run.status == 0
    assert tree(tmp_path) == everything
    assert sorted(Path(p).name for p in os.listdir(tmp_path / "nas")) == ["pni", "smith"]
    assert os.listdir(labs[0]) == [] and os.listdir(labs[1]) == []
    targets = [line for line in run.out.splitlines() if " -> " in line]
    assert len(targets) == 2 * len(sources)
    assert all(str(labs[0]) in line or str(labs[1]) in line for line in targets)
    assert "nothing written" in run.out


# --- (f) hostile header values -----------------------------------------------------------

HOSTILE = {
    "dotdot": {"PatientID": "../../x", "SeriesDescription": ".."},
    "absolute": {"PatientID": "/abs", "StudyDescription": "/etc/passwd"},
    "nul": {"PatientID": "a\x00b", "SeriesDescription": "x\x00y"},
    "backslash": {"PatientID": "A\\B", "SeriesDescription": "T1\\T2"},
    "control": {"PatientID": "\x1b[31mred\x07", "SeriesDescription": "tab\there\nnl"},
    "long": {"StudyDescription": "Resting state functional MRI " * 10 + "x" * 10},
    "device": {"PatientID": "CON", "SeriesDescription": "aux", "StudyDescription": "LPT1."},
    "japanese": {"PatientName": "山田^太郎", "PatientID": "山田太郎", "StudyDescription": "脳MRI"},
    "dots": {"PatientID": ".", "StudyDescription": "...", "SeriesDescription": ".hidden"},
    "empty": {"PatientID": "", "StudyDescription": None, "SeriesNumber": None},
}


def test_hostile_values_land_inside_the_destination(tmp_path, make_dicom, sort):
    inbox = tmp_path / "inbox"
    for name, tags in HOSTILE.items():
        make_dicom(inbox, name=f"{name}.dcm", **tags)
    assert len(HOSTILE["long"]["StudyDescription"]) == 300
    template = (
        "{PatientID}/{PatientName}/{StudyDate}_{StudyDescription}/"
        "{SeriesNumber:03d}_{SeriesDescription}/{InstanceNumber:05d}.dcm"
    )
    results = []
    for run_name in ("dest1", "dest2"):
        dest = tmp_path / run_name
        dest.mkdir()
        run = sort(inbox, "--dest", dest, "--path", template)
        assert run.status == 0, run.out + run.err
        assert run.summary["placed"] == len(HOSTILE)
        placed = tree(dest)
        assert len(placed) == len(HOSTILE)
        for relative in placed:
            components_are_safe(relative)
            assert len(relative.split("/")) == 5
            resolved = (dest / relative).resolve()
            assert resolved.is_relative_to(dest.resolve())
        results.append(placed)
    assert results[0] == results[1], "the same names on every run"
    assert sorted(os.listdir(tmp_path)) == ["dest1", "dest2", "inbox"]
    names = set(results[0])
    assert "_._.._x/Doe^Jane/20261125_SMITH^Memory/001_/00001.dcm" in names
    assert "_abs/Doe^Jane/20261125__etc_passwd/001_T1_MPRAGE/00001.dcm" in names
    assert "a_b/Doe^Jane/20261125_SMITH^Memory/001_x_y/00001.dcm" in names
    assert "A_B/Doe^Jane/20261125_SMITH^Memory/001_T1_T2/00001.dcm" in names
    assert "_[31mred_/Doe^Jane/20261125_SMITH^Memory/001_tab_here_nl/00001.dcm" in names
    assert "_CON/Doe^Jane/20261125_LPT1/001_aux/00001.dcm" in names
    assert "_/Doe^Jane/20261125_/001_.hidden/00001.dcm" in names
    assert "山田太郎/山田^太郎/20261125_脳MRI/001_T1_MPRAGE/00001.dcm" in names
    assert "unknown/Doe^Jane/20261125_unknown/unknown_T1_MPRAGE/00001.dcm" in names

    again = sort(inbox, "--dest", tmp_path / "dest1", "--path", template)
    assert again.summary["already_present"] == len(HOSTILE) and again.summary["placed"] == 0
    assert tree(tmp_path / "dest1") == results[0]


# --- (g) a destination that does not exist ------------------------------------------------


def test_a_missing_destination_fails_creates_nothing_and_keeps_the_source(
    tmp_path, rules_dir, make_dicom, sort
):
    nas = tmp_path / "nas"
    nas.mkdir()
    rules_dir.rule("smithlab", nas / "smith", {"StudyDescription": "^SMITH"})
    inbox = tmp_path / "inbox"
    make_dicom(inbox)
    make_dicom(inbox, InstanceNumber=2)
    everything = tree(tmp_path)
    folders = sorted(str(p) for p in tmp_path.rglob("*") if p.is_dir())

    for extra in ([], ["--move"]):
        run = sort(inbox, "--rules", rules_dir, *extra)
        assert run.status == 1
        assert run.summary["failed"] == 2 and run.summary["placed"] == 0
        assert "unavailable" in run.out
        assert tree(tmp_path) == everything
        assert sorted(str(p) for p in tmp_path.rglob("*") if p.is_dir()) == folders
        assert os.listdir(nas) == []


# --- (h) names taken by other instances ---------------------------------------------------


def test_instances_with_the_same_name_get_distinct_deterministic_suffixes(
    tmp_path, make_dicom, sort
):
    inbox = tmp_path / "inbox"
    sources = [
        make_dicom(inbox, name=f"{n}.dcm", SeriesNumber=1, InstanceNumber=1)
        for n in ("a", "b", "c")
    ]
    template = "{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm"
    trees = []
    for dest_name in ("dest1", "dest2"):
        dest = tmp_path / dest_name
        dest.mkdir()
        run = sort(inbox, "--dest", dest, "--path", template)
        assert run.status == 0
        assert run.summary["placed"] == 3
        trees.append(tree(dest))
    assert trees[0] == trees[1]
    assert trees[0] == {
        "SUBJ01/001/00001.dcm": sha256(sources[0]),
        f"SUBJ01/001/00001~{sha256(sources[1])[:12]}.dcm": sha256(sources[1]),
        f"SUBJ01/001/00001~{sha256(sources[2])[:12]}.dcm": sha256(sources[2]),
    }
    again = sort(inbox, "--dest", tmp_path / "dest1", "--path", template)
    assert again.summary["already_present"] == 3
    assert tree(tmp_path / "dest1") == trees[0]


def test_the_same_uid_with_other_bytes_is_kept_beside_with_a_warning(tmp_path, sort):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    uid = "1.2.826.0.1.3680043.10.1389.42"
    first = write_dataset(
        make_dataset(SOPInstanceUID=uid, SeriesDescription="first"), inbox / "1.dcm"
    )
    second = write_dataset(
        make_dataset(SOPInstanceUID=uid, SeriesDescription="resent"), inbox / "2.dcm"
    )
    assert sha256(first) != sha256(second)

    run = sort(inbox, "--dest", dest, "--path", "{PatientID}/{SOPInstanceUID}.dcm")

    assert run.status == 0
    assert tree(dest) == {
        f"SUBJ01/{uid}.dcm": sha256(first),
        f"SUBJ01/{uid}~{sha256(second)[:12]}.dcm": sha256(second),
    }
    [warning] = run.events("same_uid_other_bytes")
    assert warning["sop"] == uid
    assert warning["kept_beside"] == str(dest / "SUBJ01" / f"{uid}.dcm")
    assert "level=WARNING" in next(line for line in run.err.splitlines() if "same_uid" in line)


def test_a_different_instance_under_a_taken_name_is_not_a_uid_warning(tmp_path, make_dicom, sort):
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    make_dicom(inbox, name="a.dcm")
    make_dicom(inbox, name="b.dcm")
    run = sort(inbox, "--dest", dest, "--path", "{PatientID}.dcm")
    assert run.status == 0
    assert run.events("same_uid_other_bytes") == []
    assert len(run.events("name_taken")) == 1
    assert len(files_under(dest)) == 2


# --- the program's exit -----------------------------------------------------------------


def test_the_program_ends_with_its_output_whole_and_its_status(tmp_path):
    # `dicom-watcher` (cli.run) ends without tearing the interpreter down:
    # what it printed and logged must all be out, and its status kept.
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=3, instances=40), inbox)
    (inbox / "notes.txt").write_text("not DICOM\n")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "sort", str(inbox), "--dest", str(dest), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=buffered,
    )
    assert done.returncode == 1, done.stderr[-2000:]  # the text file is not routable
    targets = [line for line in done.stdout.splitlines() if " -> " in line]
    assert len(targets) == len(sources) and len(done.stdout) > 8192  # more than one buffer
    assert "nothing written" in done.stdout
    assert "notes.txt" in done.stderr


def test_the_program_waits_for_a_thread_that_still_runs(tmp_path, rules_dir):
    # With a thread still at work the usual exit is taken, which waits for it.
    marker = tmp_path / "thread-finished"
    (tmp_path / "lab").mkdir()
    rules_dir.rule("smith", tmp_path / "lab")
    script = (
        "import sys, threading, time\n"
        "from watcher import cli\n"
        "def work():\n"
        "    time.sleep(0.5)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "threading.Thread(target=work).start()\n"
        f"cli.run(['check', '--rules', {str(rules_dir.path)!r}])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists()


def test_sort_with_a_destination_reads_no_yaml_and_does_not_import_it(tmp_path):
    # `sort --dest` has no rule file or config to read: the YAML parser,
    # about a sixth of the program's start-up, is not imported at all.
    inbox, dest = tmp_path / "inbox", tmp_path / "dest"
    dest.mkdir()
    sources = write_study(StudySpec(series=1, instances=3), inbox)
    script = (
        "import sys\n"
        "from watcher import cli\n"
        f"code = cli.main(['sort', {str(inbox)!r}, '--dest', {str(dest)!r}])\n"
        "print('yaml imported:', 'yaml' in sys.modules, 'status:', code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "yaml imported: False status: 0" in done.stdout
    assert sorted(tree(dest).values()) == sorted(sha256(p) for p in sources)
