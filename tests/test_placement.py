"""Durable placement into real folders under tmp_path."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import skip_or_fail
from support import files_under, sha256, tree

from watcher import placement
from watcher.errors import DestinationUnavailable
from watcher.placement import (
    TEMP_PREFIX,
    Folder,
    PathConflict,
    place,
    remove_temporaries,
)
from watcher.placement import temporaries as temporaries_in
from watcher.template import MAX_COMPONENT_BYTES

RELATIVE = "SUBJ01/20261125_SMITH^Memory/001_T1_MPRAGE/00001.dcm"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "nas" / "smithlab"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def source(make_dicom, tmp_path: Path) -> Path:
    return make_dicom(tmp_path / "inbox", name="first.dcm", PatientID="SUBJ01")


@pytest.fixture
def other(make_dicom, tmp_path: Path) -> Path:
    return make_dicom(tmp_path / "inbox", name="second.dcm", PatientID="SUBJ01")


def temporaries(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if p.name.startswith(TEMP_PREFIX)]


def test_placed_bytes_are_identical(root, source):
    result = place(str(source), root, RELATIVE)
    target = root / RELATIVE
    assert result.outcome == "placed"
    assert result.path == target
    assert result.size == source.stat().st_size
    assert result.beside is None
    assert target.read_bytes() == source.read_bytes()
    assert source.exists(), "place copies; the caller decides about the source"
    assert list(tree(root)) == [RELATIVE]
    assert temporaries(root) == []


def test_a_file_larger_than_one_chunk_is_copied_whole(root, tmp_path):
    big = tmp_path / "big.dcm"
    big.write_bytes(os.urandom(placement.CHUNK * 2 + 12345))
    place(str(big), root, "a/b.dcm")
    assert sha256(root / "a" / "b.dcm") == sha256(big)


def test_the_same_bytes_again_are_present_and_nothing_is_written(root, source, tmp_path):
    place(str(source), root, RELATIVE)
    before = tree(root)
    inode = (root / RELATIVE).stat().st_ino
    copy = tmp_path / "copy.dcm"  # another file, same bytes
    copy.write_bytes(source.read_bytes())
    for again in (source, copy):
        result = place(str(again), root, RELATIVE)
        assert result.outcome == "present"
        assert result.path == root / RELATIVE
    assert tree(root) == before
    assert (root / RELATIVE).stat().st_ino == inode


def test_other_bytes_at_the_same_name_go_beside_under_their_hash(root, source, other):
    first = place(str(source), root, RELATIVE)
    second = place(str(other), root, RELATIVE)
    digest = sha256(other)
    assert second.outcome == "placed"
    assert second.beside == root / RELATIVE
    assert second.path == root / RELATIVE.replace("00001.dcm", f"00001~{digest[:12]}.dcm")
    assert second.path.read_bytes() == other.read_bytes()
    assert first.path.read_bytes() == source.read_bytes(), "the first file is never replaced"
    # Placing the second file again finds it beside the first.
    again = place(str(other), root, RELATIVE)
    assert (again.outcome, again.path) == ("present", second.path)
    assert len(files_under(root)) == 2


def test_a_long_name_holding_other_bytes_goes_beside_within_the_byte_limit(root, source, other):
    name = "é" * 125 + ".dcm"  # 129 characters, 254 bytes: the suffix must cut bytes
    place(str(source), root, name)
    second = place(str(other), root, name)
    assert (second.outcome, second.beside) == ("placed", root / name)
    assert len(second.name.encode()) <= MAX_COMPONENT_BYTES
    assert second.name.endswith(f"~{sha256(other)[:12]}.dcm")
    assert second.path.read_bytes() == other.read_bytes()


def test_the_suffix_is_the_same_on_every_run(tmp_path, source, other, make_dicom):
    third = make_dicom(tmp_path / "inbox", name="third.dcm")
    names = []
    for run in ("run1", "run2"):
        lab = tmp_path / run
        lab.mkdir()
        for path in (source, other, third):
            place(str(path), lab, RELATIVE)
        names.append(tree(lab))
    assert names[0] == names[1]
    assert len(names[0]) == 3
    assert set(names[0].values()) == {sha256(source), sha256(other), sha256(third)}


def test_a_missing_root_raises_and_creates_nothing(tmp_path, source):
    parent = tmp_path / "nas"
    parent.mkdir()
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(parent))
    with pytest.raises(DestinationUnavailable) as error:
        place(str(source), parent / "unmounted", RELATIVE)
    assert "does not exist" in error.value.reason
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(parent))) == before
    assert not (parent / "unmounted").exists()


def test_a_root_that_is_a_file_is_unavailable(tmp_path, source):
    not_a_folder = tmp_path / "lab"
    not_a_folder.write_text("oops")
    with pytest.raises(DestinationUnavailable):
        place(str(source), not_a_folder, RELATIVE)
    assert not_a_folder.read_text() == "oops"


def test_a_symlinked_folder_inside_the_lab_is_never_followed(tmp_path, root, source):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "SUBJ01").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathConflict):
        place(str(source), root, RELATIVE)
    assert os.listdir(outside) == []
    assert temporaries(root) == []


def test_a_symlinked_file_inside_the_lab_is_never_followed(tmp_path, root, source):
    outside = tmp_path / "outside"
    outside.mkdir()
    decoy = outside / "00001.dcm"
    decoy.write_bytes(source.read_bytes())  # same bytes: following it would say "present"
    folder = root / "P"
    folder.mkdir()
    (folder / "00001.dcm").symlink_to(decoy)
    result = place(str(source), root, "P/00001.dcm")
    assert result.outcome == "placed"
    assert not result.path.is_symlink()
    assert result.path.read_bytes() == source.read_bytes()
    assert (folder / "00001.dcm").is_symlink() and os.readlink(folder / "00001.dcm") == str(decoy)
    assert os.listdir(outside) == ["00001.dcm"]


def test_a_symlink_whose_length_equals_the_file_size_is_not_opened(tmp_path, root, source):
    """A symbolic link's own size is the length of its target: a link whose
    target text is as long as the file must not be taken for a file to compare."""
    size = source.stat().st_size
    prefix = str(tmp_path / "outside") + "/"
    target = prefix + "x" * (size - len(prefix))
    (root / "P").mkdir()
    (root / "P" / "00001.dcm").symlink_to(target)
    assert os.lstat(root / "P" / "00001.dcm").st_size == size
    result = place(str(source), root, "P/00001.dcm")
    assert result.outcome == "placed"
    assert result.path.name.startswith("00001~")
    assert result.path.read_bytes() == source.read_bytes()
    assert not (tmp_path / "outside").exists()


def test_a_dangling_symlink_is_not_written_through(tmp_path, root, source):
    target = tmp_path / "outside" / "written.dcm"
    (root / "P").mkdir()
    (root / "P" / "00001.dcm").symlink_to(target)
    result = place(str(source), root, "P/00001.dcm")
    assert result.outcome == "placed" and result.path != root / "P" / "00001.dcm"
    assert not target.exists() and not target.parent.exists()


def test_a_file_where_a_folder_is_needed_is_a_conflict(root, source):
    (root / "SUBJ01").write_text("a file, not a folder")
    before = tree(root)
    with pytest.raises(PathConflict):
        place(str(source), root, RELATIVE)
    assert tree(root) == before
    assert temporaries(root) == []


def test_no_temporary_file_remains_after_a_failed_write(tmp_path, root):
    """A write that fails halfway (file size limit: EFBIG, even for root)
    leaves neither a temporary file nor a final one."""
    source = tmp_path / "big.dcm"
    source.write_bytes(os.urandom(200_000))
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from watcher.placement import place
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        try:
            place({str(source)!r}, Path({str(root)!r}), "P/S/big.dcm")
        except OSError as error:
            print("failed", error.errno)
            sys.exit(3)
        print("placed")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("failed")
    assert (root / "P" / "S").is_dir()
    assert files_under(root) == []
    assert source.stat().st_size == 200_000


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only folders; see the EFBIG test above"
)
def test_a_read_only_lab_folder_is_unavailable_and_keeps_nothing(root, source):
    folder = root / "SUBJ01"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(DestinationUnavailable):
            place(str(source), root, "SUBJ01/00001.dcm")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_remove_temporaries_removes_only_leftover_temporary_files(root):
    folder = root / "P"
    folder.mkdir()
    leftovers = [folder / f"{TEMP_PREFIX}abc123.00001.dcm", folder / f"{TEMP_PREFIX}x"]
    for path in leftovers:
        path.write_bytes(b"half written")
    keep = folder / "00001.dcm"
    keep.write_bytes(b"placed")
    (folder / f"{TEMP_PREFIX}a-folder").mkdir()
    (folder / f"{TEMP_PREFIX}link").symlink_to(keep)
    fd = Folder(root, ("P",)).open()
    try:
        assert sorted(temporaries_in(fd)) == sorted(path.name for path in leftovers)
        assert remove_temporaries(fd) == 2
        assert remove_temporaries(fd) == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(folder)) == sorted(
        ["00001.dcm", f"{TEMP_PREFIX}a-folder", f"{TEMP_PREFIX}link"]
    )
    assert keep.read_bytes() == b"placed"


def test_a_folder_is_reached_without_following_a_link_below_its_root(root):
    (root / "real" / "P").mkdir(parents=True)
    (root / "link").symlink_to(root / "real")
    os.close(Folder(root, ("real", "P")).open())
    with pytest.raises(OSError) as raised:
        Folder(root, ("link", "P")).open()
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(DestinationUnavailable):
        Folder(root / "link", ("P",), root, ("link",)).open()


def test_link_on_one_filesystem_gives_identical_bytes(root, source):
    content = source.read_bytes()
    result = place(str(source), root, RELATIVE, link=True)
    assert result.outcome == "placed"
    assert result.path.read_bytes() == content
    assert source.read_bytes() == content
    assert result.path.stat().st_ino == source.stat().st_ino  # a hard link, no copy
    assert source.stat().st_nlink == 2, "the temporary name is gone"
    assert temporaries(root) == []
    again = place(str(source), root, RELATIVE, link=True)
    assert again.outcome == "present"


def test_names_at_the_length_limit_are_placed(root, source):
    name = "é" * 120 + ".dcm"  # 244 bytes
    result = place(str(source), root, f"{'山' * 80}/{name}")
    assert result.path.read_bytes() == source.read_bytes()
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == sha256(source)


def test_a_known_digest_is_used_only_while_the_source_is_unchanged(root, source):
    """The daemon hashes a file when it reads it; placement trusts that hash
    only while the file's size and modification time are still the same."""
    status = source.stat()
    stale = "0" * 64
    job = placement.Job(
        str(source),
        root,
        "a/1.dcm",
        digest=True,
        known_sha256=stale,
        known_as_of=(status.st_size, status.st_mtime_ns),
    )
    [result] = placement.place_batch([job])
    assert isinstance(result, placement.Placement) and result.sha256 == stale
    source.write_bytes(source.read_bytes()[::-1])  # same size, other bytes
    # (a rewrite moves the mtime on; set it, as a coarse clock may not have ticked)
    os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))
    [again] = placement.place_batch([dataclasses.replace(job, relative="b/1.dcm")])
    assert isinstance(again, placement.Placement)
    assert again.sha256 == sha256(source) == sha256(root / "b" / "1.dcm")


