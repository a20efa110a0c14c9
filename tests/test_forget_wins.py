"""forget / cache_pop / cache_clear during a flight win (issue 10 item 3): no stale value kept.

A flight that was forgotten while it ran still hands its value to its own callers, but never
stores it: the next caller runs the work afresh (or joins the newer flight), in every entry
point (Group.do, do_with_role, do_sync, the decorator) and for every way of forgetting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from cachetools import TTLCache

from singleflight import Group, singleflight

from .core_helpers import (
    TIMEOUT,
    AsyncWork,
    SyncWork,
    anever,
    assert_idle,
    async_wait_until,
    followers_waiting,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

FORGETS: dict[str, Callable[[Group[Any], str], None]] = {
    "forget": lambda g, k: g.forget(k),
    "cache_pop": lambda g, k: g.cache_pop(k),
    "cache_clear": lambda g, k: g.cache_clear(),
}


@pytest.mark.parametrize("how", list(FORGETS))
@pytest.mark.parametrize("entry", ["do", "do_with_role"])
async def test_a_flight_forgotten_while_it_runs_does_not_fill_the_cache(
    how: str, entry: str
) -> None:
    """The read is in flight, the caller writes and forgets: the old read lands, its callers
    get its value, and the next call runs the work again instead of getting the stale value."""
    g: Group[Any] = Group(TTLCache(16, 60))
    old = AsyncWork("old")
    call = g.do if entry == "do" else g.do_with_role
    first = asyncio.create_task(call("k", old))
    follower = asyncio.create_task(call("k", anever))
    async with asyncio.timeout(TIMEOUT):
        await old.started.wait()
    await async_wait_until(followers_waiting(g, 1), "the follower joined")
    FORGETS[how](g, "k")
    old.release()
    got = await asyncio.wait_for(asyncio.gather(first, follower), TIMEOUT)
    roles = [("old", "leader"), ("old", "follower")]
    expected: list[Any] = ["old", "old"] if entry == "do" else roles
    assert got == expected
    assert "k" not in g.cache  # type: ignore[operator]
    new = AsyncWork("new")
    new.release()
    assert await asyncio.wait_for(g.do("k", new), TIMEOUT) == "new"
    assert new.calls == 1
    assert await g.do_with_role("k", anever) == ("new", "cache")  # a fresh flight stores
    assert_idle(g)


@pytest.mark.parametrize("how", list(FORGETS))
def test_a_sync_flight_forgotten_while_it_runs_does_not_fill_the_cache(how: str) -> None:
    g: Group[Any] = Group(TTLCache(16, 60))
    old = SyncWork("old")
    first = start(g.do_sync_with_role, "k", old)
    assert old.started.wait(TIMEOUT)
    FORGETS[how](g, "k")
    old.release()
    assert first.outcome() == ("old", "leader")
    assert g.do_sync_with_role("k", lambda: "new") == ("new", "leader")
    assert g.do_sync_with_role("k", lambda: "never") == ("new", "cache")
    assert_idle(g)


async def test_go_forget_with_a_cache_third_caller_joins_the_second_run() -> None:
    """Go's TestForget with ttl on: after the forgotten run lands, a third caller must join
    the second run and get its value (it used to be served the forgotten run's value)."""
    g: Group[Any] = Group(TTLCache(16, 60))
    first, second = AsyncWork(1), AsyncWork(2)
    t1 = asyncio.create_task(g.do("k", first))
    async with asyncio.timeout(TIMEOUT):
        await first.started.wait()
    g.forget("k")
    t2 = asyncio.create_task(g.do("k", second))
    async with asyncio.timeout(TIMEOUT):
        await second.started.wait()
    first.release()
    assert await asyncio.wait_for(t1, TIMEOUT) == 1  # the forgotten run landed
    t3 = asyncio.create_task(g.do_with_role("k", anever))
    await async_wait_until(followers_waiting(g, 1), "call 3 joined the second run")
    second.release()
    assert await asyncio.wait_for(asyncio.gather(t2, t3), TIMEOUT) == [2, (2, "follower")]
    assert await g.do_with_role("k", anever) == (2, "cache")
    assert (first.calls, second.calls) == (1, 1)
    assert_idle(g)


def test_go_forget_with_a_cache_in_threads() -> None:
    g: Group[Any] = Group(TTLCache(16, 60))
    first, second = SyncWork(1), SyncWork(2)
    t1 = start(g.do_sync, "k", first)
    assert first.started.wait(TIMEOUT)
    g.forget("k")
    t2 = start(g.do_sync, "k", second)
    assert second.started.wait(TIMEOUT)
    first.release()
    assert t1.outcome() == 1
    t3 = start(g.do_sync_with_role, "k", lambda: "never")
    wait_until(followers_waiting(g, 1), "call 3 joined the second run")
    second.release()
    assert (t2.outcome(), t3.outcome()) == (2, (2, "follower"))
    assert_idle(g)


async def test_forget_drops_a_value_cached_before_it() -> None:
    """Group.forget means "the next caller runs the work": a cached value goes too."""
    g: Group[str] = Group(TTLCache(16, 60))

    async def work() -> str:
        return "v1"

    assert await g.do("k", work) == "v1"
    g.forget("k")
    assert "k" not in g.cache  # type: ignore[operator]


@pytest.mark.parametrize("how", ["forget", "cache_pop", "cache_clear"])
async def test_decorator_forget_during_a_read_wins(how: str) -> None:
    """The issue's story with @singleflight(ttl=60): a read is in flight, the caller writes,
    then forgets; the old read lands and must not answer the next call for 60 s."""
    db = {"x": "old"}
    gate = asyncio.Event()
    reads: list[str] = []

    @singleflight(ttl=60)
    async def read(name: str) -> str:
        value = db[name]
        reads.append(value)
        if len(reads) == 1:
            await gate.wait()
        return value

    first = asyncio.create_task(read("x"))
    await async_wait_until(lambda: len(reads) == 1, "the read started")
    db["x"] = "new"
    if how == "cache_clear":
        read.cache_clear()
    else:
        getattr(read, how)("x")
    gate.set()
    assert await asyncio.wait_for(first, TIMEOUT) == "old"  # its own caller still gets it
    assert await asyncio.wait_for(read("x"), TIMEOUT) == "new"
    assert await read("x") == "new" and reads == ["old", "new"]
    assert_idle(read.group)


def test_sync_decorator_cache_pop_during_a_read_wins() -> None:
    db = {"x": "old"}
    gate = SyncWork()

    @singleflight(ttl=60)
    def read(name: str) -> str:
        value = db[name]
        if not gate.calls:
            gate()  # the first read blocks until released
        return value

    first = start(read, "x")
    assert gate.started.wait(TIMEOUT)
    db["x"] = "new"
    read.cache_pop("x")
    gate.release()
    assert first.outcome() == "old"
    assert read("x") == "new"
    assert_idle(read.group)


# -- sync work: GeneratorExit is an exception like any other ---------------------------------


class _Closes:
    """Sync work that raises GeneratorExit (e.g. it closed a generator badly), counting runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = SyncWork()

    def __call__(self) -> Any:
        self.calls += 1
        self.gate()
        raise GeneratorExit("closed by the work itself")


def test_generator_exit_raised_by_sync_work_is_shared_once() -> None:
    """Issue 10: in a thread nothing closes the work with a loop, so a GeneratorExit it
    raises is its outcome, shared once, not a cancelled leader (5 callers ran it 5 times)."""
    g: Group[Any] = Group()
    work = _Closes()
    leader = start(g.do_sync, "k", work)
    assert work.gate.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", work) for _ in range(4)]
    wait_until(followers_waiting(g, 4), "4 followers wait")
    work.gate.release()
    for c in (leader, *followers):
        c.finish()
        assert isinstance(c.exception, GeneratorExit), c.exception
    assert {id(c.exception) for c in (leader, *followers)} == {id(leader.exception)}
    assert work.calls == 1
    assert (g.stats.errors, g.stats.reelections) == (1, 0)
    assert_idle(g)


def test_sync_reelect_on_still_hands_the_flight_over() -> None:
    """The user's reelect_on keeps working for sync work (the HTTP sync transport's timeouts)."""

    class Mine(Exception):
        pass

    g: Group[Any] = Group(reelect_on=(Mine,))
    first = SyncWork(raises=Mine())
    leader = start(g.do_sync, "k", first)
    assert first.started.wait(TIMEOUT)
    follower = start(g.do_sync, "k", lambda: "mine")
    wait_until(followers_waiting(g, 1), "the follower waits")
    first.release()
    leader.finish()
    assert isinstance(leader.exception, Mine)
    assert follower.outcome() == "mine"
    assert g.stats.reelections == 1
    assert_idle(g)
