"""The manifest of a placed study: what arrived, for lab scripts, without a database.

`manifest.json` in the study's folder of a lab tree lists every instance
with its SOPInstanceUID, series, path (relative to the manifest), size and
SHA-256. It is written after the study's files, atomically (a new temporary
name, flush, rename), and brought up to date when late instances arrive, so
a script that reads it sees only files that are whole. Its `hooks` list has
each hook job of the study: state (pending, running, failed, done, gave_up),
exit status, attempts and times.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.placement import TEMP_PREFIX, Permissions, Placement
from watcher.rules import Rule
from watcher.template import safe_component

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True, slots=True)
class Entry:
    """One placed instance, as the manifest lists it."""

    sop_instance_uid: str
    series_instance_uid: str
    series_number: str
    placement: Placement


def manifest_path(rule: Rule, relative_path: str, study_uid: str) -> Path:
    """`manifest.json` in the study's folder; when the template puts studies
    straight into the destination, `manifest_<StudyInstanceUID>.json` there."""
    folder = rule.path.study_folder(relative_path)
    if folder:
        return rule.destination / folder / MANIFEST_NAME
    return rule.destination / f"manifest_{safe_component(study_uid)}.json"


#: An existing manifest larger than this is not read (nor replaced): about
#: 150,000 instances; parsing takes some 20 times its size in memory.
MAX_MANIFEST_BYTES = 32 << 20


class ManifestRefused(OSError):
    """What is at a manifest's name is not a manifest the daemon may read
    and replace: a link, a FIFO, a folder, a device, or a huge file."""


def write_manifest(
    path: Path,
    *,
    study_uid: str,
    rule: Rule,
    patient: str,
    entries: Iterable[Entry],
    clock: float | None = None,
) -> dict[str, object]:
    """Merge `entries` into the manifest at `path` (new or existing) and
    replace it atomically. Returns the summary it wrote: all but the list of
    instances.

    The study's folder is reached as placement reaches it (from a lab's
    root, never through a link); the manifest is read and written only
    through that handle, and only as a regular file. Several daemons
    (receiver nodes) may update one manifest: the merge runs under a lock on
    the study's folder, so none loses another's entries (where the
    filesystem has such locks; NFS does not for folders).
    """
    folder = _open_folder(rule, path.parent)
    try:
        _lock(folder)
        return _merge_and_replace(folder, path, study_uid, rule, patient, entries, clock)
    finally:
        os.close(folder)  # closing releases the lock


def update_hooks(path: Path, *, rule: Rule, records: Iterable[dict[str, object]]) -> bool:
    """Bring the `hooks` list of an existing manifest up to date with
    `records` (by job id), so a lab script sees whether its conversion ran.
    False when there is no manifest at `path` to update. Raises
    `ManifestRefused` at once when the folder is locked (try again later)."""
    folder = _open_folder(rule, path.parent)
    try:
        _lock(folder, wait=0.0)
        previous = _read_existing(folder, path.name)
        if previous is None:
            return False
        _merge_and_replace(
            folder,
            path,
            str(previous.get("study_instance_uid", "")),
            rule,
            str(previous.get("patient_id", "")),
            (),
            None,
            list(records),
        )
        return True
    finally:
        os.close(folder)


def _open_folder(rule: Rule, folder: Path) -> int:
    """A handle on the manifest's folder, below the rule's destination."""
    return rule.folder(folder).open()


#: How long a manifest waits for its folder's lock: another daemon holds it
#: for a moment; whoever holds it longer (a lab's process) makes the write
#: fail, to be tried again, instead of stalling the daemon.
LOCK_WAIT_SECONDS = 2.0


def _lock(fd: int, wait: float = LOCK_WAIT_SECONDS) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ManifestRefused(
                    errno.EWOULDBLOCK,
                    f"the study's folder stayed locked by another process for {wait:.0f} s",
                ) from None
            time.sleep(0.02)
        except OSError as error:  # a share without folder locks: go on unlocked
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            return


def _read_existing(folder: int, name: str) -> dict[str, Any] | None:
    """The manifest already at `name`, or None; never opens anything but a
    regular file, never blocks, reads at most `MAX_MANIFEST_BYTES`."""
    if not _existing(folder, name):
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=folder)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestRefused(errno.EEXIST, f"{name} is not a regular file: left as it is")
        data = os.read(fd, MAX_MANIFEST_BYTES + 1)
        while len(data) <= MAX_MANIFEST_BYTES and (more := os.read(fd, 1 << 20)):
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestRefused(errno.EFBIG, f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        previous = json.loads(data)
    except (ValueError, RecursionError):  # not a manifest (a lab may have put anything there)
        return None
    return previous if isinstance(previous, dict) else None


def _existing(folder: int, name: str) -> bool:
    """Whether a file is at `name`; raises `ManifestRefused` when what is
    there is not a regular file."""
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ManifestRefused(errno.EEXIST, f"{name} is {kind}: left as it is, not replaced")
    return True


def _merge_and_replace(
    folder: int,
    path: Path,
    study_uid: str,
    rule: Rule,
    patient: str,
    entries: Iterable[Entry],
    clock: float | None,
    hook_records: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    # Per relative path: the instance's line of JSON and its size.
    lines: dict[str, tuple[str, int]] = {}
    previous = _read_existing(folder, path.name)
    try:
        for item in (previous or {}).get("instances", []):
            lines[str(item["path"])] = (_ENCODE(item), int(item["size"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    hooks: dict[str, dict[str, object]] = {}
    earlier = (previous or {}).get("hooks", [])
    for record in earlier if isinstance(earlier, list) else []:
        if isinstance(record, dict) and "id" in record:
            hooks[str(record["id"])] = record
    for record in hook_records or ():
        hooks[str(record["id"])] = {**hooks.get(str(record["id"]), {}), **record}
    prefix = f"{path.parent}/"
    for entry in entries:
        placement = entry.placement
        placed = f"{placement.folder}/{placement.name}"
        if placed.startswith(prefix):  # always, but for odd templates
            relative = placed[len(prefix) :]
        else:
            relative = os.path.relpath(placed, path.parent)
        lines[relative] = (_instance_line(entry, relative), placement.size)
    summary: dict[str, object] = {
        "study_instance_uid": study_uid,
        "lab": rule.lab_name,
        "rule": rule.name,
        "patient_id": patient,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock)),
        "files": len(lines),
        "bytes": sum(size for _, size in lines.values()),
    }
    if hooks:
        summary["hooks"] = list(hooks.values())
    listed = [lines[relative][0] for relative in sorted(lines)]
    _replace(
        folder,
        path.name,
        _to_json(summary, listed),
        Permissions(rule.group, rule.file_mode, rule.folder_mode),
    )
    return summary


_ENCODE = json.JSONEncoder(ensure_ascii=False).encode
_STRING = json.encoder.encode_basestring  # the C encoder's strings, as `_ENCODE` writes them


def _instance_line(entry: Entry, relative: str) -> str:
    """An instance's entry, as `_ENCODE` would write its dict (a study has
    thousands: one format call each instead of the encoder's)."""
    placement = entry.placement
    return (
        f'{{"sop_instance_uid": {_STRING(entry.sop_instance_uid)}, '
        f'"series_instance_uid": {_STRING(entry.series_instance_uid)}, '
        f'"series_number": {_STRING(entry.series_number)}, '
        f'"path": {_STRING(relative)}, "size": {int(placement.size)}, '
        f'"sha256": {_STRING(placement.sha256)}}}'
    )


def _to_json(summary: dict[str, object], listed: list[str]) -> str:
    """The summary, then the instances one per line: readable with `grep`."""
    if not listed:
        return _ENCODE({**summary, "instances": []}) + "\n"
    lines = ",\n  ".join(listed)
    return f'{_ENCODE(summary)[:-1]}, "instances": [\n  {lines}\n]}}\n'


def _replace(folder: int, name: str, text: str, permissions: Permissions) -> None:
    """Write `text` under a new temporary name in the folder (never a name
    someone else made), then rename it over `name`, durably."""
    temporary = f"{TEMP_PREFIX}{os.urandom(6).hex()}.{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o666, dir_fd=folder)
    try:
        try:
            with open(fd, "w", encoding="utf-8", closefd=False) as handle:
                handle.write(text)
            permissions.apply_to_file(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        _existing(folder, name)  # swapped for a link or a FIFO meanwhile: left alone
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        # A full or failing lab share: leave no partial manifest behind.
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise
    os.fsync(folder)
