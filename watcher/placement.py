"""Durable placement of one file into a lab tree: the one module that writes there.

`place` copies a file under a destination root so that:

- the root is never created (an unmounted NAS is never filled on the local
  disk): a missing root raises `DestinationUnavailable`, as do a full, read-only
  or forbidden one;
- folders below the root are created one at a time relative to an open
  handle on the root, never following a symbolic link, so a name can never
  lead outside the root;
- bytes go to an unnamed file in the target folder (`O_TMPFILE`: nothing is
  visible, and a crash leaves nothing behind) or, where the filesystem has
  none, to a temporary name (`TEMP_PREFIX...`), in the target folder or, for
  files placed side by side onto a share, in a scratch folder of the batch's
  own below the destination root (so that the target folder's lock is held
  for the link alone); they are flushed to disk, then linked to the final
  name, which fails rather than replacing an existing file; the folder is
  flushed last. Many files share one flush
  (`place_batch`: one syncfs per filesystem where syncfs flushes, one fsync
  per file elsewhere, as on FUSE and SMB mounts), and bytes are copied in the
  kernel (copy_file_range, sendfile) unless their SHA-256 is wanted;
- a file already there with the same bytes is left alone ("present"); a
  different file at that name makes the new one go beside it under a suffix
  derived from its content, so the choice is the same on every run.

Other `OSError`s (EIO, ESTALE, timeouts) propagate: they are worth retrying.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import resource
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watcher.errors import DestinationUnavailable
from watcher.template import with_suffix

#: Every temporary file starts with this; `remove_temporaries` cleans them up.
TEMP_PREFIX = ".dicom-watcher-tmp."
#: Errors that mean "this destination cannot take files now", not "try again at once".
UNAVAILABLE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
    }
)
CHUNK = 1024 * 1024
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Outcome = Literal["placed", "present"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an instance now is, and whether this call wrote it."""

    folder: Path
    name: str
    outcome: Outcome
    size: int
    #: Set when the plain name held other bytes and this one went beside it.
    beside: Path | None = None
    #: SHA-256 of the bytes, when asked for.
    sha256: str = ""

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Comes back from worker processes by the thousand (see `headers.Instance`).
        return type(self), (
            self.folder,
            self.name,
            self.outcome,
            self.size,
            self.beside,
            self.sha256,
        )


@dataclass(frozen=True, slots=True)
class Permissions:
    """Group and modes given to what a rule creates (None: leave as made)."""

    group: int | None = None
    file_mode: int | None = None
    folder_mode: int | None = None

    @property
    def changes_files(self) -> bool:
        return self.group is not None or self.file_mode is not None

    def apply_to_file(self, fd: int) -> None:
        self._apply(fd, self.file_mode)

    def apply_to_folder(self, fd: int) -> None:
        self._apply(fd, self.folder_mode)

    def _apply(self, fd: int, mode: int | None) -> None:
        if self.group is not None:
            os.fchown(fd, -1, self.group)
        if mode is not None:
            os.fchmod(fd, mode)  # after chown, which may clear setgid bits


NO_PERMISSIONS = Permissions()


