"""The least work of `sort` and of `run --once`, written plainly in Python.

    python scripts/lib/floor.py copy SRC DEST     (what `sort` must do)
    python scripts/lib/floor.py move INBOX DEST   (what `run --once` must do)

scripts/bench times this beside dicom-watcher, as a reference: what this
machine, this Python and this disk cost for the work the commands cannot
leave out, with none of the rest (rules, templates, name conflicts, journal,
manifest, retries, logs, error handling). Each file's header is read with
dicom-watcher's own reader (`headers.read_open`) and the file laid out as the bench's
template does ({PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm), on
every core, with the same durable writes:

- copy: per file open, fstat, the header's first read, an unnamed file
  (O_TMPFILE) in its folder, copy_file_range; per 1,024 files one syncfs,
  then each copy linked under its name, then one syncfs for the names. Each
  worker copies up to two chunks ahead while a thread of its own flushes
  and names the ones before (most of a chunk's time is the disk's).
- move: the header and a SHA-256 (the manifest's) of every file first, as a
  study is read whole before it is placed; then per 1,024 files a hard link
  into the lab's tree, one syncfs, the inbox's names removed, one syncfs.

It expects the bench's data (the three fields present) and stops with an
error on anything else.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

from watcher import headers
from watcher.placement import _syncfs as syncfs

FIELDS = ("PatientID", "SeriesNumber", "InstanceNumber")
TAGS = headers.tags_for(FIELDS)
CHUNK = 1024
#: Chunks a worker copies ahead of the one whose flushes it waits for.
AHEAD = 2
READ_CHUNK = 128


def where(path: str, fd: int, digest: bool) -> tuple[str, str, headers.Instance]:
    """(folder, name, the instance as read) of one open file, from its header."""
    instance = headers.read_open(fd, path, TAGS, digest)
    values = instance.values
    folder = f"{values['PatientID']}/{int(values['SeriesNumber']):03d}"
    return folder, f"{int(values['InstanceNumber']):05d}.dcm", instance


class Folders:
    """Open handles on the destination's folders, made as needed."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[str, int] = {}

    def get(self, folder: str) -> int:
        fd = self.fds.get(folder)
        if fd is None:
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)
            fd = os.open(os.path.join(self.root, folder), os.O_RDONLY | os.O_DIRECTORY)
            self.fds[folder] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def copy_chunks(jobs: list[tuple[str, str, list[str]]]) -> int:
    """Copy a worker's share of chunks, up to two chunks ahead of the one
    whose flushes it waits for (as `sort` does)."""
    done = 0
    flushing: collections.deque[Future[int]] = collections.deque()
    with ThreadPoolExecutor(1) as flusher:
        for job in jobs:
            written, folders = copy_chunk(job)
            flushing.append(flusher.submit(name_chunk, written, folders))
            while len(flushing) > AHEAD:
                done += flushing.popleft().result()
        while flushing:
            done += flushing.popleft().result()
    return done


def copy_chunk(job: tuple[str, str, list[str]]) -> tuple[list[tuple[int, int, str]], Folders]:
    """Copy a chunk's files into unnamed files: (each file's descriptor, its
    folder's and its name), with the folders held open."""
    source, dest, names = job
    folders = Folders(dest)
    written: list[tuple[int, int, str]] = []
    for entry in names:
        path = os.path.join(source, entry)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            folder, name, instance = where(path, fd, digest=False)
            folder_fd = folders.get(folder)
            out = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=folder_fd)
            size, copied = instance.size, 0
            while copied < size:
                step = os.copy_file_range(fd, out, size - copied)
                if step == 0:
                    raise SystemExit(f"floor: {path} shrank while it was copied")
                copied += step
        finally:
            os.close(fd)
        written.append((out, folder_fd, name))
    return written, folders


def name_chunk(written: list[tuple[int, int, str]], folders: Folders) -> int:
    """Flush a copied chunk, link its files under their names, flush those."""
    syncfs(written[0][0])
    for out, folder_fd, name in written:
        os.link(f"/proc/self/fd/{out}", name, dst_dir_fd=folder_fd)
        os.close(out)
    syncfs(written[0][1])
    folders.close()
    return len(written)


def read_chunk(job: tuple[str, list[str]]) -> list[tuple[str, str, str, str]]:
    source, names = job
    found = []
    for entry in names:
        path = os.path.join(source, entry)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            folder, name, instance = where(path, fd, digest=True)
            found.append((entry, folder, name, instance.sha256))
        finally:
            os.close(fd)
    return found


def move_chunk(job: tuple[str, str, list[tuple[str, str, str, str]]]) -> int:
    source, dest, items = job
    folders = Folders(dest)
    inbox = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    for entry, folder, name, _ in items:
        os.link(entry, name, src_dir_fd=inbox, dst_dir_fd=folders.get(folder))
    syncfs(inbox)
    for entry, *_ in items:
        os.unlink(entry, dir_fd=inbox)
    syncfs(inbox)
    os.close(inbox)
    folders.close()
    return len(items)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("copy", "move"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    mode, source, dest = argv
    began = time.perf_counter()
    names = sorted(os.listdir(source))
    context = multiprocessing.get_context("fork")
    with context.Pool(os.cpu_count() or 1) as pool:
        if mode == "copy":
            jobs = [(source, dest, names[i : i + CHUNK]) for i in range(0, len(names), CHUNK)]
            workers = os.cpu_count() or 1
            shares = [jobs[worker::workers] for worker in range(workers)]
            done = sum(pool.imap_unordered(copy_chunks, shares))
        else:
            reads = [(source, names[i : i + READ_CHUNK]) for i in range(0, len(names), READ_CHUNK)]
            items = [item for part in pool.imap(read_chunk, reads) for item in part]
            items.sort(key=lambda item: item[1])
            moves = [(source, dest, items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
            done = sum(pool.imap_unordered(move_chunk, moves))
    print(f"floor {mode}: {done:,} files in {time.perf_counter() - began:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
