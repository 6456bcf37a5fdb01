"""Per-destination placement for the daemon: every call that touches a
destination runs in that destination's placer (`watcher.placers`), so that
a share that stops answering stalls only its own work, never the loop.

`PlacerPool` hands a call to the placer of its destination and calls
`then(value)` from `poll()` when the answer comes. A placer that makes no
progress for `destination_timeout_seconds` is abandoned and its destination
marked hung: its calls, and every call for it from then on, are answered
with `DestinationHung` at once. A hung destination is probed with one
`stat` at a time, on the parked schedule; it answers again when a probe
returns and the abandoned placer has left the kernel (a probe answered from
the kernel's cache alone proves nothing).
"""

from __future__ import annotations

import math
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher import headers
from watcher.bookkeeping import found_placed
from watcher.destinations import Destinations
from watcher.engine import ManyPlacement, RetryPolicy
from watcher.errors import DestinationHung
from watcher.manifest import Entry, update_hooks, write_manifest
from watcher.placers import CutOff, Placer
from watcher.rules import Route, Rule
from watcher.stopping import StopRequest

Then = Callable[[Any], None]


def place_part(
    items: list[tuple[headers.Instance, list[Route]]], move: bool, retry: RetryPolicy
) -> list[Any]:
    """Run in a placer: place instances into one destination, removing each
    source once its copies are durable when `move` (the caller flushes the
    inbox's folders). A source already gone whose copies are all there, as
    a placement cut off after its removal leaves it, counts as placed."""
    placing = ManyPlacement(items, move=move, retry=retry, writeback=True, flush_sources=False)
    outcomes: list[Any] = placing.place()
    for index, ((instance, routes), outcome) in enumerate(zip(items, outcomes, strict=True)):
        if isinstance(outcome, FileNotFoundError) and not os.path.exists(instance.path):
            outcomes[index] = found_placed(instance, routes) or outcome
    return outcomes


def write_manifest_in(
    manifest: Path,
    study_uid: str,
    rule: Rule,
    patient: str,
    entries: list[Entry],
    clock: float,
) -> dict[str, Any]:
    """Run in a placer: write or bring up to date a study's manifest."""
    return write_manifest(
        manifest, study_uid=study_uid, rule=rule, patient=patient, entries=entries, clock=clock
    )


def update_hooks_in(manifest: Path, rule: Rule, records: list[dict[str, object]]) -> None:
    """Run in a placer: record hook states in a manifest."""
    update_hooks(manifest, rule=rule, records=records)


def probe(path: str) -> None:
    """Run in a probe placer: one `stat` of a hung destination."""
    os.stat(path)


@dataclass
class _Hung:
    reason: str
    #: Its abandoned placer: killed, but maybe still waiting in the kernel.
    stuck: Placer
    wait: float
    next_probe: float
    probe: Placer | None = None


