"""The sort engine: from files to placed copies, shared by `sort` and the daemon.

Data flows one way: file -> `Instance` (headers) -> routes (rules) ->
placements (placement, with retries). Nothing here reads a clock or decides
about studies; the daemon does that on top.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from watcher import headers
from watcher.errors import DestinationUnavailable, NotRoutable
from watcher.logs import kv
from watcher.placement import (
    TEMP_PREFIX,
    FolderHandles,
    Job,
    PathConflict,
    Permissions,
    Placement,
    batch_placement,
    open_at_once,
    place,
)
from watcher.rules import Route, RuleSet

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger(__name__)

#: Errors worth an immediate retry: the NAS hiccuped, the write may succeed now.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.EINTR,
        errno.EBUSY,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
    }
)


def is_transient(error: BaseException) -> bool:
    return (
        isinstance(error, OSError)
        and not isinstance(error, DestinationUnavailable | PathConflict)
        and (error.errno in TRANSIENT_ERRNOS or isinstance(error, TimeoutError))
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Immediate retries of transient write errors: capped in attempts and time."""

    attempts: int = 5
    max_seconds: float = 60.0
    first_wait: float = 0.5
    max_wait: float = 10.0
    sleep: Callable[[float], None] = time.sleep

    def retrying(self) -> tenacity.Retrying:
        import tenacity  # on first use: a run whose writes all succeed never needs it

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_after_delay(self.max_seconds),
            wait=tenacity.wait_exponential(multiplier=self.first_wait, max=self.max_wait),
            sleep=self.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(kv("write_retry", attempt=state.attempt_number, error=error))


def place_instance(
    instance: headers.Instance,
    routes: Iterable[Route],
    *,
    move: bool = False,
    retry: RetryPolicy | None = None,
    digest: bool | None = None,
) -> list[Placement]:
    """Place one instance at every route; with `move`, then remove the source.

    `digest` asks for each copy's SHA-256 (default: when the rule keeps a
    manifest). The source is removed only after every copy is durable. Raises
    `DestinationUnavailable` or `OSError` (after retries) and leaves the
    source in place; copies already made are found as "present" next time.
    """
    routes = list(routes)
    retrying = (retry or RetryPolicy()).retrying()
    link = move and len(routes) == 1
    placements = []
    failure: BaseException | None = None
    for route in routes:  # every lab that can take its copy gets it now
        job = _job(instance, route, link, digest)
        try:
            placement = retrying(
                place,
                job.source,
                job.root,
                job.relative,
                link=job.link,
                digest=job.digest,
                permissions=job.permissions,
            )
        except (OSError, DestinationUnavailable) as error:
            failure = failure or error
            continue
        placements.append(placement)
        _warn_if_beside(instance, placement)
    if failure is not None:
        raise failure
    if move:
        remove_source(instance.path)
    return placements


def _job(
    instance: headers.Instance,
    route: Route,
    link: bool,
    digest: bool | None,
    source_fd: int = -1,
) -> Job:
    rule = route.rule
    return Job(
        source=instance.path,
        root=rule.destination,
        relative=route.relative_path,
        link=link,
        digest=rule.manifest if digest is None else digest,
        permissions=Permissions(rule.group, rule.file_mode, rule.folder_mode),
        anchor=rule.anchor,
        beneath=rule.beneath,
        known_sha256=instance.sha256,
        known_as_of=(instance.size, instance.mtime_ns),
        source_fd=source_fd,
    )


