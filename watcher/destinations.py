"""What the daemon knows of each destination: healthy, unavailable
(missing, full, read-only, forbidden) or hung (no progress), since when and
why, as `status` shows.

A destination's state changes with what placements into it report: an
instance placed there makes it healthy, a `DestinationUnavailable` from it
makes it unavailable. Each change is one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from watcher.logs import kv

log = logging.getLogger(__name__)

HEALTHY, UNAVAILABLE, HUNG = "healthy", "unavailable", "hung"


@dataclass
class State:
    state: str
    since: float
    reason: str = ""


class Destinations:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.states: dict[str, State] = {}

    def known(self, destinations: Iterable[str]) -> None:
        """The rules' destinations: healthy until a placement says otherwise
        (none is touched to find out: a hung share would hang the caller)."""
        now = self.clock()
        wanted = set(destinations)
        for destination in wanted - self.states.keys():
            self.states[destination] = State(HEALTHY, now)
        for destination in self.states.keys() - wanted:
            if self.states[destination].state == HEALTHY:
                del self.states[destination]  # no rule writes there any more

    def healthy(self, destination: str) -> None:
        state = self.states.get(destination)
        if state is not None and state.state == HEALTHY:
            return
        now = self.clock()
        if state is not None:
            log.info(
                kv(
                    "destination_healthy",
                    destination=destination,
                    was=state.state,
                    for_seconds=round(now - state.since),
                )
            )
        self.states[destination] = State(HEALTHY, now)

    def unavailable(self, destination: str, reason: str) -> None:
        state = self.states.get(destination)
        if state is not None and state.state == UNAVAILABLE:
            state.reason = reason
            return
        self.states[destination] = State(UNAVAILABLE, self.clock(), reason)
        log.warning(kv("destination_unavailable", destination=destination, reason=reason))

    def hung(self, destination: str, reason: str) -> None:
        self.states[destination] = State(HUNG, self.clock(), reason)
        log.warning(
            kv(
                "destination_hung",
                destination=destination,
                reason=reason,
                action="its studies are parked; it is probed until it answers",
            )
        )

    def answered(self, destination: str) -> None:
        """A hung destination answers again: healthy until a placement says otherwise."""
        self.healthy(destination)

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {"destination": name, "state": s.state, "since": s.since, "reason": s.reason}
            for name, s in sorted(self.states.items())
        ]
