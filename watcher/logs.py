"""Logging for operators who tail it: key=value lines, or JSON.

The library modules only log; `setup` (called by the CLI alone) decides where
lines go: stderr for journald, plus an optional file that logrotate may move
away at any time (WatchedFileHandler reopens it).

Values come from headers and file names that a scanner or a lab chose, so no
line ever carries a control character raw: escape sequences could repaint an
operator's terminal and a carriage return or newline could forge a line.
`kv` quotes and escapes them, and both formatters escape whatever reaches
them another way.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings

logging.getLogger("watcher").addHandler(logging.NullHandler())


# Control (Cc), format (Cf: bidirectional overrides, zero-width) and line or
# paragraph separator (Zl, Zp) characters, as of Unicode 15.1.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)


def escape(text: str) -> str:
    """`text` with each unsafe character as a `\\xNN` or `\\uNNNN` escape."""
    return _UNSAFE.sub(lambda m: _escaped(m.group()), text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class KeyValueFormatter(logging.Formatter):
    """`2026-11-25T10:00:00Z level=INFO event=... key=value` lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}Z level={record.levelname} {escape(record.getMessage())}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join(escape(part) for part in trace.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `key=value` pairs of the message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname,
        }
        message = record.getMessage()
        # Only `kv` lines are split: pairs in any other text are not fields.
        if message.startswith("event="):
            fields.update(parse_pairs(message))
        else:
            fields["message"] = message
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return _json_line(fields)


def _json_line(value: object) -> str:
    """JSON with C0 controls escaped by `json` and the other unsafe ones by us."""
    return _UNSAFE.sub(lambda m: _json_escape(m.group()), json.dumps(value, ensure_ascii=False))


def _json_escape(char: str) -> str:
    units = char.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))


def kv(event: str, **fields: object) -> str:
    """`event=NAME key=value ...`; a value with blanks, quotes or unsafe characters is
    a JSON string, so `parse_pairs` gets it back exactly."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or _QUOTE.search(text):
            text = _json_line(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


_QUOTE = re.compile(r"[\s\"'=\\]|" + _UNSAFE.pattern)
_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_DECODER = json.JSONDecoder()


def parse_pairs(message: str) -> dict[str, str]:
    """Split a `kv` line back into fields; text that is not `key=value` goes to `message`."""
    fields: dict[str, str] = {}
    loose: list[str] = []
    position, end = 0, len(message)
    while position < end:
        if message[position] == " ":
            position += 1
            continue
        pair = _PAIR.match(message, position)
        if pair is None:
            stop = message.find(" ", position)
            stop = end if stop < 0 else stop
            loose.append(message[position:stop])
            position = stop
            continue
        position = pair.end()
        if message.startswith('"', position):
            try:
                value, position = _DECODER.raw_decode(message, position)
            except ValueError:
                value, position = message[position:], end
        else:
            stop = message.find(" ", position)
            stop = end if stop < 0 else stop
            value, position = message[position:stop], stop
        fields[pair.group(1)] = str(value)
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
