"""The daemon's YAML configuration: every key has a default."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.errors import ConfigError
from watcher.rules import NAME_PATTERN, Lab, parse_conditions, parse_group

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
    #: A destination whose placer makes no progress for this long is hung.
    destination_timeout_seconds: float = 120.0
    #: How often the rules folder is checked for changes.
    rules_check_seconds: float = 2.0
    #: Hooks running at once, and the first wait before a failed hook runs again.
    hook_concurrency: int = 2
    hook_retry_seconds: float = 60.0
    #: The labs whose rules live in rules/<lab>/, and what each may do;
    #: None: no lab folders, only the operator's rules at the top of rules/.
    labs: dict[str, Lab] | None = None
    #: `dicom-watcher web`: where it listens (HOST:PORT; loopback by default,
    #: for a reverse proxy in front), and whether its pages show patient IDs.
    web_listen: str = "127.0.0.1:8470"
    web_show_patients: bool = False
    #: Also write the metrics into this file (atomically, with each status),
    #: for node_exporter's textfile collector; none by default.
    metrics_file: Path | None = None

    def with_overrides(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PATH_KEYS = ("inbox", "rules", "state")


def parse_listen(value: str, where: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port), or a `ConfigError`."""
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT (such as 127.0.0.1:8470), not {value!r}")
    return host, int(port)


def config_file(path: str | Path | None) -> Path | None:
    """The file `load_config(path)` reads, made absolute; None for the defaults."""
    if path is None:
        path = DEFAULT_CONFIG_FILE
        if not Path(path).is_file():
            return None
    return Path(path).resolve()


def load_config(path: str | Path | None, *, resolve: bool = True) -> Config:
    """Load a config file; `None` means `./dicom-watcher.yaml` if present, else defaults.

    `resolve=False` leaves the labs' destinations as written (made absolute,
    not resolved, not checked for overlaps): for readers of the state folder
    alone, such as `status`, which must answer while a lab's share hangs.

    Every problem raises `ConfigError` with a one-line message.
    """
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).is_file():
            return _absolute(Config(), Path.cwd(), resolve)
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
        if key == "allowed_destinations":
            raise ConfigError(
                f"{file}: allowed_destinations is replaced by labs.<lab>.destinations "
                "(each lab also needs its claims)"
            )
        if key not in fields:
            raise ConfigError(f"{file}: unknown key {key!r} (known: {', '.join(fields)})")
        values[key] = _convert(file, key, value, getattr(Config(), key))
    return _absolute(Config(**values), file.resolve().parent, resolve)


def _convert(file: Path, key: str, value: Any, default: Any) -> Any:
    if key == "labs":
        return _labs(file, value)
    if key == "web_listen":
        if not isinstance(value, str):
            raise ConfigError(f"{file}: web_listen must be HOST:PORT, not {value!r}")
        parse_listen(value, f"{file}: web_listen")
        return value
    if key == "metrics_file":
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{file}: metrics_file must be a file path")
        return Path(value).expanduser()
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


LAB_KEYS = ("destinations", "claims", "group", "hook_user")


def _labs(file: Path, value: Any) -> dict[str, Lab] | None:
    """`labs:`, each lab checked with one clear error naming its key."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: labs must map lab names to their settings")
    labs = {}
    for name, entry in value.items():
        where = f"{file}: labs.{name}"
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{where}: a lab name is letters, digits, '_', '.' or '-'")
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping ({', '.join(LAB_KEYS)})")
        for key in entry:
            if key not in LAB_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(LAB_KEYS)})")
        roots = entry.get("destinations", [])
        if isinstance(roots, str):
            roots = [roots]
        if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
            raise ConfigError(f"{where}.destinations must be a list of folders")
        labs[name] = Lab(
            name=name,
            destinations=tuple(Path(r).expanduser() for r in roots),
            claims=_claims(where, entry.get("claims")),
            group=_lab_group(where, entry.get("group")),
            hook_user=_hook_user(where, entry.get("hook_user")),
        )
    return labs


def _claims(where: str, value: Any) -> tuple[tuple[Any, ...], ...] | None:
    if value == "all":
        return None
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(c, dict) and c for c in value):
        raise ConfigError(
            f"{where}.claims must be `all` or a list of match maps (field: regular expression)"
        )
    claims = []
    for index, claim in enumerate(value, 1):

        def refuse(_key: str, message: str, index: int = index) -> None:
            raise ConfigError(f"{where}.claims[{index}]: {message}")

        claims.append(parse_conditions(claim, refuse))
    return tuple(claims)


def _lab_group(where: str, value: Any) -> int | None:
    if value is None:
        return None
    gid = parse_group(value)
    if gid is None:
        raise ConfigError(f"{where}.group: unknown group {value!r} on this machine")
    return gid


def _hook_user(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{where}.hook_user must be a user name")
    return value


def _check_labs(labs: dict[str, Lab]) -> None:
    """Two labs' destinations may not overlap: each tree belongs to one lab."""
    roots = [
        (lab.name, Path(os.path.realpath(root)))
        for lab in labs.values()
        for root in lab.destinations
    ]
    for index, (first, mine) in enumerate(roots):
        for second, theirs in roots[index + 1 :]:
            if first != second and (
                mine == theirs or mine in theirs.parents or theirs in mine.parents
            ):
                raise ConfigError(
                    f"labs.{first}.destinations ({mine}) and labs.{second}.destinations "
                    f"({theirs}) overlap: a folder belongs to one lab only"
                )


def _absolute(config: Config, base: Path, resolve: bool = True) -> Config:
    paths: dict[str, Any] = {key: base / getattr(config, key) for key in PATH_KEYS}
    if config.labs is not None:
        paths["labs"] = {
            # Resolved now, once: placements go down from these without
            # following a link, whatever a lab puts in their place later.
            name: dataclasses.replace(
                lab,
                destinations=tuple(
                    Path(os.path.realpath(base / root)) if resolve else base / root
                    for root in lab.destinations
                ),
            )
            for name, lab in config.labs.items()
        }
        if resolve:
            _check_labs(paths["labs"])
    if config.metrics_file is not None:
        paths["metrics_file"] = base / config.metrics_file
    config = dataclasses.replace(config, **paths)
    inbox, state = config.inbox.resolve(), config.state.resolve()
    if inbox == state or inbox in state.parents or state in inbox.parents:
        raise ConfigError(f"inbox ({inbox}) and state ({state}) must be separate folders")
    return config
