"""The daemon's YAML configuration: every key has a default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.errors import ConfigError

#: Read from the current folder when no --config is given, if it exists.
DEFAULT_CONFIG_FILE = "dicom-watcher.yaml"


@dataclass(frozen=True)
class Config:
    """Settings of `dicom-watcher run` and `status`. Paths in a config file
    are relative to that file's folder."""

    inbox: Path = Path("inbox")
    rules: Path = Path("rules")
    state: Path = Path("state")
    #: A study is complete when none of its instances arrived for this long.
    quiet_seconds: float = 60.0
    #: A study that never goes quiet is placed anyway once this old (warning).
    max_study_age_seconds: float = 6 * 3600.0
    #: A file is read once its size and time stopped changing for this long
    #: (at once after its writer closed it, when inotify says so).
    settle_seconds: float = 2.0
    #: A file that stays unreadable this long after its last change is quarantined.
    quarantine_after_seconds: float = 60.0
    #: Full rescan of the inbox: catches events inotify missed or dropped.
    rescan_seconds: float = 30.0
    #: Empty sub-folders of the inbox (storescp -su makes one per study) are
    #: removed once they have been empty and unchanged this long.
    empty_folder_seconds: float = 3600.0
    #: Poll the inbox instead of inotify (inboxes on NFS/SMB); polling interval.
    poll: bool = False
    poll_seconds: float = 2.0
    #: Immediate retries of a transient write error (EIO, ESTALE, timeouts).
    retry_attempts: int = 5
    retry_max_seconds: float = 60.0
    #: Parked studies (destination unavailable): first and longest wait.
    park_first_seconds: float = 30.0
    park_max_seconds: float = 1800.0
    #: How often the rules folder is checked for changes.
    rules_check_seconds: float = 2.0
    #: Hooks running at once, and the first wait before a failed hook runs again.
    hook_concurrency: int = 2
    hook_retry_seconds: float = 60.0
    #: Lab name -> the destination roots its rules may write into. When set,
    #: a rule whose destination is elsewhere is refused (by check and run).
    allowed_destinations: dict[str, tuple[Path, ...]] | None = None

    def with_overrides(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PATH_KEYS = ("inbox", "rules", "state")


def load_config(path: str | Path | None) -> Config:
    """Load a config file; `None` means `./dicom-watcher.yaml` if present, else defaults.

    Every problem raises `ConfigError` with a one-line message.
    """
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).is_file():
            return _absolute(Config(), Path.cwd())
        path = DEFAULT_CONFIG_FILE
    import yaml  # here, not above: `sort --dest` and `status` read no YAML

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config {file}: {error.strerror}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the config must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{file}: unknown key {key!r} (known: {', '.join(fields)})")
        values[key] = _convert(file, key, value, getattr(Config(), key))
    return _absolute(Config(**values), file.resolve().parent)


def _convert(file: Path, key: str, value: Any, default: Any) -> Any:
    if key == "allowed_destinations":
        return _allowed(file, value)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{file}: {key} must be a folder path")
        return Path(value).expanduser()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: {key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{file}: {key} must be a number >= 0, not {value!r}")
    return type(default)(value)


def _allowed(file: Path, value: Any) -> dict[str, tuple[Path, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: allowed_destinations must map lab names to lists of folders")
    allowed = {}
    for lab, roots in value.items():
        if isinstance(roots, str):
            roots = [roots]
        if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
            raise ConfigError(f"{file}: allowed_destinations.{lab} must be a list of folders")
        allowed[str(lab)] = tuple(Path(r).expanduser() for r in roots)
    return allowed


def _absolute(config: Config, base: Path) -> Config:
    paths: dict[str, Any] = {key: base / getattr(config, key) for key in PATH_KEYS}
    if config.allowed_destinations is not None:
        paths["allowed_destinations"] = {
            lab: tuple(base / root for root in roots)
            for lab, roots in config.allowed_destinations.items()
        }
    config = dataclasses.replace(config, **paths)
    inbox, state = config.inbox.resolve(), config.state.resolve()
    if inbox == state or inbox in state.parents or state in inbox.parents:
        raise ConfigError(f"inbox ({inbox}) and state ({state}) must be separate folders")
    return config
