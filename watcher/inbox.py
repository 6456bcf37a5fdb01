"""Watching the inbox: the watchdog observer, which only enqueues paths for
the daemon's loop, restarted when it dies and moved to polling when inotify
runs out of watches. Imported by `dicom-watcher run` alone: `run --once` and
`sort` read the inbox as it is."""

from __future__ import annotations

import errno
import logging
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from watcher.logs import kv

log = logging.getLogger(__name__)

#: What the daemon asks inotify for: a file (or folder) appears, or is closed
#: after writing. Not every write, attribute change or removal: placing a
#: study links and removes each of its files, and those events would cost
#: the main thread the GIL once per file. A file still growing is caught by
#: the size check before it is read.
WATCHED_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent]


#: What the handler queues: (kind, path, when it was seen, wall seconds).
Event = tuple[str, str, float]


class InboxHandler(FileSystemEventHandler):
    """Puts `(kind, path, seen)` on a queue; never raises (an exception in a
    watchdog handler kills the observer thread without a word). `seen` is
    taken here, not when the daemon's loop takes the event: a loop that
    yields to the receiver may take it seconds later."""

    def __init__(
        self, events: queue.SimpleQueue[Event], clock: Callable[[], float] = time.time
    ) -> None:
        self.events = events
        self.clock = clock

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            kind = event.event_type
            if kind in ("opened", "closed_no_write"):
                return
            path = os.fsdecode(event.dest_path if kind == "moved" else event.src_path)
            if event.is_directory:
                # A new folder (storescp -su) is scanned: files may predate its
                # watch. A folder is "modified" by every file created in it:
                # scanning on those would rescan the inbox once per file.
                if kind not in ("created", "moved"):
                    return
                kind = "dir"
            self.events.put((kind, path, self.clock()))
        except Exception:  # noqa: BLE001 - see class docstring
            log.exception(kv("watch_handler_error"))


class InboxWatcher:
    """The watchdog observer on the inbox, restarted if it dies, and moved to
    polling when inotify cannot watch any more folders."""

    def __init__(
        self,
        inbox: Path,
        poll: bool,
        poll_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.clock = clock
        self.poll = poll
        self.poll_seconds = poll_seconds
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.observer: BaseObserver | None = None
        self._short = False

    def start(self) -> None:
        try:
            self.observer = self._start(self.poll)
        except OSError as error:
            if self.poll or error.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.warning(
                kv(
                    "inotify_limit",
                    error=error.strerror,
                    action="polling the inbox instead; raise fs.inotify.max_user_watches",
                )
            )
            self.poll = True
            self.observer = self._start(True)
        log.info(kv("watching", inbox=self.inbox, mode="polling" if self.poll else "inotify"))

    def _start(self, poll: bool) -> BaseObserver:
        observer = PollingObserver(timeout=self.poll_seconds) if poll else Observer()
        try:
            observer.schedule(
                InboxHandler(self.events, self.clock),
                str(self.inbox),
                recursive=True,
                event_filter=WATCHED_EVENTS,
            )
            observer.daemon = True
            observer.start()
        except BaseException:
            # watchdog 7 starts its inotify reader threads in schedule(), before
            # the watch limit is hit: an observer that failed to start is
            # stopped too, or those threads (and the inotify instance) outlive it.
            _stop_observer(observer)
            raise
        return observer

    def check_coverage(self, folders: int) -> None:
        """Fall back to polling when inotify watches fewer folders than the
        inbox has: the per-user watch limit was reached (recent watchdog
        versions skip sub-folders they cannot watch without a word)."""
        if self.poll or self.observer is None:
            return
        watches = _inotify_watches()
        if watches is None or watches >= folders:
            self._short = False
            return
        if not self._short:  # folders come and go: act when it persists
            self._short = True
            return
        log.warning(
            kv(
                "inotify_limit",
                folders=folders,
                watched=watches,
                action="polling the inbox instead; raise fs.inotify.max_user_watches",
            )
        )
        self.stop()
        self.poll = True
        self.start()

    def healthy(self) -> bool:
        return self.observer is not None and self.observer.is_alive()

    def restart(self) -> None:
        log.error(kv("watcher_died", action="restarting the observer and rescanning"))
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.observer is not None:
            _stop_observer(self.observer)
            self.observer = None


def _stop_observer(observer: BaseObserver) -> None:
    """Stop an observer, started or not, with its emitter and reader threads,
    and release its inotify instance."""
    observer.stop()
    if observer.is_alive():
        observer.join(timeout=5)
    _release_inotify_reader(observer)


def _release_inotify_reader(observer: BaseObserver) -> None:
    """Close the descriptors of a watchdog 7 inotify reader that was stopped
    before its first read: its thread then ends without closing them (the
    inotify instance and a pipe), once per failed start. Only that exact
    state is acted on: closed, ended, and never through its read."""
    reader = getattr(observer, "_inotify_fd", None)
    close = getattr(reader, "_close_resources", None)
    if (
        reader is not None
        and close is not None
        and getattr(reader, "_closed", False)
        and getattr(reader, "_is_reading", False)
        and not reader.is_alive()
    ):
        reader._is_reading = False  # so that this runs at most once
        close()


def _inotify_watches() -> int | None:
    """How many inotify watches this process holds (Linux), or None if unknown."""
    try:
        fds = os.listdir("/proc/self/fdinfo")
    except OSError:
        return None
    total = 0
    for fd in fds:
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                total += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total
