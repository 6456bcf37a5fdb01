"""Durable placement of one file into a lab tree: the one module that writes there.

`place` copies a file under a destination root so that:

- the root is never created (an unmounted NAS is never filled on the local
  disk): a missing root raises `DestinationUnavailable`, as do a full, read-only
  or forbidden one;
- folders below the root are created one at a time relative to an open
  handle on the root, never following a symbolic link, so a name can never
  lead outside the root;
- bytes go to a temporary name in the target folder (`TEMP_PREFIX...`), are
  flushed to disk, then linked to the final name, which fails rather than
  replacing an existing file; the folder is flushed last;
- a file already there with the same bytes is left alone ("present"); a
  different file at that name makes the new one go beside it under a suffix
  derived from its content, so the choice is the same on every run.

Other `OSError`s (EIO, ESTALE, timeouts) propagate: they are worth retrying.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

    path: Path
    outcome: Outcome
    size: int
    #: Set when the plain name held other bytes and this one went beside it.
    beside: Path | None = None
    #: SHA-256 of the bytes, when asked for.
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Group and modes given to what a rule creates (None: leave as made)."""

    group: int | None = None
    file_mode: int | None = None
    folder_mode: int | None = None

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
    *folders, name = relative.split("/")
    try:
        root_fd = os.open(root, DIRECTORY_FLAGS)
    except OSError as error:
        raise _unavailable(root, error) from error
    try:
        folder_fd = _open_folders(root, root_fd, folders, permissions)
        try:
            return _place_in(source, root, folder_fd, folders, name, link, digest, permissions)
        finally:
            if folder_fd != root_fd:
                os.close(folder_fd)
    finally:
        os.close(root_fd)


def _place_in(
    source: str,
    root: Path,
    folder_fd: int,
    folders: list[str],
    name: str,
    link: bool,
    digest: bool,
    permissions: Permissions,
) -> Placement:
    target = _choose_name(source, root.joinpath(*folders), folder_fd, name, digest)
    if isinstance(target, Placement):
        return target
    candidate, beside, size = target
    temporary, content = _write_temporary(source, root, folder_fd, name, link, permissions)
    try:
        _link_into_place(temporary, candidate, folder_fd)
    except FileExistsError:
        # Someone placed a file under this name since we looked: decide again.
        _unlink_quietly(temporary, folder_fd)
        return _place_in(source, root, folder_fd, folders, name, link, digest, permissions)
    except OSError as error:
        _discard(temporary, folder_fd)
        raise _classify(root, error) from error
    _unlink_quietly(temporary, folder_fd)
    _fsync_folder(folder_fd)
    if digest and not content:
        content = _sha256(source)
    return Placement(root.joinpath(*folders) / candidate, "placed", size, beside, content)


def _choose_name(
    source: str, folder: Path, folder_fd: int, name: str, digest: bool
) -> Placement | tuple[str, Path | None, int]:
    """The name to write under, or the Placement of identical bytes already
    there. Returns (name, the taken name it goes beside, size)."""
    size = os.stat(source).st_size
    existing = _stat(name, folder_fd)
    if existing is None:
        return name, None, size
    if _same_size(existing, size) and _same_bytes(source, name, folder_fd):
        return Placement(folder / name, "present", size, sha256=_sha256(source) if digest else "")
    content = _sha256(source)
    # Other bytes under this name: go beside them, under a name derived from
    # our own content, so that a re-run finds us there again.
    for candidate in (with_suffix(name, content[:12]), with_suffix(name, content)):
        existing = _stat(candidate, folder_fd)
        if existing is None:
            return candidate, folder / name, size
        if _same_size(existing, size) and _same_bytes(source, candidate, folder_fd):
            return Placement(folder / candidate, "present", size, folder / name, content)
    raise FileExistsError(errno.EEXIST, "no free name", str(folder / name))


@dataclass(frozen=True, slots=True)
class Job:
    """One file to place with `place_batch`; the arguments of `place`."""

    source: str
    root: Path
    relative: str
    link: bool = False
    digest: bool = False
    permissions: Permissions = NO_PERMISSIONS


