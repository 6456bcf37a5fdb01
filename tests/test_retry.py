"""Immediate retries of transient write errors: the schedule, and the caps."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from watcher.engine import RetryPolicy, is_transient, place_instance
from watcher.errors import DestinationUnavailable
from watcher.headers import read_instance
from watcher.placement import place
from watcher.rules import single_rule
from watcher.synthetic import make_dataset, write_dataset


def failing_then_placing(failures: int, error: int):  # type: ignore[no-untyped-def]
    """The real `place`, after `failures` transient errors like a NAS hiccup."""
    calls = []

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) <= failures:
            raise OSError(error, "simulated NAS hiccup")
        return place(*args, **kwargs)

    return flaky, calls


def test_transient_errors_are_retried_with_a_growing_wait(tmp_path: Path):
    source = write_dataset(make_dataset(), tmp_path / "in" / "a.dcm")
    lab = tmp_path / "lab"
    lab.mkdir()
    slept: list[float] = []
    policy = RetryPolicy(attempts=5, max_seconds=60, first_wait=0.5, sleep=slept.append)
    flaky, calls = failing_then_placing(3, errno.EIO)
    placement = policy.retrying()(flaky, str(source), lab, "x/a.dcm")
    assert placement.path.read_bytes() == source.read_bytes()
    assert len(calls) == 4
    assert slept == sorted(slept) and len(slept) == 3 and slept[0] > 0


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT])
def test_retries_stop_at_the_attempt_cap_even_with_a_sleep_that_takes_no_time(tmp_path, code):
    source = write_dataset(make_dataset(), tmp_path / "in" / "a.dcm")
    slept: list[float] = []
    policy = RetryPolicy(attempts=4, max_seconds=3600, sleep=slept.append)
    flaky, calls = failing_then_placing(10**6, code)
    with pytest.raises(OSError) as raised:
        policy.retrying()(flaky, str(source), tmp_path, "a.dcm")
    assert raised.value.errno == code
    assert len(calls) == 4 and len(slept) == 3


def test_unavailable_destinations_are_not_retried_at_once(tmp_path: Path):
    source = write_dataset(make_dataset(), tmp_path / "in" / "a.dcm")
    instance = read_instance(source)
    rules = single_rule(tmp_path / "missing", "{SOPInstanceUID}.dcm")
    slept: list[float] = []
    with pytest.raises(DestinationUnavailable):
        place_instance(
            instance, rules.route(instance.values), move=True, retry=RetryPolicy(sleep=slept.append)
        )
    assert slept == []
    assert source.exists(), "the source stays until its copies are durable"
    assert not (tmp_path / "missing").exists()


def test_what_counts_as_transient():
    assert is_transient(OSError(errno.EIO, "x"))
    assert is_transient(TimeoutError())
    assert not is_transient(OSError(errno.ENOSPC, "x"))
    assert not is_transient(DestinationUnavailable("/nas", "full"))
    assert not is_transient(ValueError())
