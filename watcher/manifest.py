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
    replace it atomically. Returns what was written.

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
    instances: dict[str, dict[str, object]] = {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        for item in previous.get("instances", []):
            instances[str(item["path"])] = item
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        pass
    prefix = f"{path.parent}/"
    for entry in entries:
        placed = f"{entry.placement.folder}/{entry.placement.name}"
        if placed.startswith(prefix):  # always, but for odd templates
            relative = placed[len(prefix) :]
        else:
            relative = os.path.relpath(placed, path.parent)
        instances[relative] = {
            "sop_instance_uid": entry.sop_instance_uid,
            "series_instance_uid": entry.series_instance_uid,
            "series_number": entry.series_number,
            "path": relative,
            "size": entry.placement.size,
            "sha256": entry.placement.sha256,
        }
    listed = sorted(instances.values(), key=lambda item: str(item["path"]))
    manifest = {
        "study_instance_uid": study_uid,
        "lab": rule.lab_name,
        "rule": rule.name,
        "patient_id": patient,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock)),
        "files": len(listed),
        "bytes": sum(int(item["size"]) for item in listed),  # type: ignore[call-overload]
        "instances": listed,
    }
    _replace(path, _to_json(manifest), Permissions(rule.group, rule.file_mode, rule.folder_mode))
    return manifest


_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def _to_json(manifest: dict[str, object]) -> str:
    """One instance per line: readable with `grep`, and written by the
    C encoder (`indent` would switch to the slow pure-Python one)."""
    head = {key: value for key, value in manifest.items() if key != "instances"}
    instances = manifest["instances"]
    assert isinstance(instances, list)
    lines = ",\n  ".join(map(_ENCODE, instances))
    opening = _ENCODE(head)[:-1]
    return (
        f'{opening}, "instances": [\n  {lines}\n]}}\n'
        if instances
        else (json.dumps(manifest, ensure_ascii=False) + "\n")
    )


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
