"""Fixtures of the fault suite: real mounts (tmpfs, bind) that are always
undone, daemons and receivers that are always stopped, and the accounting
check that ends every fault test and reports what it counted.

`tests/harness.py` is importable here: pytest puts `tests/` on sys.path for
`tests/conftest.py`; the insertion below only makes that explicit for a run
that starts inside this folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
for folder in (TESTS, TESTS / "faults"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from faultlib import Mounts, Storescp  # noqa: E402
from harness import DaemonProcess, assert_accounted  # noqa: E402

# --- mounts ------------------------------------------------------------------


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    try:
        yield made
    finally:
        made.close()


# --- processes ----------------------------------------------------------------


@pytest.fixture
def daemons(mounts: Mounts) -> Iterator[list[DaemonProcess]]:
    """Daemons made by a test (append them): killed at its end, before its
    mounts are undone (this fixture depends on `mounts`)."""
    made: list[DaemonProcess] = []
    try:
        yield made
    finally:
        for run in made:
            run.close()


@pytest.fixture
def storescp(daemons: list[DaemonProcess]) -> Iterator[list[Storescp]]:
    """Receivers made by a test (append them): stopped at its end."""
    made: list[Storescp] = []
    try:
        yield made
    finally:
        for receiver in made:
            receiver.close()


# --- the accounting check -------------------------------------------------------


@pytest.fixture
def account(request: pytest.FixtureRequest, record_property) -> object:  # type: ignore[no-untyped-def]
    """`harness.assert_accounted` that also records its counts (shown at the
    end of the run, and in the JUnit XML as the property `accounting`);
    `extra` adds a test's own counts to the record."""

    def check(
        *args: object, extra: dict[str, object] | None = None, **kwargs: object
    ) -> dict[str, int]:
        counts = assert_accounted(*args, **kwargs)  # type: ignore[arg-type]
        record = json.dumps({**counts, **(extra or {})}, sort_keys=True)
        record_property("accounting", record)
        print(f"accounting {request.node.name}: {record}")
        return counts

    return check


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    lines = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", ()):
                if name == "accounting" and report.when == "call":
                    lines.append(f"{outcome:6} {report.nodeid.split('::')[-1]}: {value}")
    if lines:
        terminalreporter.section("fault suite: accounting checks")
        for line in lines:
            terminalreporter.write_line(line)
