"""Placer processes (watcher/placers.py): calls answered in order, and a
placer stuck on a frozen share (sshfs over a private sshd, tests/share.py)
abandoned after its timeout while another goes on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for
from share import Share

from watcher.placers import CutOff, Placer


@pytest.fixture
def placers() -> Iterator[list[Placer]]:
    made: list[Placer] = []
    yield made
    for placer in made:
        placer.abandon("the test ended")


def answers(placer: Placer, count: int, seconds: float = 20) -> list[tuple[int, object]]:
    got: list[tuple[int, object]] = []
    wait_for(lambda: got.extend(placer.poll()) or len(got) >= count, seconds, "answers")
    return got


def test_calls_are_answered_in_order_with_their_results_or_errors(tmp_path, placers):
    placer = Placer("local", timeout=30)
    placers.append(placer)
    (tmp_path / "a").write_bytes(b"12345")
    first = placer.submit(os.listdir, str(tmp_path))
    second = placer.submit(os.stat, str(tmp_path / "missing"))
    third = placer.submit(len, b"x" * (4 << 20))  # more than a pipe holds
    got = answers(placer, 3)
    assert [ticket for ticket, _ in got] == [first, second, third]
    assert got[0][1] == ["a"]
    assert isinstance(got[1][1], FileNotFoundError)
    assert got[2][1] == 4 << 20
    assert not placer.busy
    placer.close()
    wait_for(placer.finished, 10, "the closed placer to exit")


def test_a_placer_that_dies_cuts_off_its_calls(placers):
    placer = Placer("dying", timeout=30)
    placers.append(placer)
    answered_first = placer.submit(os.getpid)
    ticket = placer.submit(os._exit, 3)
    got = answers(placer, 2)
    assert got[0] == (answered_first, placer.process.pid), "its answer before it died counts"
    assert got[1][0] == ticket and isinstance(got[1][1], CutOff)
    assert "status 3" in str(got[1][1])
    with pytest.raises(CutOff):
        placer.submit(os.getpid)


def test_a_placer_stuck_on_a_frozen_share_is_abandoned_while_another_goes_on(tmp_path, placers):
    share = Share(tmp_path / "share")
    try:
        (share.mount / "lab").mkdir()
        stuck, local = Placer("share", timeout=2), Placer("local", timeout=2)
        placers += [stuck, local]
        share.freeze()
        ticket = stuck.submit(os.listdir, str(share.mount / "lab"))
        # Submitting more to it never blocks, however much it is.
        stuck.submit(len, b"x" * (4 << 20))
        assert stuck.busy
        done = local.submit(os.listdir, str(tmp_path))
        assert answers(local, 1)[0][0] == done, "the other placer is not held up"
        cut = answers(stuck, 2)
        assert [t for t, _ in cut] == [ticket, ticket + 1]
        assert all(isinstance(value, CutOff) for _, value in cut)
        assert "no progress" in str(cut[0][1])
        assert stuck.abandoned and not stuck.finished(), "left behind in the kernel"
        share.thaw()
        wait_for(stuck.finished, 20, "the killed placer to end once the share answers")
    finally:
        share.close()


def test_a_slow_call_that_makes_progress_is_not_cut_off(tmp_path, placers, monkeypatch):
    # Writing for longer than the timeout, with system calls all along.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # for _write_for
    placer = Placer("busy", timeout=1)
    placers.append(placer)
    ticket = placer.submit(_write_for, str(tmp_path / "f"), 2.5)
    [(answered, value)] = answers(placer, 1)
    assert answered == ticket and value == "done"
    # The same time without a system call is no progress.
    ticket = placer.submit(_sleep, 2.5)
    [(answered, value)] = answers(placer, 1)
    assert answered == ticket and isinstance(value, CutOff)


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _write_for(path: str, seconds: float) -> str:
    import time

    end = time.monotonic() + seconds
    with Path(path).open("wb") as file:
        while time.monotonic() < end:
            file.write(b"x")
            file.flush()
            time.sleep(0.01)
    return "done"