class ManyPlacement:
    """`place_instance` for many instances, with one flush per filesystem
    and per folder (`placement.BatchPlacement`, with its `writeback`)
    instead of one per file. `source_fds`, when given, holds an open
    descriptor of each instance's file (the caller closes them), to copy from.

    `place()` returns, per instance, its placements or the error that kept
    it (its source then stays). Instances that met a transient error are
    tried again alone, with retries. With `move`, each source whose copies
    are all durable is removed, and its folder flushed once (a source that
    cannot be removed stays, and its outcome is that error); with
    `flush_sources=False` the caller flushes the sources' folders itself,
    once for many batches, before it counts on their removal.

    `place()` is `write()`, which puts the bytes on their filesystems,
    unnamed, then `finish()`, which does the rest. Between them, `flush()`
    makes the bytes durable, which is most of the time: another thread can
    do it while the caller writes the next batch (see `BatchPlacement`).
    `abandon()` drops what is written when `finish()` will not be called.
    """

    def __init__(
        self,
        items: Sequence[tuple[headers.Instance, list[Route]]],
        *,
        move: bool = False,
        retry: RetryPolicy | None = None,
        digest: bool | None = None,
        writeback: bool = False,
        source_fds: Sequence[int] = (),
        flush_sources: bool = True,
    ) -> None:
        self.items = items
        self.move = move
        self.retry = retry
        self.digest = digest
        self.flush_sources = flush_sources
        jobs: list[Job] = []
        self.owners: list[int] = []
        for index, (instance, routes) in enumerate(items):
            link = move and len(routes) == 1
            source_fd = source_fds[index] if source_fds else -1
            for route in routes:
                jobs.append(_job(instance, route, link, digest, source_fd))
                self.owners.append(index)
        self.batch = batch_placement(jobs, writeback)

    def place(self) -> list[list[Placement] | BaseException]:
        self.write()
        return self.finish()

    def write(self) -> None:
        self.batch.write()

    def flush(self) -> None:
        self.batch.flush()

    def abandon(self) -> None:
        self.batch.abandon()

    def finish(self) -> list[list[Placement] | BaseException]:
        items, move, retry, digest = self.items, self.move, self.retry, self.digest
        placed: list[list[Placement]] = [[] for _ in items]
        failed: dict[int, BaseException] = {}
        for owner, result in zip(self.owners, self.batch.finish(), strict=True):
            if isinstance(result, BaseException):
                failed.setdefault(owner, result)
            else:
                placed[owner].append(result)
        for index, error in list(failed.items()):
            if is_transient(error):
                instance, routes = items[index]
                try:
                    placed[index] = place_instance(instance, routes, retry=retry, digest=digest)
                    del failed[index]
                except (OSError, DestinationUnavailable) as again:
                    failed[index] = again
        outcomes: list[list[Placement] | BaseException] = []
        with FolderHandles() as sources:  # removed by name: a path looked up once a folder
            for index, (instance, _) in enumerate(items):
                if index in failed:
                    outcomes.append(failed[index])
                    continue
                for placement in placed[index]:
                    _warn_if_beside(instance, placement)
                if move:
                    folder, name = os.path.split(instance.path)
                    try:
                        os.unlink(name, dir_fd=sources.get(folder))
                    except FileNotFoundError:  # (gone, or its folder with it)
                        pass
                    except OSError as error:  # (an inbox it may not write): the source stays
                        why = f"placed, but cannot be removed: {error.strerror}"
                        outcomes.append(OSError(error.errno, why, instance.path))
                        continue
                outcomes.append(placed[index])
            if self.flush_sources:
                sources.flush()
        return outcomes


def remove_source(path: str) -> None:
    """Remove a source file whose copies are durable, and flush its folder."""
    os.unlink(path)
    _fsync_folder_path(os.path.dirname(path) or ".")


def flush_folders(folders: Iterable[str]) -> None:
    """Make the removals (and new names) in these folders durable; a folder
    removed since has nothing left to flush."""
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            _fsync_folder_path(folder)


def _fsync_folder_path(path: str) -> None:
    folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(folder)


#: Files placed together, with one flush per filesystem and folder.
BATCH = 1024
#: Below this many files, headers are read in-process: a pool costs more.
POOL_THRESHOLD = 256


def read_many(
    paths: Sequence[str],
    tags: list[int],
    pool: Executor | None = None,
    digest: bool = False,
    writeback: bool = False,
) -> list[headers.Instance | NotRoutable | OSError]:
    """Read many headers, on every core when a pool is given and it is worth
    it; `digest` and `writeback` as `headers.read_instance` takes them."""
    return list(iter_read(paths, tags, pool, digest, writeback))


