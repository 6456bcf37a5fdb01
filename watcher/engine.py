"""The sort engine: from files to placed copies, shared by `sort` and the daemon.

Data flows one way: file -> `Instance` (headers) -> routes (rules) ->
placements (placement, with retries). Nothing here reads a clock or decides
about studies; the daemon does that on top.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tenacity

from watcher import headers
from watcher.errors import DestinationUnavailable, NotRoutable
from watcher.logs import kv
from watcher.placement import TEMP_PREFIX, PathConflict, Permissions, Placement, place
from watcher.rules import Route, RuleSet

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
    sleep: Callable[[float], None] = tenacity.nap.sleep

    def retrying(self) -> tenacity.Retrying:
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
    for route in routes:
        rule = route.rule
        permissions = Permissions(rule.group, rule.file_mode, rule.folder_mode)
        placements.append(
            retrying(
                place,
                instance.path,
                rule.destination,
                route.relative_path,
                link=link,
                digest=rule.manifest if digest is None else digest,
                permissions=permissions,
            )
        )
        _warn_if_beside(instance, placements[-1])
    if move:
        remove_source(instance.path)
    return placements


def remove_source(path: str) -> None:
    """Remove a source file whose copies are durable, and flush its folder."""
    os.unlink(path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(folder)


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

    def sort_file(self, path: str) -> None:
        self.summary.files += 1
        try:
            instance = headers.read_instance(path, self.tags)
        except NotRoutable as error:
            log.warning(kv("not_routable", path=path, reason=error.reason))
            self.summary.not_routable.append((path, error.reason))
            return
        except OSError as error:
            self.summary.failed.append((path, f"cannot read: {error.strerror or error}"))
            return
        if self.subject is not None and instance.values.get("PatientID") != self.subject:
            self.summary.skipped += 1
            return
        routes = self.rules.route(instance.values)
        if not routes:
            log.info(kv("unmatched", path=path, study=instance.study_instance_uid))
            self.summary.unmatched.append(path)
            return
        if self.dry_run:
            for route in routes:
                print(f"{path} -> {route.rule.destination / route.relative_path}")
            self.summary.placed += len(routes)
            return
        try:
            placements = place_instance(
                instance, routes, move=self.move, retry=self.retry, digest=False
            )
        except DestinationUnavailable as error:
            self.summary.failed.append((path, str(error)))
            return
        except OSError as error:
            self.summary.failed.append(
                (path, f"{error.strerror or error} ({error.filename or ''})")
            )
            return
        for placement in placements:
            if placement.outcome == "placed":
                self.summary.placed += 1
                self.summary.bytes += placement.size
            else:
                self.summary.present += 1
