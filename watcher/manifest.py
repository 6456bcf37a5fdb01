"""The manifest of a placed study: what arrived, for lab scripts, without a database.

`manifest.json` in the study's folder of a lab tree lists every instance
with its SOPInstanceUID, series, path (relative to the manifest), size and
SHA-256. It is written after the study's files, atomically (temporary name,
flush, rename), and brought up to date when late instances arrive, so a
script that reads it sees only files that are whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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

    Several daemons (receiver nodes) may update one manifest: the merge runs
    under a lock on the study's folder, so none loses another's entries
    (where the filesystem has such locks; NFS does not for folders).
    """
    with _locked(path.parent):
        return _merge_and_replace(path, study_uid, rule, patient, entries, clock)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # a share without folder locks: go on unlocked
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _merge_and_replace(
    path: Path,
    study_uid: str,
    rule: Rule,
    patient: str,
    entries: Iterable[Entry],
    clock: float | None,
) -> dict[str, object]:
    # Per relative path: the instance's line of JSON and its size.
    lines: dict[str, tuple[str, int]] = {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        for item in previous.get("instances", []):
            lines[str(item["path"])] = (_ENCODE(item), int(item["size"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        pass
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
    listed = [lines[relative][0] for relative in sorted(lines)]
    _replace(
        path, _to_json(summary, listed), Permissions(rule.group, rule.file_mode, rule.folder_mode)
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


def _replace(path: Path, text: str, permissions: Permissions) -> None:
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}.{path.name}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        try:
            with open(fd, "w", encoding="utf-8", closefd=False) as handle:
                handle.write(text)
            permissions.apply_to_file(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        # A full or failing lab share: leave no partial manifest behind.
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