@pytest.fixture(params=["unnamed files", "temporary names"])
def write_mode(request, monkeypatch):
    """Both ways of holding bytes before they are named: O_TMPFILE, and the
    temporary names used where a filesystem has no O_TMPFILE (SMB, NFS)."""
    if request.param == "temporary names":
        monkeypatch.setattr(placement, "_PROC_FD", False)
    return request.param


@pytest.fixture(params=["copy_file_range", "sendfile", "read and write"])
def copy_method(request, monkeypatch):
    """Each way of copying, as when a kernel or filesystem refuses the others."""
    methods = dict.fromkeys(placement._COPY_METHODS, False)
    if request.param in methods:
        methods[request.param] = True
    monkeypatch.setattr(placement, "_COPY_METHODS", methods)
    return request.param


def test_a_batch_places_every_file_whole_in_every_mode(
    tmp_path, root, write_mode, copy_method, make_dicom, monkeypatch
):
    # Placement falls back quietly where a way is refused: the test checks
    # that the way it names is the one that wrote.
    made: list[tuple[int, str | None]] = []
    real_new_file = placement._new_file

    def new_file(*args: object) -> tuple[int, str | None]:
        made.append(real_new_file(*args))
        return made[-1]

    monkeypatch.setattr(placement, "_new_file", new_file)
    sources = [
        make_dicom(tmp_path / "inbox", name=f"{n}.dcm", InstanceNumber=n) for n in range(1, 41)
    ]
    big = tmp_path / "inbox" / "big.dcm"
    big.write_bytes(os.urandom(placement.CHUNK * 2 + 7))
    sources.append(big)
    jobs = [placement.Job(str(s), root, f"S{n % 3}/{s.name}") for n, s in enumerate(sources)]
    results = placement.place_batch(jobs)
    assert all(isinstance(r, placement.Placement) and r.outcome == "placed" for r in results)
    for job, result in zip(jobs, results, strict=True):
        assert sha256(result.path) == sha256(Path(job.source))
        assert result.size == Path(job.source).stat().st_size
    assert temporaries(root) == []
    assert len(files_under(root)) == len(sources)
    if write_mode == "unnamed files" and root.stat().st_dev in placement._NO_TMPFILE:
        skip_or_fail(f"the filesystem of {root} has no O_TMPFILE")
    assert len(made) == len(sources)
    assert {temporary is None for _, temporary in made} == {write_mode == "unnamed files"}
    if copy_method in placement._COPY_METHODS:
        assert placement._COPY_METHODS[copy_method], f"{copy_method} was refused: another copied"


