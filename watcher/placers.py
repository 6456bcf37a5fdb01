"""Work on one destination in a process of its own, which can be abandoned.

A share that stops answering (an NFS hard mount, a frozen SMB or sshfs
server) leaves whatever touches it waiting in the kernel, where no signal
ends it: not a thread, not even a process. So the daemon gives each
destination a placer, a child process (`python -m watcher.placers`) that
runs the calls it is sent one after another and sends back their results,
and only ever polls the pipes between them, without blocking.

A placer is hung when a call has been running for `timeout` seconds
without progress: no input or output and no system call counted for it in
`/proc/PID/io` (where the kernel has no such counts: no result). A hung
placer is abandoned: killed, which ends it when its stuck operation
returns, if ever, and never waited for. Its calls then end with `CutOff`;
what they had not finished is theirs to redo (a placement leaves the
source in the inbox until its copies are durable).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

#: prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

#: Each message is a pickle, after its length.
_LENGTH = struct.Struct("!Q")


class CutOff(Exception):
    """A call that a placer did not finish: it hung, or it died."""


@dataclass
class Placer:
    """The parent's end of one placer process. `clock` is monotonic."""

    name: str
    timeout: float
    clock: Callable[[], float] = time.monotonic
    process: subprocess.Popen[bytes] = field(init=False)
    #: Tickets of the calls sent and not answered, oldest first.
    calls: collections.deque[int] = field(init=False, default_factory=collections.deque)
    _next_ticket: int = field(init=False, default=0)
    _out: bytearray = field(init=False, default_factory=bytearray)
    _in: bytearray = field(init=False, default_factory=bytearray)
    _io: tuple[int, ...] | None = field(init=False, default=None)
    #: When the oldest call last made progress.
    _progress: float = field(init=False, default=0.0)
    abandoned: bool = field(init=False, default=False)
    #: It was abandoned for making no progress (not for dying).
    stalled: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        package = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
        env["DW_PLACER_PARENT"] = str(os.getpid())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watcher.placers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        for pipe in (self.process.stdin, self.process.stdout):
            flags = fcntl.fcntl(pipe.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)

    @property
    def busy(self) -> bool:
        return bool(self.calls)

    def pipes(self) -> tuple[list[int], list[int]]:
        """The ends of its pipes that have something for `poll` once they
        are ready: its output while a call is unanswered, its input while
        a call is not sent in full (for select)."""
        if self.abandoned or not self.calls:
            return [], []
        assert self.process.stdin is not None and self.process.stdout is not None
        return [self.process.stdout.fileno()], [self.process.stdin.fileno()] if self._out else []

    def submit(self, function: Callable[..., Any], *args: Any) -> int:
        """Send a call (a module-level function and picklable arguments);
        returns its ticket. Never blocks: what the pipe does not take now is
        sent by later polls."""
        if self.abandoned:
            raise CutOff(f"placer {self.name} was abandoned")
        ticket = self._next_ticket
        self._next_ticket += 1
        message = pickle.dumps((ticket, function, args), protocol=pickle.HIGHEST_PROTOCOL)
        self._out += _LENGTH.pack(len(message)) + message
        if not self.calls:
            self._progress = self.clock()
            self._io = self._counters()
        self.calls.append(ticket)
        self._send()
        return ticket

    def poll(self) -> list[tuple[int, Any]]:
        """The results that arrived, as (ticket, value); a value is the
        call's exception when it raised. Never blocks. A placer that is
        hung, or dead, is abandoned, and its calls end with `CutOff`."""
        if self.abandoned:
            return []
        try:
            self._send()
            results, closed = self._receive()
        except OSError:  # its input closed: it died
            results, closed = [], True
        if closed:  # what it answered before it died counts
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)  # it is exiting: for its status
            return results + self.abandon(
                f"placer {self.name} ended with status {self.process.returncode}"
            )
        if results:
            self._progress = self.clock()
            self._io = self._counters()
        if self.calls:
            counters = self._counters()
            if counters is not None and counters != self._io:
                self._io = counters
                self._progress = self.clock()
            if self.process.poll() is not None:
                return results + self.abandon(
                    f"placer {self.name} ended with status {self.process.returncode}"
                )
            stalled = self.clock() - self._progress
            if stalled >= self.timeout:
                self.stalled = True
                return results + self.abandon(
                    f"no progress for {stalled:.0f} s (destination_timeout_seconds)"
                )
        return results

    def abandon(self, reason: str) -> list[tuple[int, Any]]:
        """Kill the process without waiting for it; its calls end with `CutOff`."""
        self.abandoned = True
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        cut = [(ticket, CutOff(reason)) for ticket in self.calls]
        self.calls.clear()
        return cut

    def close(self) -> None:
        """End an idle placer: its input closes and it exits."""
        if self.abandoned:
            return
        self.abandoned = True
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def finished(self) -> bool:
        """Whether its process has ended (an abandoned one may never)."""
        return self.process.poll() is not None

    def _send(self) -> None:
        assert self.process.stdin is not None
        while self._out:
            try:
                sent = os.write(self.process.stdin.fileno(), self._out)
            except BlockingIOError:
                return
            del self._out[:sent]

    def _receive(self) -> tuple[list[tuple[int, Any]], bool]:
        """The answers read, and whether its output has closed."""
        assert self.process.stdout is not None
        closed = False
        while True:
            try:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                closed = True
                break
            self._in += chunk
        results = []
        while len(self._in) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._in)
            if len(self._in) < _LENGTH.size + length:
                break
            ticket, value = pickle.loads(  # noqa: S301 - from our own child
                self._in[_LENGTH.size : _LENGTH.size + length]
            )
            del self._in[: _LENGTH.size + length]
            if self.calls and self.calls[0] == ticket:
                self.calls.popleft()
            results.append((ticket, value))
        return results, closed

    def _counters(self) -> tuple[int, ...] | None:
        """The process's counts of bytes and system calls, or None."""
        try:
            text = Path(f"/proc/{self.process.pid}/io").read_text(encoding="ascii")
        except OSError:
            return None
        return tuple(
            int(line.split()[1])
            for line in text.splitlines()
            if line.startswith(("rchar", "wchar", "syscr", "syscw"))
        )


