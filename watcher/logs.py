"""Logging for operators who tail it: key=value lines, or JSON.

The library modules only log; `setup` (called by the CLI alone) decides where
lines go: stderr for journald, plus an optional file that logrotate may move
away at any time (WatchedFileHandler reopens it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

logging.getLogger("watcher").addHandler(logging.NullHandler())


class KeyValueFormatter(logging.Formatter):
    """`2026-11-25T10:00:00Z level=INFO event=... key=value` lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}Z level={record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `key=value` pairs of the message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname,
        }
        fields.update(parse_pairs(record.getMessage()))
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False)


def kv(event: str, **fields: object) -> str:
    """`event=NAME key=value ...`, quoting values that hold spaces or quotes."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in " \t\n\"'=\\"):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def parse_pairs(message: str) -> dict[str, str]:
    """Split `a=1 b='x y'` into fields; text without `=` goes to `message`."""
    import shlex

    fields: dict[str, str] = {}
    try:
        tokens = shlex.split(message, posix=True)
    except ValueError:
        return {"message": message}
    loose = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key.isidentifier():
            fields[key] = value
        else:
            loose.append(token)
    if loose:
        fields["message"] = " ".join(loose)
    return fields


def setup(level: str = "INFO", log_format: str = "kv", log_file: str | None = None) -> None:
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else KeyValueFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        from logging.handlers import WatchedFileHandler  # (here: it imports socket)

        handlers.append(WatchedFileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    # pydicom reports odd-but-readable files through warnings and its logger;
    # the reasons that matter reach the log through NotRoutable instead.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
    warnings.filterwarnings("ignore", message=".*VR.*")