def iter_read(
    paths: Sequence[str],
    tags: list[int],
    pool: Executor | None = None,
    digest: bool = False,
    writeback: bool = False,
) -> Iterator[headers.Instance | NotRoutable | OSError]:
    """Like `read_many`, lazily: with a pool, every read is submitted at once
    and runs while the caller places what came back first."""
    if pool is None or len(paths) < POOL_THRESHOLD:
        return (_read_one(path, tags, digest, writeback) for path in paths)
    chunk = max(16, min(128, len(paths) // 32))
    count = len(paths)
    return pool.map(
        _read_one, paths, [tags] * count, [digest] * count, [writeback] * count, chunksize=chunk
    )


def _read_one(
    path: str, tags: list[int], digest: bool = False, writeback: bool = False
) -> headers.Instance | NotRoutable | OSError:
    try:
        return headers.read_instance(path, tags, digest, writeback)
    except NotRoutable as error:
        return error
    except OSError as error:
        return OSError(error.errno, error.strerror, error.filename)


def _read_held(path: str, tags: list[int]) -> tuple[headers.Instance | NotRoutable | OSError, int]:
    """Read a header and keep the file open: (what `_read_one` gives, the
    descriptor or -1 when the file could not be opened or is not routable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        return OSError(error.errno, error.strerror, error.filename), -1
    try:
        return headers.read_open(fd, path, tags), fd
    except NotRoutable as error:
        os.close(fd)
        return error, -1
    except OSError as error:
        os.close(fd)
        return OSError(error.errno, error.strerror, path), -1


def header_pool(threads_running: bool = True) -> Executor:
    """A process pool for header reading, whose workers die with the process
    that made them. Beside other threads (the daemon's) workers are spawned,
    which costs a second of start-up; a single-threaded caller forks them."""
    context = multiprocessing.get_context("spawn" if threads_running else "fork")
    return ProcessPoolExecutor(
        max_workers=os.cpu_count() or 1, mp_context=context, initializer=_init_worker
    )


def _init_worker() -> None:
    # A forked worker inherits the parent's SIGTERM handler (the daemon's sets
    # its stop flag): reset, so that SIGTERM ends a worker, whether from the
    # pool ending its workers or from its parent's death below.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):  # Linux only
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(0)


PR_SET_PDEATHSIG = 1


def _warn_if_beside(instance: headers.Instance, placement: Placement) -> None:
    if placement.beside is None or placement.outcome != "placed":
        return
    try:
        other = headers.read_instance(placement.beside).sop_instance_uid
    except (NotRoutable, OSError):
        other = ""
    if other == instance.sop_instance_uid:
        log.warning(
            kv(
                "same_uid_other_bytes",
                sop=instance.sop_instance_uid,
                kept_beside=placement.beside,
                placed_as=placement.path,
            )
        )
    else:
        log.info(kv("name_taken", path=placement.beside, placed_as=placement.path))


def iter_files(sources: Iterable[str | Path]) -> Iterator[str]:
    """Every file under the given files and folders, in a stable order,
    skipping dicom-watcher's own temporary files."""
    for source in sources:
        source = os.fspath(source)
        if not os.path.isdir(source):
            yield source
            continue
        for folder, folders, files in os.walk(source):
            folders.sort()
            for name in sorted(files):
                if not name.startswith(TEMP_PREFIX):
                    yield os.path.join(folder, name)


@dataclass
class Summary:
    """What a sort did, for its closing lines and its exit status."""

    files: int = 0
    placed: int = 0
    present: int = 0
    bytes: int = 0
    skipped: int = 0
    unmatched: list[str] = field(default_factory=list)
    not_routable: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: Summary) -> None:
        """Add what another part of the same sort did."""
        for name in ("files", "placed", "present", "bytes", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unmatched += other.unmatched
        self.not_routable += other.not_routable
        self.failed += other.failed

    @property
    def complete(self) -> bool:
        """True when every file was placed (or already there, or skipped by --subject)."""
        return not (self.unmatched or self.not_routable or self.failed)

    def lines(self) -> list[str]:
        out = [
            f"files={self.files} placed={self.placed} already_present={self.present} "
            f"not_routable={len(self.not_routable)} unmatched={len(self.unmatched)} "
            f"failed={len(self.failed)} skipped={self.skipped} bytes={self.bytes}"
        ]
        reasons = Counter(_reason_kind(reason) for _, reason in self.not_routable)
        out += [f"  not routable: {count} x {reason}" for reason, count in reasons.most_common()]
        out += [f"  failed: {path}: {reason}" for path, reason in self.failed[:20]]
        return out


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def _sort_share(sorter: Sorter, paths: Sequence[str]) -> Summary:
    """In a pool worker: sort one share of the files and return what it did."""
    sorter._sort_here(paths)
    return sorter.summary


#: A pool worker's share of a sort is at most this many batches: enough for
#: the writing of each to overlap the flushes of the one before, few enough
#: for the progress shown.
SHARE_BATCHES = 8


def _shares(paths: Sequence[str], workers: int) -> list[Sequence[str]]:
    """Cut a sort into shares of about the same size, the same number for
    each worker, none of more than `SHARE_BATCHES` batches."""
    rounds = -(-len(paths) // (workers * SHARE_BATCHES * BATCH))
    count = max(1, min(len(paths), workers * rounds))
    size = -(-len(paths) // count)
    return [paths[start : start + size] for start in range(0, len(paths), size)]


#: Batches a sort writes ahead of the one it waits for, at most: on a
#: study of large files, two keep the disk busy while the last are written.
AHEAD = 2


def _batches_ahead(step: int) -> int:
    """How many batches of `step` files a sort may write ahead of the one
    it waits for: each batch open holds up to two descriptors a file (the
    source and its copy), and a quarter of the open-file limit stays free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return AHEAD
    return max(0, min(AHEAD, (soft * 3 // 4) // (2 * step) - 1))


@dataclass
class _SortBatch:
    """One batch of a sort: its files held open, and their placing."""

    size: int
    items: list[tuple[headers.Instance, list[Route]]] = field(default_factory=list)
    item_fds: list[int] = field(default_factory=list)
    #: Every descriptor it holds (also those of files not placed).
    fds: list[int] = field(default_factory=list)
    #: Written and not yet named (None once named, or when nothing is placed).
    placing: ManyPlacement | None = None
    #: The placing's `flush`, handed to the flushing thread.
    flushed: Future[None] | None = None

    def finish(self) -> list[list[Placement] | BaseException]:
        """Once its flush is done, name what the batch wrote (in the calling
        thread); per item, its outcome."""
        placing, self.placing = self.placing, None
        if placing is None:
            return []
        try:
            if self.flushed is not None:
                self.flushed.result()
        except BaseException:
            placing.abandon()
            raise
        return placing.finish()

    def close(self) -> None:
        """Let go of the batch: one handed over for its flush is placed
        (a sort stopped by an error places whole what it began), one not yet
        handed over is dropped; then its files are closed."""
        try:
            if self.placing is not None and self.flushed is not None:
                self.finish()
            elif self.placing is not None:
                self.placing.abandon()
        finally:
            fds, self.fds = self.fds, []
            for fd in fds:
                os.close(fd)


@dataclass
class Sorter:
    """Sorts files by a rule set, as `dicom-watcher sort` does."""

    rules: RuleSet
    subject: str | None = None
    move: bool = False
    dry_run: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    summary: Summary = field(default_factory=Summary)

    def __post_init__(self) -> None:
        self.tags = headers.tags_for(self.rules.fields)

    def sort_files(
        self,
        paths: Sequence[str],
        pool: Executor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Sort files in batches: headers read, then each batch placed with
        one flush per filesystem. With a `pool`, its workers sort shares of
        several batches side by side, each from reading to placing (two
        workers placing one name at once is safe: see `placement`)."""
        if pool is None or self.dry_run or len(paths) < POOL_THRESHOLD:
            self._sort_here(paths, progress)
            return
        shares = _shares(paths, os.cpu_count() or 1)
        worker = replace(self, summary=Summary())
        for share, summary in zip(
            shares, pool.map(_sort_share, [worker] * len(shares), shares), strict=True
        ):
            self.summary.merge(summary)
            if progress is not None:
                progress(len(share))

    def _sort_here(
        self, paths: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> None:
        # Each file is opened once: its header is read, and it is copied,
        # from one descriptor, held until its batch is placed. Most of a
        # batch's time is the wait for its data flush: meanwhile the next
        # batches are read and their bytes written, while a thread makes
        # the batches before durable, in order. This thread names them: a
        # thread naming files beside it would make both wait at every file.
        step = min(BATCH, open_at_once())
        ahead = _batches_ahead(step)
        in_flight: collections.deque[_SortBatch] = collections.deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush") as flusher:
            try:
                for start in range(0, len(paths), step):
                    batch = self._begin(paths[start : start + step])
                    in_flight.append(batch)
                    if batch.placing is not None:
                        batch.flushed = flusher.submit(batch.placing.flush)
                    while len(in_flight) > ahead:
                        self._take(in_flight.popleft(), progress)
                while in_flight:
                    self._take(in_flight.popleft(), progress)
            finally:  # after an error: the batches begun are placed, then let go
                for batch in in_flight:
                    batch.close()

    def _begin(self, paths: Sequence[str]) -> _SortBatch:
        """Read and route a batch, and write the bytes it places, unnamed."""
        batch = _SortBatch(len(paths))
        try:
            for path in paths:
                result, fd = _read_held(path, self.tags)
                if fd >= 0:
                    batch.fds.append(fd)
                item = self._route(path, result)
                if item is not None:
                    batch.items.append(item)
                    batch.item_fds.append(fd)
            if batch.items:
                batch.placing = ManyPlacement(
                    batch.items,
                    move=self.move,
                    retry=self.retry,
                    digest=False,
                    source_fds=batch.item_fds,
                )
                batch.placing.write()
        except BaseException:
            batch.close()
            raise
        return batch

    def _take(self, batch: _SortBatch, progress: Callable[[int], None] | None) -> None:
        """Place a batch once it is durable, and count what it did."""
        try:
            outcomes = batch.finish()  # none when it places nothing
            for (instance, _), outcome in zip(batch.items, outcomes, strict=True):
                self._count(instance.path, outcome)
        finally:
            batch.close()
        if progress is not None:
            progress(batch.size)

    def sort_file(self, path: str) -> None:
        self.sort_files([path])

    def _route(
        self, path: str, result: headers.Instance | NotRoutable | OSError
    ) -> tuple[headers.Instance, list[Route]] | None:
        self.summary.files += 1
        if isinstance(result, NotRoutable):
            log.warning(kv("not_routable", path=path, reason=result.reason))
            self.summary.not_routable.append((path, result.reason))
            return None
        if isinstance(result, OSError):
            self.summary.failed.append((path, f"cannot read: {result.strerror or result}"))
            return None
        instance = result
        if self.subject is not None and instance.values.get("PatientID") != self.subject:
            self.summary.skipped += 1
            return None
        routes = self.rules.route(instance.values)
        if not routes:
            log.info(kv("unmatched", path=path, study=instance.study_instance_uid))
            self.summary.unmatched.append(path)
            return None
        if self.dry_run:
            for route in routes:
                print(f"{path} -> {route.rule.destination / route.relative_path}")
            self.summary.placed += len(routes)
            return None
        return instance, routes

    def _count(self, path: str, outcome: list[Placement] | BaseException) -> None:
        if isinstance(outcome, DestinationUnavailable):
            self.summary.failed.append((path, str(outcome)))
            return
        if isinstance(outcome, OSError):
            self.summary.failed.append(
                (path, f"{outcome.strerror or outcome} ({outcome.filename or ''})")
            )
            return
        if isinstance(outcome, BaseException):
            self.summary.failed.append((path, str(outcome)))
            return
        for placement in outcome:
            if placement.outcome == "placed":
                self.summary.placed += 1
                self.summary.bytes += placement.size
            else:
                self.summary.present += 1