class FolderHandles:
    """Open handles on folders by their path, each path looked up once; the
    files in them are then reached by name. Closed together."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def get(self, folder: str) -> int:
        """The handle on `folder` ("" for the current one); OSError if it
        cannot be opened."""
        fd = self.fds.get(folder)
        if fd is None:
            fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds[folder] = fd
        return fd

    def flush(self) -> None:
        """Make the changes of names in every folder held durable."""
        for fd in self.fds.values():
            _fsync_folder(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> FolderHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PathConflict(OSError):
    """A non-folder stands where the template needs a folder."""


def place(
    source: str,
    root: Path,
    relative: str,
    *,
    link: bool = False,
    digest: bool = False,
    permissions: Permissions = NO_PERMISSIONS,
) -> Placement:
    """Durably copy `source` to `root/relative`; see the module docstring.

    `link=True` allows a hard link instead of a copy when source and root are
    on one filesystem (the caller then removes the source, so the lab's file
    never shares its inode for long). `digest=True` fills in `sha256`.
    `permissions` are given to the new file and to folders created for it,
    before they get their final names.
    """
    [result] = place_batch([Job(source, root, relative, link, digest, permissions)])
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass(frozen=True, slots=True)
class Job:
    """One file to place with `place_batch`; the arguments of `place`."""

    source: str
    root: Path
    relative: str
    link: bool = False
    digest: bool = False
    permissions: Permissions = NO_PERMISSIONS
    #: Where `root` is reached from without following a link (a lab's
    #: destination: see `open_root`); None: `root` is opened as it is.
    anchor: Path | None = None
    beneath: tuple[str, ...] = ()
    #: The source's SHA-256 if already known, and the (size, mtime_ns) it
    #: was taken at: used only while the source still has them.
    known_sha256: str = ""
    known_as_of: tuple[int, int] = (0, 0)
    #: An open descriptor of the source, which the caller keeps and closes
    #: (`sort` has it open from reading the header); -1: opened by path.
    source_fd: int = -1


#: Files whose bytes are written (and kept open) before one flush, at most.
OPEN_AT_ONCE = 1024
#: Up to this many files or folders are flushed one by one; more, with syncfs.
FEW = 4


def place_batch(jobs: Sequence[Job], writeback: bool = False) -> list[Placement | BaseException]:
    """Place many files with the guarantees of `place`, flushing rarely.

    The bytes of up to `OPEN_AT_ONCE` files are written into unnamed files
    (or temporary names where the filesystem has no `O_TMPFILE`), made
    durable together (one syncfs per filesystem), then linked under their
    names; the names are made durable at the end. Returns, per job, its
    Placement or the error that stopped it (`DestinationUnavailable`,
    `PathConflict`, `OSError`); a Placement is only returned once durable.

    A linked source adds no bytes, only a name: its data (which its writer
    may not have flushed) is made durable by the same syncfs as the names,
    before the caller removes the source, instead of by a flush of its own.

    `writeback=True` starts writing each copy to disk as soon as it is made,
    so that the flush finds less to do: it shortens the wait for a batch
    (the daemon's latency, a share's round trips) but costs processor time
    per file, which a bulk `sort` spends better on the next files.
    """
    placing = BatchPlacement(jobs, writeback)
    placing.write()
    return placing.finish()


class BatchPlacement:
    """`place_batch` in steps, so that a caller can write the next batch's
    bytes while this one waits for its flushes: `write` puts the bytes of
    the first jobs (up to `open_at_once()`) on their filesystems, unnamed,
    and `finish`, called once (from any one thread), does the rest and
    returns what `place_batch` returns. `abandon` drops what is written and
    not named, when `finish` will not be called.

    `flush`, between them, makes the written bytes durable: the long wait of
    `finish`, which another thread can do while the caller writes the next
    batch; `finish` must not begin before it returns, and then only names
    the files (a thread that names them while the caller writes makes both
    wait for each other at every file, for the interpreter's lock).

    `scratch=True` puts temporary names (where there are no unnamed files)
    into a scratch folder of the batch's own (see `_Batch.temporary_folder`):
    for batches that work side by side into the same folders."""

    def __init__(self, jobs: Sequence[Job], writeback: bool = False, scratch: bool = False) -> None:
        self.jobs = jobs
        self.results: list[Placement | BaseException | None] = [None] * len(jobs)
        self.batch = _Batch(writeback, scratch)
        self.at_once = open_at_once()
        #: Jobs whose bytes are written and not yet named.
        self.written: list[tuple[int, _Written]] = []
        #: The first job not written yet.
        self.next = 0
        self.ended = False
        #: `flush` made the written bytes durable, or met `flush_error`.
        self.flushed = False
        self.flush_error: OSError | None = None

    def write(self) -> None:
        """Write the bytes of the next jobs (up to `open_at_once()`), unnamed."""
        end = min(self.next + self.at_once, len(self.jobs))
        try:
            for index in range(self.next, end):
                try:
                    self.written.append((index, self.batch.write(self.jobs[index])))
                except (OSError, DestinationUnavailable) as error:
                    self.results[index] = error
        except BaseException:
            self.abandon()
            raise
        self.next = end

    def flush(self) -> None:
        """Make the bytes written so far durable, unnamed; an error is kept
        for `finish`, which fails their jobs with it."""
        try:
            _flush_data(self._data_to_flush(self.written))
        except OSError as error:
            self.flush_error = error
        self.flushed = True

    def finish(self) -> list[Placement | BaseException]:
        """Make the written bytes durable and name them, place the jobs not
        written yet (as many at a time), make the names durable; per job,
        its Placement or the error that stopped it."""
        if self.ended:
            raise RuntimeError("this batch is finished or abandoned already")
        try:
            self._name_written()
            while self.next < len(self.jobs):
                self.write()
                self._name_written()
            for index, failure in self.batch.flush_names():
                if isinstance(self.results[index], Placement):
                    self.results[index] = _classify(self.jobs[index].root, failure)
        finally:
            self.abandon()
        return [result if result is not None else OSError("not placed") for result in self.results]

    def abandon(self) -> None:
        """Drop the bytes written and not named (the sources are never
        touched) and close the batch's folders; once done, does nothing."""
        if self.ended:
            return
        self.ended = True
        written, self.written = self.written, []
        try:
            for _, item in written:
                item.discard()
                with contextlib.suppress(OSError):
                    item.close()
        finally:
            self.batch.close()

    def _name_written(self) -> None:
        written, self.written = self.written, []
        flushed, self.flushed = self.flushed, False
        failed, self.flush_error = self.flush_error, None
        try:
            if not flushed:
                _flush_data(self._data_to_flush(written))
            elif failed is not None:
                raise failed
        except OSError as error:
            for index, item in written:
                item.discard()
                item.close()
                self.results[index] = _classify(self.jobs[index].root, error)
            return
        for position, (index, item) in enumerate(written):
            try:
                self.results[index] = self.batch.name(index, item)
            except (OSError, DestinationUnavailable) as error:
                self.results[index] = error
            except BaseException:
                self.written = written[position + 1 :]  # dropped by `abandon`
                raise
            finally:
                item.close()

    def _data_to_flush(self, written: list[tuple[int, _Written]]) -> list[_Written]:
        return [item for _, item in written if not self.batch.flushed_with_names(item)]


#: Threads that place one batch's files side by side onto a filesystem
#: whose syncfs does not flush (a network share): there each file waits for
#: round trips to its server, which overlap when several files are under way.
SHARE_THREADS = 16


def batch_placement(jobs: Sequence[Job], writeback: bool = False) -> Placing:
    """A `BatchPlacement` of the jobs, or, when many of them go onto a
    network share, a `SpreadPlacement` that places those side by side."""
    flushes: dict[Path, bool] = {}  # by root: looked at once a batch
    for job in jobs:
        if job.root not in flushes:
            flushes[job.root] = _root_flushes_by_syncfs(job.root)
    remote = [index for index, job in enumerate(jobs) if not flushes[job.root]]
    if len(remote) <= FEW:
        return BatchPlacement(jobs, writeback)
    return SpreadPlacement(jobs, remote, writeback)


class SpreadPlacement:
    """`BatchPlacement`'s steps for jobs spread over several batches, each
    step taken by all of them at once in threads: the jobs bound for network
    shares (`remote`, indexes into `jobs`) dealt out over up to
    `SHARE_THREADS` batches, the others in one batch of their own. A batch
    bound for a share with more than a few files puts their temporary names
    in a scratch folder of its own, so that the batches, working in the same
    folders, do not wait for each other's temporary names there."""

    def __init__(self, jobs: Sequence[Job], remote: list[int], writeback: bool = False) -> None:
        spread = min(SHARE_THREADS, len(remote))
        groups = _deal(jobs, remote, spread)
        local = sorted(set(range(len(jobs))) - set(remote))
        if local:
            groups.append(local)
        self.size = len(jobs)
        self.groups = groups
        self.batches = [
            BatchPlacement(
                [jobs[i] for i in group], writeback, scratch=number < spread and len(group) > FEW
            )
            for number, group in enumerate(groups)
        ]

    def _each(self, step: Callable[[BatchPlacement], Any]) -> list[Any]:
        with ThreadPoolExecutor(len(self.batches), thread_name_prefix="place") as threads:
            futures = [threads.submit(step, batch) for batch in self.batches]
            return [future.result() for future in futures]

    def write(self) -> None:
        try:
            self._each(BatchPlacement.write)
        except BaseException:
            self.abandon()
            raise

    def flush(self) -> None:
        self._each(BatchPlacement.flush)

    def finish(self) -> list[Placement | BaseException]:
        try:
            outcomes = self._each(BatchPlacement.finish)
        finally:
            self.abandon()  # (what an interrupted batch left)
        results: list[Placement | BaseException] = [OSError("not placed")] * self.size
        for group, placed in zip(self.groups, outcomes, strict=True):
            for index, result in zip(group, placed, strict=True):
                results[index] = result
        return results

    def abandon(self) -> None:
        for batch in self.batches:
            batch.abandon()


Placing = BatchPlacement | SpreadPlacement


def _deal(jobs: Sequence[Job], indexes: list[int], count: int) -> list[list[int]]:
    """The jobs (`indexes` into `jobs`) dealt out into `count` groups of
    neighbours, the jobs of a folder together, so that the groups work in
    different folders at once: a new name in a folder waits for the names
    being made there, each for its round trip to the server."""
    ordered = sorted(
        indexes, key=lambda i: (str(jobs[i].root), jobs[i].relative.rpartition("/")[0])
    )
    size = len(ordered)
    return [ordered[size * k // count : size * (k + 1) // count] for k in range(count)]


def _root_flushes_by_syncfs(root: Path) -> bool:
    """Whether one syncfs flushes what is placed under `root` (True when it
    cannot be told: the placement finds out why)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return syncfs_flushes(fd, os.fstat(fd).st_dev)
    finally:
        os.close(fd)


def open_at_once() -> int:
    """`OPEN_AT_ONCE`, or fewer when the open-file limit is low (a batch also
    holds its folders open)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return OPEN_AT_ONCE
    return max(8, min(OPEN_AT_ONCE, soft // 4))


def raise_open_file_limit(wanted: int = 8 * OPEN_AT_ONCE) -> None:
    """Let the process open `wanted` files, within its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass(slots=True)
class _Written:
    """The bytes of one job on its destination's filesystem, not yet named:
    an open unnamed file, a temporary name, or the source itself (a link)."""

    job: Job
    folder_fd: int
    folder: Path
    name: str
    size: int
    sha256: str
    fd: int
    device: int
    temporary: str | None = None
    #: The folder the temporary name is in, when not the target folder.
    scratch_fd: int = -1
    linked_source: bool = False
    #: The source's inode, for a linked source; for one not held open, an
    #: open handle on its folder (the batch's) to link it from.
    inode: int = 0
    source_folder_fd: int = -1

    def link(self, name: str) -> None:
        """Give the bytes `name`; FileExistsError if it is taken."""
        if self.temporary is not None and self.scratch_fd >= 0:
            # (a failure other than EEXIST: the caller writes it again in the folder)
            os.link(self.temporary, name, src_dir_fd=self.scratch_fd, dst_dir_fd=self.folder_fd)
        elif self.temporary is not None:
            _link_into_place(self.temporary, name, self.folder_fd)
        elif self.fd < 0:  # a linked source not held open: by its name, then checked
            os.link(
                os.path.basename(self.job.source),
                name,
                src_dir_fd=self.source_folder_fd,
                dst_dir_fd=self.folder_fd,
                follow_symlinks=False,
            )
            if os.stat(name, dir_fd=self.folder_fd, follow_symlinks=False).st_ino != self.inode:
                _unlink_quietly(name, self.folder_fd)
                raise OSError(errno.EAGAIN, "the source was replaced while it was placed")
        elif _PROC_FD:
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.folder_fd)
        else:  # a linked source, without /proc: by its path
            os.link(self.job.source, name, dst_dir_fd=self.folder_fd)

    @property
    def temporary_folder(self) -> int:
        """The handle on the folder of the temporary name."""
        return self.scratch_fd if self.scratch_fd >= 0 else self.folder_fd

    def discard(self) -> None:
        """Drop the bytes after a failure; the source is never touched."""
        if self.temporary is not None:
            _discard(self.temporary, self.temporary_folder)

    def close(self) -> None:
        """Close the file; the temporary name goes (an unnamed file goes by itself)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary is not None:
            temporary, self.temporary = self.temporary, None
            _unlink_quietly(temporary, self.temporary_folder)


class _Batch:
    """The folders, filesystems and new names of one `place_batch` call."""

    def __init__(self, writeback: bool = False, scratch: bool = False) -> None:
        self.writeback = writeback
        self.scratch = scratch
        #: The scratch folder made below each root (its handle, name and
        #: device), or None where none can be made.
        self.scratches: dict[tuple[Path, Path | None], tuple[int, str, int] | None] = {}
        #: Where the temporary names for each target folder go, by its handle.
        self.temporaries_in: dict[int, int] = {}
        self.roots: dict[tuple[Path, Path | None], int | DestinationUnavailable] = {}
        self.folders: dict[tuple[Path, tuple[str, ...]], tuple[int, Path, int]] = {}
        #: The group a setgid folder gives what is made in it, by folder handle.
        self.inherited: dict[int, int | None] = {}
        #: Folders that got new names, by filesystem: flushed at the end.
        self.named: dict[int, dict[int, list[int]]] = {}
        #: Jobs placed as links to their source whose data is flushed with
        #: the names, by filesystem: (a folder there, the jobs).
        self.linked: dict[int, tuple[int, list[int]]] = {}
        #: Open handles on the folders of sources linked by name.
        self.source_folders = FolderHandles()

    def flushed_with_names(self, item: _Written) -> bool:
        """Whether the item's data is made durable by `flush_names` rather
        than before it is named: a linked source, where syncfs can do both."""
        return item.linked_source and syncfs_flushes(item.folder_fd, item.device)

    def folder(self, job: Job, folders: list[str]) -> tuple[int, Path, int]:
        """An open handle on the job's folder (made as needed), its path, its device."""
        root = job.root
        key = (root, tuple(folders))
        known = self.folders.get(key)
        if known is not None:
            return known
        opened = self.roots.get((root, job.anchor))
        if opened is None:
            try:
                opened = open_root(root, job.anchor, job.beneath)
            except DestinationUnavailable as error:
                opened = error
            self.roots[(root, job.anchor)] = opened
        if isinstance(opened, DestinationUnavailable):
            raise opened
        fd = _open_folders(root, opened, folders, job.permissions)
        status = os.fstat(fd)
        known = (fd, root.joinpath(*folders), status.st_dev)
        self.folders[key] = known
        self.inherited[fd] = status.st_gid if status.st_mode & stat.S_ISGID else None
        return known

    def write(self, job: Job) -> _Written:
        """Put the job's bytes on its destination's filesystem, unnamed."""
        *folders, name = job.relative.split("/")
        folder_fd, folder, device = self.folder(job, folders)
        inherited = self.inherited.get(folder_fd)
        if (
            job.link
            and job.source_fd < 0
            and not job.permissions.changes_files
            and syncfs_flushes(folder_fd, device)
        ):
            item = self._linked_by_name(job, folder_fd, folder, name, device, inherited)
            if item is not None:
                return item
        borrowed = job.source_fd >= 0
        source = job.source_fd if borrowed else os.open(job.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.fstat(source)
            known = ""
            if job.digest and job.known_as_of == (status.st_size, status.st_mtime_ns):
                known = job.known_sha256
            if job.link and status.st_dev == device and self._may_link(job, source, inherited):
                sha256 = (known or sha256_of_fd(source)) if job.digest else ""
                held = os.dup(source) if borrowed else source
                item = _Written(job, folder_fd, folder, name, status.st_size, sha256, held, device)
                item.linked_source = True
                item.inode = status.st_ino
                source = -1  # kept open by the item
                return item
            where = self.temporary_folder(job, folder_fd, device)
            fd, temporary = _new_file(job.root, where, name, device)
            item = _Written(job, folder_fd, folder, name, status.st_size, "", fd, device, temporary)
            if where != folder_fd:
                item.scratch_fd = where
            try:
                item.sha256 = _copy(source, fd, status.st_size, job.digest and not known) or known
                if self.writeback:
                    start_writeback(fd)  # the disk works while the next files are copied
                job.permissions.apply_to_file(fd)
            except OSError as error:
                item.discard()
                item.close()
                raise _classify(job.root, error) from error
            return item
        finally:
            if source >= 0 and not borrowed:
                os.close(source)

    def temporary_folder(self, job: Job, folder_fd: int, device: int) -> int:
        """The handle on the folder where a temporary name for the folder
        `folder_fd` goes: the batch's scratch folder, when it has one (see
        `_scratch`) and files made there come out as they would in the
        target folder (same group, same default ACL); else the folder itself."""
        if not self.scratch or not _named_temporaries(device):
            return folder_fd
        where = self.temporaries_in.get(folder_fd)
        if where is None:
            where = folder_fd
            scratch = self._scratch(job)
            if (
                scratch is not None
                and scratch[2] == device
                and _makes_alike(
                    scratch[0],
                    self.inherited.get(scratch[0]),
                    folder_fd,
                    self.inherited.get(folder_fd),
                )
            ):
                where = scratch[0]
            self.temporaries_in[folder_fd] = where
        return where

    def _scratch(self, job: Job) -> tuple[int, str, int] | None:
        """The batch's scratch folder below the job's root, made at first use
        under a new name (`TEMP_PREFIX` and random: never one that exists, so
        never a link a lab planted) and opened without following a link;
        None when it cannot be made."""
        key = (job.root, job.anchor)
        if key in self.scratches:
            return self.scratches[key]
        root_fd = self.roots[key]
        assert isinstance(root_fd, int)  # (the job's folder was opened from it)
        self.scratches[key] = None
        name = _scratch_name()
        try:
            os.mkdir(name, 0o700, dir_fd=root_fd)
        except OSError:
            return None  # a name taken, a root we may not write: the target folders then
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=root_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=root_fd)
            return None
        status = os.fstat(fd)
        self.inherited[fd] = status.st_gid if status.st_mode & stat.S_ISGID else None
        scratch = self.scratches[key] = (fd, name, status.st_dev)
        return scratch

    def _rewrite_in_folder(self, item: _Written) -> None:
        """Write the item's bytes again, under a temporary name in its target
        folder, as the folder's next files will be: the link from the scratch
        folder failed (on another filesystem of the server, say, which sshfs
        reports as EPERM, not EXDEV), and one within the folder may not."""
        self.temporaries_in[item.folder_fd] = item.folder_fd
        job = item.job
        item.close()
        item.scratch_fd = -1
        borrowed = job.source_fd >= 0
        source = job.source_fd if borrowed else os.open(job.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            item.fd, item.temporary = _new_file(job.root, item.folder_fd, item.name, item.device)
            try:
                _copy(source, item.fd, item.size, False)
                job.permissions.apply_to_file(item.fd)
                os.fsync(item.fd)
            except OSError as error:
                item.discard()
                item.close()
                raise _classify(job.root, error) from error
        finally:
            if not borrowed:
                os.close(source)

    def _may_link(self, job: Job, source: int, inherited: int | None) -> bool:
        """Give the source the rule's group and modes, so that it can be
        linked: a setgid folder's group too, which a copy would get from the
        folder and a link would not (the inbox's group would stay). False
        when that group cannot be given: the source is copied instead."""
        permissions = job.permissions
        if (
            permissions.group is None
            and inherited is not None
            and os.fstat(source).st_gid != inherited
        ):
            permissions = dataclasses.replace(permissions, group=inherited)
        try:
            permissions.apply_to_file(source)
        except OSError as error:
            if permissions is not job.permissions and error.errno == errno.EPERM:
                return False
            raise _classify(job.root, error) from error
        return True

    def _linked_by_name(
        self,
        job: Job,
        folder_fd: int,
        folder: Path,
        name: str,
        device: int,
        inherited: int | None,
    ) -> _Written | None:
        """A source to link on its own filesystem, looked at without opening
        it (a third of the system calls of a move): None when it must be
        opened after all (on another filesystem, not a regular file, or
        changed since its SHA-256 was taken)."""
        source_folder, source_name = os.path.split(job.source)
        source_folder_fd = self.source_folders.get(source_folder)
        status = os.stat(source_name, dir_fd=source_folder_fd, follow_symlinks=False)
        unchanged = job.known_as_of == (status.st_size, status.st_mtime_ns)
        if status.st_dev != device or not stat.S_ISREG(status.st_mode):
            return None
        if inherited is not None and status.st_gid != inherited:
            return None  # its group must change first (`_may_link`)
        if job.digest and not unchanged:
            return None
        sha256 = job.known_sha256 if job.digest else ""
        item = _Written(job, folder_fd, folder, name, status.st_size, sha256, -1, device)
        item.linked_source = True
        item.inode = status.st_ino
        item.source_folder_fd = source_folder_fd
        return item

    def name(self, index: int, item: _Written) -> Placement:
        """Link the bytes under their name, or find them (or others) there."""
        job, name = item.job, item.name
        beside: Path | None = None
        content = item.sha256
        candidates = [name]
        attempts = 0
        while candidates:
            candidate = candidates[0]
            try:
                item.link(candidate)
            except FileExistsError:
                existing = _stat(candidate, item.folder_fd)
                attempts += 1
                if existing is None and attempts < 10:
                    continue  # gone again since: try the same name once more
                if (
                    existing is not None
                    and _same_size(existing, item.size)
                    and (
                        _same_file(item, existing)
                        or _same_bytes(job.source, candidate, item.folder_fd)
                    )
                ):
                    if job.digest and not content:
                        content = _sha256(job.source)
                    self._note_linked(index, item)
                    return Placement(item.folder, candidate, "present", item.size, beside, content)
                # Other bytes under this name: go beside them, under a name
                # derived from our own content, so that a re-run finds us there.
                if beside is None:
                    beside = item.folder / name
                    content = content or _sha256(job.source)
                    candidates += [with_suffix(name, content[:12]), with_suffix(name, content)]
                candidates.pop(0)
                continue
            except OSError as error:
                if item.scratch_fd >= 0:
                    self._rewrite_in_folder(item)
                    continue
                item.discard()
                raise _classify(job.root, error) from error
            self.named.setdefault(item.device, {}).setdefault(item.folder_fd, []).append(index)
            self._note_linked(index, item)
            try:
                item.close()
            except OSError as error:
                # Placed, but its temporary name cannot go (the share turned
                # read-only): an error, so that the caller's journal of this
                # placement is kept and the name removed later.
                raise _classify(job.root, error) from error
            return Placement(
                item.folder, candidate, "placed", item.size, beside, content if job.digest else ""
            )
        raise FileExistsError(errno.EEXIST, "no free name", str(item.folder / name))

    def _note_linked(self, index: int, item: _Written) -> None:
        if self.flushed_with_names(item):
            self.linked.setdefault(item.device, (item.folder_fd, []))[1].append(index)

    def flush_names(self) -> list[tuple[int, OSError]]:
        """Make the new names durable: fsync their folders when they are few,
        one syncfs per filesystem otherwise (always where a linked source's
        data is still to flush). Returns the jobs it failed for."""
        failed: list[tuple[int, OSError]] = []
        for device in self.named.keys() | self.linked.keys():
            folders = self.named.get(device, {})
            some_folder, linked = self.linked.get(device, (-1, []))
            some_folder = next(iter(folders), some_folder)
            if linked or (len(folders) > FEW and syncfs_flushes(some_folder, device)):
                try:
                    _syncfs(some_folder)
                except OSError as error:
                    jobs = {*linked, *(index for indexes in folders.values() for index in indexes)}
                    failed += [(index, error) for index in sorted(jobs)]
                continue
            for folder_fd, indexes in folders.items():
                try:
                    _fsync_folder(folder_fd)
                except OSError as error:
                    failed += [(index, error) for index in indexes]
        self.named.clear()
        self.linked.clear()
        return failed

    def close(self) -> None:
        """Close the batch's folders; its scratch folders go (one still
        holding a temporary name stays, for `remove_scratch_folders`)."""
        self.source_folders.close()
        for key, scratch in self.scratches.items():
            if scratch is not None:
                os.close(scratch[0])
                root_fd = self.roots[key]
                assert isinstance(root_fd, int)
                with contextlib.suppress(OSError):
                    os.rmdir(scratch[1], dir_fd=root_fd)
        self.scratches.clear()
        roots = {fd for fd in self.roots.values() if isinstance(fd, int)}
        for fd, _, _ in self.folders.values():
            if fd not in roots:
                os.close(fd)
        for fd in roots:
            os.close(fd)


def _flush_data(items: list[_Written]) -> None:
    """Make the written bytes durable: an fsync per file when they are few,
    else one syncfs per filesystem."""
    by_device: dict[int, list[_Written]] = {}
    for item in items:
        by_device.setdefault(item.device, []).append(item)
    for written in by_device.values():
        if len(written) > FEW and syncfs_flushes(written[0].folder_fd, written[0].device):
            _syncfs(written[0].fd)
        else:
            for item in written:
                os.fsync(item.fd)


def _syncfs(fd: int) -> None:
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk, without waiting (Linux
    sync_file_range). The daemon does this as files arrive, so that the flush
    of their placement, after the quiet period, has little left to write."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # best effort: errors ignored


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs: Callable[[int], int] = libc.syncfs
        return syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()

#: Filesystem types (statfs f_type) whose syncfs makes durable what was
#: written: local disks' and NFS's (whose syncfs commits to the server).
#: Elsewhere syncfs may return without asking the server (FUSE mounts
#: such as sshfs, SMB): every file is flushed by its own fsync there.
SYNCFS_FLUSHES = frozenset(
    {
        0xEF53,  # ext2, ext3, ext4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0xF2F52010,  # f2fs
        0x2FC12FC1,  # zfs
        0xCA451A4E,  # bcachefs
        0x01021994,  # tmpfs
        0x794C7630,  # overlayfs (syncfs flushes its upper filesystem)
        0x6969,  # nfs
    }
)
_syncfs_flushes: dict[int, bool] = {}


def syncfs_flushes(fd: int, device: int) -> bool:
    """Whether one syncfs makes durable what was written on the filesystem
    of `fd` (whose device is `device`): known per device."""
    known = _syncfs_flushes.get(device)
    if known is None:
        known = _syncfs_flushes[device] = (
            _SYNCFS is not None and filesystem_type(fd) in SYNCFS_FLUSHES
        )
    return known


def filesystem_type(fd: int) -> int:
    """The statfs f_type of the filesystem of `fd`, or 0 when unknown."""
    if _FSTATFS is None:
        return 0
    buffer = ctypes.create_string_buffer(256)  # struct statfs, f_type first
    if _FSTATFS(fd, buffer) != 0:
        return 0
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def _load_fstatfs() -> Callable[[int, ctypes.Array[ctypes.c_char]], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).fstatfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p]
    function.restype = ctypes.c_int
    return function


_FSTATFS = _load_fstatfs()
SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()


def open_root(root: Path, anchor: Path | None = None, beneath: Sequence[str] = ()) -> int:
    """An open handle on a destination root. A lab's is reached from its
    `anchor` one folder at a time, never following a link, at every
    placement: a folder of the lab's tree that was swapped for a link since
    the rule was loaded makes the destination unavailable, not a way out.
    Raises `DestinationUnavailable`."""
    if anchor is None:
        try:
            return os.open(root, DIRECTORY_FLAGS)
        except OSError as error:
            raise _unavailable(root, error) from error
    # The anchor (resolved when the config loaded) is reached from / too,
    # one folder at a time: a link put in place of it or of a folder above
    # it makes the destination unavailable.
    parts = anchor.parts
    try:
        fd = os.open(parts[0], DIRECTORY_FLAGS)
    except OSError as error:
        raise _unavailable(root, error) from error
    for component in (*parts[1:], *beneath):
        try:
            child = os.open(component, DIRECTORY_FLAGS, dir_fd=fd)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise DestinationUnavailable(
                    str(root),
                    f"{component!r} on the way to it is now a symbolic link or not a folder "
                    "(a lab's destination is never reached through a link)",
                ) from error
            raise _unavailable(root, error) from error
        os.close(fd)
        fd = child
    return fd


@dataclasses.dataclass(frozen=True)
class Folder:
    """A folder below a destination root, reached the way placements reach
    it (see `open_root`): never through a link that a lab put in its tree."""

    root: Path
    #: The folders from the root down to it.
    below: tuple[str, ...] = ()
    anchor: Path | None = None
    beneath: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.below)

    def open(self) -> int:
        """An open handle on it. Raises `DestinationUnavailable` when its
        root cannot be reached, `OSError` when a folder below is missing,
        or is a link or no folder."""
        root = open_root(self.root, self.anchor, self.beneath)
        try:
            return open_beneath(root, self.below)
        finally:
            os.close(root)


def open_beneath(fd: int, folders: Sequence[str]) -> int:
    """Open each folder below the handle `fd`, never following a link and
    never creating; returns a new handle (`fd` stays open)."""
    current = os.dup(fd)
    for component in folders:
        try:
            child = os.open(component, DIRECTORY_FLAGS, dir_fd=current)
        finally:
            os.close(current)
        current = child
    return current


def _open_folders(root: Path, root_fd: int, folders: list[str], permissions: Permissions) -> int:
    """Open (creating as needed) each folder below the root; return the last."""
    fd = root_fd
    for component in folders:
        created = False
        try:
            os.mkdir(component, 0o777, dir_fd=fd)
            created = True
        except FileExistsError:
            pass
        except OSError as error:
            _close_unless(fd, root_fd)
            raise _classify(root, error) from error
        try:
            child = os.open(component, DIRECTORY_FLAGS, dir_fd=fd)
        except OSError as error:
            _close_unless(fd, root_fd)
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PathConflict(error.errno, "not a folder (or a link)", component) from error
            raise _classify(root, error) from error
        if created:
            try:
                permissions.apply_to_folder(child)
            except OSError as error:
                os.close(child)
                _close_unless(fd, root_fd)
                raise _classify(root, error) from error
            _fsync_folder(fd)
        _close_unless(fd, root_fd)
        fd = child
    return fd


#: Filesystems (by device) that refused an unnamed file: temporary names there.
_NO_TMPFILE: set[int] = set()
#: Unnamed files are linked through /proc/self/fd (without it: temporary names).
_PROC_FD = os.path.isdir("/proc/self/fd")
_TMPFILE_REFUSALS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL})


def _new_file(root: Path, folder_fd: int, name: str, device: int) -> tuple[int, str | None]:
    """An open file for new bytes in the folder: unnamed (O_TMPFILE), so that
    nothing is visible, or left behind by a crash, before it is linked; or,
    where the filesystem cannot, under a temporary name. Returns (fd, name)."""
    if _PROC_FD and device not in _NO_TMPFILE and hasattr(os, "O_TMPFILE"):
        try:
            return os.open(
                ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=folder_fd
            ), None
        except OSError as error:
            if error.errno not in _TMPFILE_REFUSALS:
                raise _classify(root, error) from error
            _NO_TMPFILE.add(device)
    temporary = f"{TEMP_PREFIX}{os.urandom(6).hex()}.{name[:32]}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(temporary, flags, 0o666, dir_fd=folder_fd), temporary
    except OSError as error:
        raise _classify(root, error) from error


def _named_temporaries(device: int) -> bool:
    """Whether new bytes on this filesystem go under temporary names."""
    return not (_PROC_FD and hasattr(os, "O_TMPFILE")) or device in _NO_TMPFILE


def _scratch_name() -> str:
    return f"{TEMP_PREFIX}{os.urandom(6).hex()}"


def _makes_alike(one: int, one_group: int | None, other: int, other_group: int | None) -> bool:
    """Whether files made in the two open folders come out alike: the same
    group given by a setgid folder (or none), the same default ACL."""
    return one_group == other_group and _default_acl(one) == _default_acl(other)


def _default_acl(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, "system.posix_acl_default")
    except OSError:
        return None


def _copy(source: int, target: int, size: int, digest: bool) -> str:
    """Copy `size` bytes; return their SHA-256 when `digest` is set, else "".
    The source is read at explicit offsets: its descriptor may be shared."""
    if digest:
        hasher = hashlib.sha256()
        copied = 0
        while chunk := os.pread(source, CHUNK, copied):
            hasher.update(chunk)
            _write_all(target, chunk)
            copied += len(chunk)
        _check_copied(copied, size)
        return hasher.hexdigest()
    _check_copied(_copy_in_kernel(source, target, size), size)
    return ""


def _copy_in_kernel(source: int, target: int, size: int) -> int:
    """Copy without passing the bytes through Python: copy_file_range (which
    can share blocks, or copy on the server), else sendfile, else read/write."""
    copied = 0
    if _COPY_METHODS["copy_file_range"]:
        try:
            while copied < size and (
                count := os.copy_file_range(source, target, size - copied, copied)
            ):
                copied += count
            return copied
        except OSError as error:
            if copied or error.errno not in _COPY_REFUSALS:
                raise
            _COPY_METHODS["copy_file_range"] = False
    if _COPY_METHODS["sendfile"]:
        try:
            while copied < size and (count := os.sendfile(target, source, copied, size - copied)):
                copied += count
            return copied
        except OSError as error:
            if copied or error.errno not in _COPY_REFUSALS:
                raise
            _COPY_METHODS["sendfile"] = False
    while chunk := os.pread(source, CHUNK, copied):
        _write_all(target, chunk)
        copied += len(chunk)
    return copied


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_COPY_METHODS = {
    "copy_file_range": hasattr(os, "copy_file_range"),
    "sendfile": hasattr(os, "sendfile"),
}
_COPY_REFUSALS = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
)


def _check_copied(copied: int, size: int) -> None:
    if copied != size:  # the source changed under us: EAGAIN, so that it is retried
        raise OSError(
            errno.EAGAIN, f"the source changed while being copied ({copied} of {size} bytes)"
        )


def _same_file(item: _Written, existing: os.stat_result) -> bool:
    """The name already links to the very source being placed (a re-run)."""
    return item.linked_source and existing.st_dev == item.device and existing.st_ino == item.inode


def _link_into_place(temporary: str, name: str, folder_fd: int) -> None:
    """Give the temporary file its final name without ever replacing a file."""
    try:
        os.link(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        # Filesystems without hard links (some SMB/FAT shares): rename after a
        # check. A racing writer could slip in between; both sides check.
        if _stat(name, folder_fd) is not None:
            raise FileExistsError(errno.EEXIST, "exists", name) from error
        os.rename(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)


def _stat(name: str, folder_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same_size(existing: os.stat_result, size: int) -> bool:
    """A regular file of `size` bytes. Anything else (a symbolic link, whose
    size is its target's length, a folder, a FIFO) is never opened to compare."""
    return stat.S_ISREG(existing.st_mode) and existing.st_size == size


def _same_bytes(source: str, name: str, folder_fd: int) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since it was looked at
        os.close(fd)
        return False
    with open(source, "rb", buffering=0) as ours, open(fd, "rb", buffering=0) as theirs:
        while True:
            mine = ours.read(CHUNK)
            if mine != theirs.read(CHUNK):
                return False
            if not mine:
                return True


def _sha256(source: str) -> str:
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_of_fd(fd)
    finally:
        os.close(fd)


def sha256_of_fd(fd: int, head: bytes = b"") -> str:
    """The SHA-256 of an open file's whole content (read with pread), of
    which `head` holds the first bytes when they were read already."""
    digest = hashlib.sha256(head)
    offset = len(head)
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # some network filesystems refuse it
            raise


def _unlink_quietly(name: str, folder_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder_fd)


def _discard(temporary: str, folder_fd: int) -> None:
    """Remove a temporary file after a failure, if the destination lets us
    (a read-only one does not: the daemon's journal removes it later)."""
    with contextlib.suppress(OSError):
        os.unlink(temporary, dir_fd=folder_fd)


def _close_unless(fd: int, keep: int) -> None:
    if fd != keep:
        os.close(fd)


def _unavailable(root: Path, error: OSError) -> DestinationUnavailable:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return DestinationUnavailable(
            str(root), "the folder does not exist (is the share mounted?)"
        )
    return DestinationUnavailable(str(root), error.strerror or str(error))


def _classify(root: Path, error: OSError) -> OSError | DestinationUnavailable:
    """Unavailable-destination errors become `DestinationUnavailable`;
    the rest stay `OSError`s, which callers retry."""
    if isinstance(error, PathConflict):
        return error
    if error.errno in UNAVAILABLE_ERRNOS:
        return _unavailable(root, error)
    return error


def temporaries(folder_fd: int) -> list[str]:
    """Names of the temporary files in the open folder (links and folders
    with such names are not ours, and are left alone)."""
    try:
        with os.scandir(folder_fd) as entries:
            return [
                entry.name
                for entry in entries
                if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False)
            ]
    except OSError:
        return []


def remove_temporaries(folder_fd: int) -> int:
    """Delete the temporary files that an interrupted placement left in the
    open folder; return how many."""
    removed = 0
    for name in temporaries(folder_fd):
        try:
            os.unlink(name, dir_fd=folder_fd)
            removed += 1
        except OSError:
            pass  # gone already, or the folder is read-only: try again later
    return removed


def remove_scratch_folders(root_fd: int) -> tuple[int, bool]:
    """Delete the scratch folders that interrupted placements left below the
    open destination root (see `_Batch.temporary_folder`), with the temporary
    files in them; return how many files were removed and whether some stay.
    Each is opened without following a link: a link or anything else a lab
    put under such a name is left alone, as are its own files there."""
    removed, left = 0, False
    try:
        names = [name for name in os.listdir(root_fd) if name.startswith(TEMP_PREFIX)]
    except OSError:
        return 0, False
    for name in names:
        try:
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=root_fd)
        except OSError:
            continue  # a file, a link, or gone
        try:
            removed += remove_temporaries(fd)
            left = left or bool(temporaries(fd))
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # (not empty: the lab's own files stay)
            os.rmdir(name, dir_fd=root_fd)
    return removed, left