def place_batch(jobs: Sequence[Job]) -> list[Placement | BaseException]:
    """Place many files with the guarantees of `place`, flushing once.

    Every file is written under its temporary name first; then each
    filesystem is flushed once (syncfs), the files are linked into place, and
    each folder is flushed once. Returns, per job, its Placement or the error
    that stopped it (`DestinationUnavailable`, `PathConflict`, `OSError`).
    """
    results: list[Placement | BaseException | None] = [None] * len(jobs)
    handles = _Handles()
    paths: dict[tuple[Path, tuple[str, ...]], Path] = {}
    written: list[tuple[int, int, str, str, str, Path | None, int]] = []
    try:
        for index, job in enumerate(jobs):
            *folders, name = job.relative.split("/")
            key = (job.root, tuple(folders))
            folder = paths.get(key) or paths.setdefault(key, job.root.joinpath(*folders))
            try:
                folder_fd = handles.folder(job.root, folders, job.permissions)
                target = _choose_name(job.source, folder, folder_fd, name, job.digest)
                if isinstance(target, Placement):
                    results[index] = target
                    continue
                candidate, beside, size = target
                temporary, content = _write_temporary(
                    job.source, job.root, folder_fd, name, job.link, job.permissions, flush=False
                )
            except (OSError, DestinationUnavailable) as error:
                results[index] = error
                continue
            written.append((index, folder_fd, temporary, candidate, content, beside, size))
        try:
            _flush_filesystems({fd for _, fd, *_ in written}, [(fd, t) for _, fd, t, *_ in written])
        except OSError as error:
            for index, folder_fd, temporary, *_ in written:
                _discard(temporary, folder_fd)
                results[index] = _classify(jobs[index].root, error)
            written = []
        touched: dict[int, list[int]] = {}
        for index, folder_fd, temporary, candidate, content, beside, size in written:
            job = jobs[index]
            try:
                _link_into_place(temporary, candidate, folder_fd)
            except FileExistsError:
                _discard(temporary, folder_fd)
                try:  # placed by someone else meanwhile: decide again, alone
                    results[index] = place(
                        job.source,
                        job.root,
                        job.relative,
                        link=job.link,
                        digest=job.digest,
                        permissions=job.permissions,
                    )
                except (OSError, DestinationUnavailable) as error:
                    results[index] = error
                continue
            except OSError as error:
                _discard(temporary, folder_fd)
                results[index] = _classify(job.root, error)
                continue
            try:
                _unlink_quietly(temporary, folder_fd)
            except OSError as error:
                # Placed, but its temporary name cannot go (the share turned
                # read-only): an error, so that the caller's journal of this
                # placement is kept and the name removed later.
                results[index] = _classify(job.root, error)
                continue
            touched.setdefault(folder_fd, []).append(index)
            if job.digest and not content:
                content = _sha256(job.source)
            folder = paths[(job.root, tuple(job.relative.split("/")[:-1]))]
            results[index] = Placement(folder / candidate, "placed", size, beside, content)
        for folder_fd, indexes in touched.items():
            try:
                _fsync_folder(folder_fd)
            except OSError as error:
                for index in indexes:
                    results[index] = _classify(jobs[index].root, error)
    finally:
        handles.close()
    return [result if result is not None else OSError("not placed") for result in results]


class _Handles:
    """Open folders of one batch, so each is opened (and made) once."""

    def __init__(self) -> None:
        self.roots: dict[Path, int | DestinationUnavailable] = {}
        self.folders: dict[tuple[Path, tuple[str, ...]], int] = {}

    def folder(self, root: Path, folders: list[str], permissions: Permissions) -> int:
        key = (root, tuple(folders))
        if key in self.folders:
            return self.folders[key]
        if root not in self.roots:
            try:
                self.roots[root] = os.open(root, DIRECTORY_FLAGS)
            except OSError as error:
                self.roots[root] = _unavailable(root, error)
        root_fd = self.roots[root]
        if isinstance(root_fd, DestinationUnavailable):
            raise root_fd
        fd = _open_folders(root, root_fd, folders, permissions)
        self.folders[key] = fd
        return fd

    def close(self) -> None:
        roots = {fd for fd in self.roots.values() if isinstance(fd, int)}
        for fd in set(self.folders.values()) - roots:
            os.close(fd)
        for fd in roots:
            os.close(fd)


def _flush_filesystems(folder_fds: set[int], temporaries: list[tuple[int, str]]) -> None:
    """Make the written temporary files durable: one syncfs per filesystem,
    or one fsync per file where syncfs is not available."""
    by_device: dict[int, int] = {}
    for fd in folder_fds:
        by_device.setdefault(os.fstat(fd).st_dev, fd)
    if _SYNCFS is not None:
        for fd in by_device.values():
            if _SYNCFS(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error))
        return
    for folder_fd, temporary in temporaries:
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs: Callable[[int], int] = libc.syncfs
        return syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


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


def _write_temporary(
    source: str,
    root: Path,
    folder_fd: int,
    name: str,
    link: bool,
    permissions: Permissions,
    flush: bool = True,
) -> tuple[str, str]:
    """Write the bytes under a temporary name, flushed; return it and the
    SHA-256 of what was written ("" when linked instead)."""
    temporary = f"{TEMP_PREFIX}{secrets.token_hex(6)}.{name[:32]}"
    if link and _try_link(source, temporary, folder_fd, permissions, flush):
        return temporary, ""
    digest = hashlib.sha256()
    with open(source, "rb", buffering=0) as inp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            out = os.open(temporary, flags, 0o666, dir_fd=folder_fd)
        except OSError as error:
            raise _classify(root, error) from error
        try:
            while chunk := inp.read(CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            permissions.apply_to_file(out)
            if flush:
                os.fsync(out)
        except OSError as error:
            _unlink_quietly(temporary, folder_fd)
            raise _classify(root, error) from error
        finally:
            os.close(out)
    return temporary, digest.hexdigest()


def _try_link(
    source: str, temporary: str, folder_fd: int, permissions: Permissions, flush: bool
) -> bool:
    try:
        os.link(source, temporary, dst_dir_fd=folder_fd)
    except OSError:
        return False  # another filesystem, or links not allowed: copy instead
    with open(source, "rb") as handle:
        permissions.apply_to_file(handle.fileno())
        if flush:
            os.fsync(handle.fileno())
    return True


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
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    with open(source, "rb", buffering=0) as ours, open(fd, "rb", buffering=0) as theirs:
        while True:
            mine = ours.read(CHUNK)
            if mine != theirs.read(CHUNK):
                return False
            if not mine:
                return True


def _sha256(source: str) -> str:
    digest = hashlib.sha256()
    with open(source, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
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


def remove_temporaries(folder: Path) -> int:
    """Delete temporary files left in `folder` by an interrupted placement."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass  # gone already, or the folder is read-only: try again later
    return removed
