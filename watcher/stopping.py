"""The stop that SIGTERM and SIGINT request, set safely from a signal handler.

A Python signal handler runs in the main thread between two of its bytecodes,
whatever that thread holds at the time. A `threading.Event` set there
deadlocks when the main thread was inside the same event's `wait`, holding the
event's lock: the handler waits for a lock its own thread will never release
(a `web` process sent SIGTERM as it started hung like this). Logging there can
re-enter a stream the main thread is in the middle of writing.

`SignalStop` takes no lock to be set: an assignment and a byte written to a
pipe. Its `wait` polls that pipe, which stays readable once written, so every
waiter, in any thread, wakes. The line that says which signal came is logged
by the first thread that sees the stop, outside the handler.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import threading
from typing import Protocol

from watcher.logs import kv

log = logging.getLogger("watcher")

#: The signals that ask a command to stop.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest(Protocol):
    """What a command's loop asks of its stop: a `threading.Event` is one."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class SignalStop:
    """A stop that a signal handler may set at any moment (see the module)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._set = False
        self._signal: int | None = None
        self._told = False
        self._telling = threading.Lock()  # (never taken by the handler)

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(BlockingIOError):  # (full: it is readable)
            os.write(self._write, b"!")

    def set_by_signal(self, signum: int, _frame: object = None) -> None:
        """The signal handler: an assignment and `set`, nothing that locks."""
        if self._signal is None:
            self._signal = signum
        self.set()

    def is_set(self) -> bool:
        if self._set:
            self._tell()
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if not self._set:
            poll = select.poll()
            poll.register(self._read, select.POLLIN)
            # (poll counts whole milliseconds: rounded up, never a busy loop)
            poll.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        return self.is_set()

    def _tell(self) -> None:
        if self._signal is None or self._told:
            return
        with self._telling:
            if not self._told:
                self._told = True
                log.info(kv("stopping", signal=signal.Signals(self._signal).name))


def stop_on_signals() -> SignalStop:
    """A stop that SIGTERM and SIGINT set (and that is logged), for a command's
    loop. Install it before starting any thread: handlers run in the main one."""
    stop = SignalStop()
    for signum in SIGNALS:
        signal.signal(signum, stop.set_by_signal)
    return stop