@dataclass
class PlacerPool:
    """One placer per destination (made when first needed), the calls in
    flight, and the hung destinations with their probes."""

    timeout: float
    destinations: Destinations
    first_wait: float
    longest_wait: float
    clock: Callable[[], float] = time.monotonic
    placers: dict[str, Placer] = field(default_factory=dict)
    hung: dict[str, _Hung] = field(default_factory=dict)
    #: What to call with each answer, by destination and ticket.
    _calls: dict[tuple[str, int], Then] = field(default_factory=dict)
    _ready: list[tuple[Then, Any]] = field(default_factory=list)

    def submit(
        self, destination: str, then: Then, function: Callable[..., Any], *args: Any
    ) -> None:
        """Run `function(*args)` in the destination's placer; `then` gets its
        result (or exception) from a later `poll()`, never from here."""
        hung = self.hung.get(destination)
        if hung is not None:
            self._ready.append((then, DestinationHung(destination, hung.reason)))
            return
        placer = self.placers.get(destination)
        if placer is None:
            placer = self.placers[destination] = Placer(destination, self.timeout)
        ticket = placer.submit(function, *args)
        self._calls[(destination, ticket)] = then

    def busy(self, destination: str | None = None) -> int:
        """Calls not answered yet (for one destination, or all)."""
        if destination is None:
            return len(self._calls) + len(self._ready)
        placer = self.placers.get(destination)
        return len(placer.calls) if placer is not None else 0

    def poll(self) -> list[str]:
        """Take the answers that arrived (calling their `then`), and probe the
        hung destinations; returns those that answer again."""
        ready, self._ready = self._ready, []
        for then, value in ready:
            then(value)
        for destination, placer in list(self.placers.items()):
            answers = placer.poll()
            if placer.abandoned:
                del self.placers[destination]
                if placer.stalled:
                    self._hang(destination, placer, answers)
            for ticket, value in answers:
                then = self._calls.pop((destination, ticket))
                hung = self.hung.get(destination)
                if isinstance(value, CutOff) and hung is not None:
                    value = DestinationHung(destination, hung.reason)
                then(value)
        return self._probe()

    def wait(self, timeout: float, stop: StopRequest) -> None:
        """Wait up to `timeout` seconds for `stop`, or only until a placer
        has an answer: the loop takes it, and hands over the next part, at
        once rather than at its next turn."""
        if self._ready:
            return
        readers: list[int] = []
        writers: list[int] = []
        for placer in self.placers.values():
            output, unsent = placer.pipes()
            readers += output
            writers += unsent
        if not (readers or writers):
            stop.wait(timeout)
            return
        select.select(readers, writers, [], timeout)

    def _hang(self, destination: str, placer: Placer, answers: list[tuple[int, Any]]) -> None:
        reason = next((str(v) for _, v in answers if isinstance(v, CutOff)), "no progress")
        now = self.clock()
        self.hung[destination] = _Hung(reason, placer, self.first_wait, now + self.first_wait)
        self.destinations.hung(destination, reason)

    def _probe(self) -> list[str]:
        resumed = []
        now = self.clock()
        for destination, hung in list(self.hung.items()):
            if hung.probe is None:
                if now >= hung.next_probe:
                    hung.probe = Placer(f"{destination} (probe)", math.inf)
                    hung.probe.submit(probe, destination)
                continue
            answers = hung.probe.poll()
            if hung.probe.abandoned:  # it died: the next one on the schedule
                hung.probe = None
                hung.next_probe = now + hung.wait
                continue
            if not answers:
                continue
            if hung.stuck.finished():
                # It answers, and nothing of ours waits on it any more.
                del self.hung[destination]
                hung.probe.timeout = self.timeout
                self.placers[destination] = hung.probe
                self.destinations.answered(destination)
                resumed.append(destination)
            else:
                hung.wait = min(hung.wait * 2, self.longest_wait)
                hung.next_probe = now + hung.wait
                hung.probe.close()
                hung.probe = None
        return resumed

    def abandon_all(self) -> None:
        """On the way out: idle placers are closed, busy ones abandoned (their
        calls answered with `CutOff` now); none is waited for."""
        for destination, placer in list(self.placers.items()):
            if placer.busy:
                for ticket, value in placer.abandon("the daemon is stopping"):
                    self._calls.pop((destination, ticket))(value)
            else:
                placer.close()
        self.placers.clear()
        for hung in self.hung.values():
            if hung.probe is not None:
                hung.probe.abandon("the daemon is stopping")
        ready, self._ready = self._ready, []
        for then, value in ready:
            then(value)


class Immediate:
    """`run --once`: each call runs here, at once (a batch run waits for its
    destinations; the daemon does not)."""

    def submit(
        self, destination: str, then: Then, function: Callable[..., Any], *args: Any
    ) -> None:
        try:
            value = function(*args)
        except Exception as error:  # noqa: BLE001 - handed to `then`, as a placer would
            value = error
        then(value)

    def busy(self, destination: str | None = None) -> int:
        return 0

    def poll(self) -> list[str]:
        return []

    def wait(self, timeout: float, stop: StopRequest) -> None:
        stop.wait(timeout)

    def abandon_all(self) -> None:
        pass