@pytest.mark.parametrize("digest", [False, True])
def test_a_held_source_descriptor_is_copied_from_its_start_and_left_open(
    tmp_path, root, copy_method, digest
):
    # `sort` reads a header and copies the file from one descriptor: wherever
    # its position was left, the whole file is copied, and it stays open.
    source = tmp_path / "big.dcm"
    source.write_bytes(os.urandom(placement.CHUNK * 2 + 7))
    fd = os.open(source, os.O_RDONLY)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        job = placement.Job(str(source), root, "a/1.dcm", digest=digest, source_fd=fd)
        [placed] = placement.place_batch([job])
        assert isinstance(placed, placement.Placement)
        assert sha256(placed.path) == sha256(source)
        assert placed.sha256 == (sha256(source) if digest else "")
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1000, "nor is its position moved"
    finally:
        os.close(fd)  # raises EBADF if placement closed it


def test_a_held_source_descriptor_is_linked_and_left_open(tmp_path, root, source):
    fd = os.open(source, os.O_RDONLY)
    try:
        job = placement.Job(str(source), root, "a/1.dcm", link=True, source_fd=fd)
        [placed] = placement.place_batch([job])
        assert isinstance(placed, placement.Placement)
        assert os.path.samefile(placed.path, source)
    finally:
        os.close(fd)