# --- the child --------------------------------------------------------------


def _read_message(stream: BinaryIO) -> Any | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(stream.read(length))  # noqa: S301 - from our own parent


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Run the calls read from `requests` in order, each result (or the
    exception it raised) written to `replies`, until `requests` closes."""
    while (message := _read_message(requests)) is not None:
        ticket, function, args = message
        try:
            value = function(*args)
        except Exception as error:  # noqa: BLE001 - the caller gets it
            value = error
        try:
            reply = pickle.dumps((ticket, value), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - an unpicklable result
            reply = pickle.dumps((ticket, RuntimeError(repr(error))))
        try:
            replies.write(_LENGTH.pack(len(reply)) + reply)
            replies.flush()
        except BrokenPipeError:  # the daemon is gone: no one takes the answers
            return


def _die_with_parent() -> None:
    """Be killed when the daemon dies (a SIGKILL, a crash), as a placement
    in its own process would be: nothing goes on placing that no one takes
    the answers of, beside the next daemon's own placements."""
    parent = int(os.environ.get("DW_PLACER_PARENT", "0"))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # (not Linux: the placer ends when its input closes)
    if parent and os.getppid() != parent:  # it died before the above
        os._exit(1)


def main() -> None:
    # The daemon stops its placers: a SIGINT or SIGTERM meant for it (a
    # terminal's ^C, a stop of its whole group) does not interrupt a
    # placement half way; the daemon abandons a placer if need be.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    from watcher import logs, placing  # noqa: F401 - imported now, not at the first call

    logs.setup(os.environ.get("DW_LOG_LEVEL", "INFO"))
    # Replies go through a descriptor of their own: whatever else writes to
    # standard output lands on standard error instead of in the messages.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
