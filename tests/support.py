"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Every non-folder entry under `folder` (symbolic links not followed)."""
    found = []
    for parent, folders, names in os.walk(folder):
        found += [Path(parent, name) for name in names]
        found += [Path(parent, name) for name in folders if Path(parent, name).is_symlink()]
    return sorted(found)


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (symlinks marked)."""
    out = {}
    for path in files_under(folder):
        rel = path.relative_to(folder).as_posix()
        out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else sha256(path)
    return out