@pytest.mark.skipif(placement._SYNCFS is None, reason="syncfs(2) is Linux-only")
def test_linked_sources_are_made_durable_by_one_syncfs_after_their_links(
    tmp_path, root, monkeypatch, make_dicom
):
    """A source linked into the lab adds no bytes, but its writer may not
    have flushed them: they are made durable with the new names by one
    syncfs after the links (not flushed before them, and not left to an
    fsync of the folder alone), so that the caller can then remove the
    source. A name found already linked to the source counts the same."""
    sources = [make_dicom(tmp_path / "inbox", name=f"{n}.dcm", InstanceNumber=n) for n in range(8)]
    jobs = [placement.Job(str(s), root, f"S/{s.name}", link=True) for s in sources]
    calls: list[str] = []
    real_link, real_syncfs = os.link, placement._syncfs
    monkeypatch.setattr(
        placement.os, "link", lambda *a, **k: calls.append("link") or real_link(*a, **k)
    )
    monkeypatch.setattr(placement, "_syncfs", lambda fd: calls.append("syncfs") or real_syncfs(fd))
    monkeypatch.setattr(placement, "_fsync_folder", lambda fd: calls.append("fsync folder"))
    monkeypatch.setattr(placement.os, "fsync", lambda fd: calls.append("fsync"))

    def flushes_from_the_first_link() -> list[str]:
        first = calls.index("link")  # before it, the folder is made (and fsynced)
        assert {"syncfs", "fsync"}.isdisjoint(calls[:first]), calls
        return calls[first:]

    results = placement.place_batch(jobs)
    assert [r.outcome for r in results] == ["placed"] * 8, results
    assert all(os.path.samefile(r.path, s) for r, s in zip(results, sources, strict=True))
    assert flushes_from_the_first_link() == ["link"] * 8 + ["syncfs"]

    calls.clear()
    again = placement.place_batch(jobs)
    assert [r.outcome for r in again] == ["present"] * 8, again
    assert flushes_from_the_first_link() == ["link"] * 8 + ["syncfs"]


