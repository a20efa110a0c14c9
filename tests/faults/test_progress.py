"""Progress and Deadline: a follower's read timeout runs on the shared response's silence."""

from __future__ import annotations

import asyncio
import time

import pytest

from singleflight import Group
from singleflight._http import Deadline, Progress, progress_of

pytestmark = pytest.mark.timeout(30)


class Reader:
    total_bytes = 0


def test_the_mark_is_the_furthest_any_leader_got():
    p = Progress()
    assert p.mark() == 0
    p.start()
    p.advance()  # headers
    p.advance(100)
    assert p.mark() == 101
    p.start()  # a re-elected leader starts over: nothing new until it gets further
    p.advance()
    assert p.mark() == 101
    reader = Reader()
    p.follow(reader)
    reader.total_bytes = 100
    assert p.mark() == 101
    reader.total_bytes = 150
    assert p.mark() == 151


def test_progress_of_is_shared_per_group_and_key_and_dropped_when_unused():
    a, b = Group(), Group()
    p = progress_of(a, "k")
    assert progress_of(a, "k") is p
    assert progress_of(b, "k") is not p and progress_of(a, "j") is not p
    p.advance(5)
    del p
    assert progress_of(a, "k").mark() == 0  # nobody held it: a new one


async def test_a_deadline_starts_over_while_progress_moves_then_fires_on_silence():
    p = Progress()
    started = time.monotonic()
    deadline = Deadline(0.1, p)

    async def leader() -> None:
        p.start()
        for _ in range(5):  # moves every 0.05 s for 0.25 s, then falls silent
            await asyncio.sleep(0.05)
            p.advance(10)

    lead = asyncio.ensure_future(leader())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(10)
    assert deadline.expired()
    assert 0.25 <= time.monotonic() - started <= 0.25 + 0.2 + 0.3  # silence + two windows
    await lead


async def test_a_deadline_without_progress_fires_at_its_budget_and_can_be_disarmed():
    started = time.monotonic()
    fixed = Deadline(0.05)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(10)
    assert fixed.expired() and time.monotonic() - started < 0.5
    disarmed = Deadline(0.01, Progress())
    disarmed.deadline = float("inf")
    await asyncio.sleep(0.05)  # not cancelled
    assert not disarmed.expired()
