"""The daemon's own folder, state/: the service user's alone.

Everything in it (pending hook jobs, retry schedules, the placement journal,
status.json) is trusted by the daemon when it starts, so nobody else may
write there: folders are 0750 (an operator group may read the status), files
0640, and a folder someone else owns, or that is a link, stops the start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from watcher.errors import ConfigError
from watcher.logs import kv
from watcher.placement import TEMP_PREFIX

log = logging.getLogger(__name__)

FOLDER_MODE = 0o750
FILE_MODE = 0o640


def make_private(folder: Path) -> None:
    """Create `folder` (and its parents below state/) as the service user's
    own, or make an existing one so; raises `ConfigError` when it is not
    ours to make private."""
    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"state folder {folder} must be a folder, not a link")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"state folder {folder} belongs to uid {info.st_uid}: "
            "it must belong to the user the daemon runs as"
        )
    if info.st_mode & 0o022:
        os.chmod(folder, stat.S_IMODE(info.st_mode) & ~0o022)
        log.warning(
            kv("state_made_private", folder=folder, was=f"{stat.S_IMODE(info.st_mode):04o}")
        )


def trusted(path: Path) -> str | None:
    """Why a file in state/ cannot be trusted (someone else could have
    written it), or None when only the service user could have."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return error.strerror
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}, not to the daemon's user"
    if info.st_mode & 0o022:
        return f"writable by others than the daemon's user (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably, mode 0640; the
    temporary file is new (never a name someone else made)."""
    temporary = path.with_name(f"{TEMP_PREFIX}{os.urandom(6).hex()}.{path.name}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, FILE_MODE)
    try:
        try:
            with open(fd, "w", encoding="utf-8", closefd=False) as handle:
                handle.write(text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