@pytest.mark.skipif(placement._SYNCFS is None, reason="syncfs(2) is Linux-only")
@pytest.mark.parametrize(
    ("count", "data_flush"),
    [(placement.FEW, ["fsync"] * placement.FEW), (placement.FEW + 1, ["syncfs"])],
    ids=["few: an fsync each", "more: one syncfs"],
)
def test_copied_bytes_are_durable_before_their_names_and_the_names_after(
    tmp_path, root, monkeypatch, make_dicom, count, data_flush
):
    """A copy is named only once its bytes are on disk (a crash must never
    leave a name on lost or partial bytes), and its name is flushed (here,
    its one folder's) before the caller may remove the source."""
    sources = [
        make_dicom(tmp_path / "inbox", name=f"{n}.dcm", InstanceNumber=n) for n in range(count + 1)
    ]
    jobs = [placement.Job(str(s), root, f"S/{s.name}") for s in sources]
    placement.place_batch(jobs[:1])  # its folder made (and flushed) beforehand
    calls: list[str] = []
    real_link, real_fsync, real_syncfs = os.link, os.fsync, placement._syncfs
    monkeypatch.setattr(
        placement.os, "link", lambda *a, **k: calls.append("link") or real_link(*a, **k)
    )
    monkeypatch.setattr(placement.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(placement, "_syncfs", lambda fd: calls.append("syncfs") or real_syncfs(fd))
    monkeypatch.setattr(placement, "_fsync_folder", lambda fd: calls.append("fsync folder"))

    results = placement.place_batch(jobs[1:])

    assert [r.outcome for r in results] == ["placed"] * count, results
    assert calls == data_flush + ["link"] * count + ["fsync folder"]


@pytest.mark.skipif(placement._SYNCFS is None, reason="syncfs(2) is Linux-only")
def test_linked_sources_whose_flush_fails_each_report_it_and_are_found_again(
    tmp_path, root, monkeypatch, make_dicom
):
    """A disk that fails the one flush of a batch of links (EIO): every job
    reports the error, so that the caller keeps every source; the next try
    finds each already linked ("present") and flushes it."""
    sources = [make_dicom(tmp_path / "inbox", name=f"{n}.dcm", InstanceNumber=n) for n in range(8)]
    jobs = [placement.Job(str(s), root, f"S/{s.name}", link=True) for s in sources]

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(placement, "_syncfs", fail)
    results = placement.place_batch(jobs)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
    assert all(source.exists() for source in sources)
    monkeypatch.undo()
    again = placement.place_batch(jobs)
    assert [r.outcome for r in again] == ["present"] * 8, again


def test_a_source_replaced_just_before_it_is_linked_is_not_placed_in_its_stead(
    tmp_path, root, monkeypatch, make_dicom
):
    """A source to link is looked at, not opened, and linked by its name: if
    another file takes that name in between, the link is undone and the job
    fails with EAGAIN (retried), never placing the other file in its stead."""
    source = make_dicom(tmp_path / "inbox", name="a.dcm", InstanceNumber=1)
    other = make_dicom(tmp_path / "elsewhere", name="b.dcm", InstanceNumber=2)
    job = placement.Job(str(source), root, "S/a.dcm", link=True)
    real_link = os.link

    def replace_then_link(source_path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.basename(source_path) == source.name:  # (linked by name, from its folder)
            os.replace(other, source)
        return real_link(source_path, *args, **kwargs)

    monkeypatch.setattr(placement.os, "link", replace_then_link)
    [result] = placement.place_batch([job])
    assert isinstance(result, OSError) and result.errno == errno.EAGAIN, result
    assert files_under(root) == []


def test_one_name_twice_in_a_batch_is_placed_once_and_other_bytes_go_beside(
    tmp_path, root, source, other, write_mode
):
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(source.read_bytes())
    jobs = [placement.Job(str(path), root, RELATIVE) for path in (source, copy, other)]
    first, same, different = placement.place_batch(jobs)
    assert isinstance(first, placement.Placement) and first.outcome == "placed"
    assert isinstance(same, placement.Placement) and same.outcome == "present"
    assert same.path == first.path
    assert isinstance(different, placement.Placement) and different.outcome == "placed"
    assert different.beside == root / RELATIVE and different.path != first.path
    assert sha256(different.path) == sha256(other)
    assert temporaries(root) == []
    assert len(files_under(root)) == 2


def test_a_failed_flush_names_nothing_closes_its_files_and_reports_each_job(
    tmp_path, root, write_mode, monkeypatch, make_dicom
):
    """A NAS that fails the flush (EIO): no name is given to bytes that may
    not be on disk, every job reports the error (the daemon then retries),
    and the written files are closed, not leaked batch after batch."""
    sources = [make_dicom(tmp_path / "inbox", name=f"{n}.dcm", InstanceNumber=n) for n in range(8)]
    jobs = [placement.Job(str(s), root, f"S/{s.name}") for s in sources]

    def fail(items):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(placement, "_flush_data", fail)
    open_before = len(os.listdir("/proc/self/fd"))
    results = placement.place_batch(jobs)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert files_under(root) == []  # neither names nor temporary names
