"""Group: one flight per key, from asyncio, threads and trio (acceptance cases 1-30, Go port).

Case numbers refer to "Acceptance cases to port" in the research notes; Go names to
golang/sync ``singleflight_test.go``. Cancellation has its own file (test_cancellation.py),
stress and leak checks theirs (test_stress.py).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import traceback
from itertools import pairwise
from typing import Any

import pytest

from singleflight import Group, ReentrancyError

from .core_helpers import (
    TIMEOUT,
    AsyncWork,
    Caller,
    LoopThread,
    SyncWork,
    anever,
    assert_idle,
    async_wait_until,
    finish_all,
    followers_waiting,
    never,
    start,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


class MyErr(Exception):
    pass


class MyBaseErr(BaseException):
    """A BaseException that is neither a cancellation nor KeyboardInterrupt/SystemExit."""


async def _gather(*aws: Any) -> list[Any]:
    async with asyncio.timeout(TIMEOUT):
        return await asyncio.gather(*aws, return_exceptions=True)


# =============================================================================================
# Basics
# =============================================================================================


async def test_do_returns_the_value_of_a_single_call() -> None:
    """Case 1, Go TestDo."""
    g: Group[str] = Group()
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        return "bar"

    assert await g.do("key", fn) == "bar"
    assert calls == 1
    assert g.stats.leaders == 1 and g.stats.followers == 0
    assert_idle(g)


def test_do_sync_returns_the_value_of_a_single_call() -> None:
    """Case 1 (threads), Go TestDo."""
    g: Group[str] = Group()
    calls = []
    assert g.do_sync("key", lambda: calls.append(1) or "bar") == "bar"
    assert calls == [1]
    assert_idle(g)


async def test_do_passes_args_and_kwargs_to_fn() -> None:
    g: Group[tuple[Any, ...]] = Group()

    async def fn(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    assert await g.do("k", fn, 1, 2, x=3) == ((1, 2), {"x": 3})
    assert g.do_sync("k", lambda *a, **kw: (a, kw), 1, y=2) == ((1,), {"y": 2})
    assert_idle(g)


async def test_do_raises_the_very_exception_and_does_not_cache_it() -> None:
    """Case 2, Go TestDoErr: the caller's exception *is* fn's; the next call runs afresh."""
    g: Group[str] = Group()
    err = ValueError("some")

    async def bad() -> str:
        raise err

    with pytest.raises(ValueError) as info:
        await g.do("key", bad)
    assert info.value is err
    assert_idle(g)

    async def good() -> str:
        return "fine"

    assert await g.do("key", good) == "fine"
    assert g.stats.errors == 1
    assert_idle(g)


def test_do_sync_raises_the_very_exception_and_does_not_cache_it() -> None:
    """Case 2 (threads), Go TestDoErr."""
    g: Group[str] = Group()
    err = ValueError("some")

    def bad() -> str:
        raise err

    with pytest.raises(ValueError) as info:
        g.do_sync("key", bad)
    assert info.value is err
    assert g.do_sync("key", lambda: "fine") == "fine"
    assert g.stats.errors == 1
    assert_idle(g)


async def test_concurrent_calls_share_one_run_and_get_the_same_object() -> None:
    """Case 3: 10 tasks, deterministic: all get the same object, fn ran once."""
    g: Group[object] = Group()
    work = AsyncWork()
    tasks = [asyncio.create_task(g.do("key", work)) for _ in range(10)]
    await async_wait_until(followers_waiting(g, 9), "9 followers wait")
    work.release()
    results = await _gather(*tasks)
    assert work.calls == 1
    assert all(r is results[0] for r in results) and results[0] is work.returned[0]
    assert g.stats == type(g.stats)(calls=10, leaders=1, followers=9, cache_hits=0, errors=0)
    assert_idle(g)


def test_threads_dedup_go_style() -> None:
    """Case 4, Go TestDoDupSuppress: at least one duplicate is suppressed (1 <= calls < 10)."""
    g: Group[str] = Group()
    n = 10
    first_started = threading.Event()
    release = threading.Event()
    reached = threading.Semaphore(0)  # Go's wg1: "I am at the line before Do"
    calls = []

    def fn() -> str:
        calls.append(1)
        first_started.set()
        assert release.wait(TIMEOUT)
        time.sleep(0.01)  # keep the flight open a little, like Go's test
        return "bar"

    def caller() -> str:
        reached.release()
        return g.do_sync("key", fn)

    threads = [start(caller) for _ in range(n)]
    assert first_started.wait(TIMEOUT)
    for _ in range(n):  # every caller is at the line before do_sync
        assert reached.acquire(timeout=TIMEOUT)
    release.set()
    finish_all(threads)
    assert [t.outcome() for t in threads] == ["bar"] * n
    assert 1 <= len(calls) < n
    assert_idle(g)


def test_threads_dedup_strict_when_all_followers_wait() -> None:
    """Case 4, strict: release only after the 9 followers are known to wait: exactly one run."""
    g: Group[object] = Group()
    work = SyncWork()
    leader = start(g.do_sync, "key", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "key", never) for _ in range(9)]
    wait_until(followers_waiting(g, 9), "9 followers wait")
    work.release()
    finish_all([leader, *followers])
    value = leader.outcome()
    assert value is work.returned[0]
    assert all(f.outcome() is value for f in followers)
    assert work.calls == 1
    assert_idle(g)


async def test_distinct_keys_run_concurrently_without_a_global_lock() -> None:
    """Case 5: fa waits until fb started: only possible if no lock is held around the work."""
    g: Group[str] = Group()
    b_started = asyncio.Event()

    async def fa() -> str:
        await b_started.wait()
        return "a"

    async def fb() -> str:
        b_started.set()
        return "b"

    ta = asyncio.create_task(g.do("a", fa))
    tb = asyncio.create_task(g.do("b", fb))
    assert await _gather(ta, tb) == ["a", "b"]
    assert g.stats.leaders == 2
    assert_idle(g)


def test_distinct_keys_run_concurrently_in_threads() -> None:
    """Case 5 (threads)."""
    g: Group[str] = Group()
    b_started = threading.Event()

    def fa() -> str:
        assert b_started.wait(TIMEOUT), "fb never started while fa ran: a lock is held"
        return "a"

    def fb() -> str:
        b_started.set()
        return "b"

    ta = start(g.do_sync, "a", fa)
    tb = start(g.do_sync, "b", fb)
    assert (ta.outcome(), tb.outcome()) == ("a", "b")
    assert_idle(g)


async def test_sequential_calls_each_run_fn_nothing_is_memoised() -> None:
    """Case 6."""
    g: Group[int] = Group()
    counter = 0

    async def fn() -> int:
        nonlocal counter
        counter += 1
        return counter

    assert [await g.do("k", fn), await g.do("k", fn)] == [1, 2]
    assert [g.do_sync("k", lambda: 3), g.do_sync("k", lambda: 4)] == [3, 4]
    assert_idle(g)


def test_nobody_joins_a_finished_flight_threads() -> None:
    """Case 6 stress (Go CL 436495): a call that starts after another call returned v never
    gets v again. Three threads hammer one key; each thread's results strictly increase."""
    g: Group[int] = Group()
    lock = threading.Lock()
    counter = [0]

    def fn() -> int:
        with lock:
            counter[0] += 1
            return counter[0]

    def hammer() -> list[int]:
        return [g.do_sync("k", fn) for _ in range(1000)]

    threads = [start(hammer) for _ in range(3)]
    finish_all(threads, timeout=20)
    for t in threads:
        seen = t.outcome()
        assert all(a < b for a, b in pairwise(seen)), "a call joined a finished flight"
    assert_idle(g)


async def test_nobody_joins_a_finished_flight_async() -> None:
    """Case 6 stress (asyncio): consecutive results of every task strictly increase."""
    g: Group[int] = Group()
    counter = 0

    async def fn() -> int:
        nonlocal counter
        await asyncio.sleep(0)
        counter += 1
        return counter

    async def hammer() -> list[int]:
        return [await g.do("k", fn) for _ in range(300)]

    results = await _gather(*(hammer() for _ in range(4)))
    for seen in results:
        assert all(a < b for a, b in pairwise(seen)), "a call joined a finished flight"
    assert_idle(g)


async def test_roles_say_leader_alone_and_follower_when_joined() -> None:
    """Case 7 (the "shared" flag): the role says how each call was served."""
    g: Group[object] = Group()

    async def lone() -> str:
        return "x"

    assert await g.do_with_role("k", lone) == ("x", "leader")
    work = AsyncWork()
    leader = asyncio.create_task(g.do_with_role("k", work))
    follower = asyncio.create_task(g.do_with_role("k", anever))
    await async_wait_until(followers_waiting(g, 1), "the follower waits")
    work.release()
    (lv, lrole), (fv, frole) = await _gather(leader, follower)
    assert (lrole, frole) == ("leader", "follower") and lv is fv
    assert_idle(g)


def test_sync_roles_say_leader_alone_and_follower_when_joined() -> None:
    """Case 7 (threads)."""
    g: Group[object] = Group()
    assert g.do_sync_with_role("k", lambda: "x") == ("x", "leader")
    work = SyncWork()
    leader = start(g.do_sync_with_role, "k", work)
    assert work.started.wait(TIMEOUT)
    follower = start(g.do_sync_with_role, "k", never)
    wait_until(followers_waiting(g, 1), "the follower waits")
    work.release()
    (lv, lrole), (fv, frole) = leader.outcome(), follower.outcome()
    assert (lrole, frole) == ("leader", "follower") and lv is fv
    assert_idle(g)


# =============================================================================================
# Errors, panics, BaseException
# =============================================================================================


async def test_shared_failure_reaches_every_waiter_and_is_not_cached() -> None:
    """Case 8 (async-lru test_alru_exception)."""
    g: Group[object] = Group()
    err = ZeroDivisionError("shared")
    work = AsyncWork(raises=err)
    tasks = [asyncio.create_task(g.do("k", work)) for _ in range(5)]
    await async_wait_until(followers_waiting(g, 4), "4 followers wait")
    work.release()
    results = await _gather(*tasks)
    assert all(r is err for r in results), results
    assert work.calls == 1 and g.stats.errors == 1
    assert_idle(g)
    work.raises = None
    await g.do("k", work)
    assert work.calls == 2
    assert_idle(g)


def test_shared_failure_reaches_every_thread_and_is_not_cached() -> None:
    """Case 8 (threads)."""
    g: Group[object] = Group()
    err = ZeroDivisionError("shared")
    work = SyncWork(raises=err)
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", never) for _ in range(4)]
    wait_until(followers_waiting(g, 4), "4 followers wait")
    work.release()
    finish_all([leader, *followers])
    assert all(c.exception is err for c in [leader, *followers])
    assert work.calls == 1 and g.stats.errors == 1
    assert_idle(g)
    work.raises = None
    g.do_sync("k", work)
    assert work.calls == 2
    assert_idle(g)


async def test_immediate_failure_storm_every_caller_raises_promptly() -> None:
    """Case 9, Go TestPanicDo: fn fails at once; 5 callers all raise within 1 s."""
    g: Group[object] = Group()

    async def boom() -> object:
        raise RuntimeError("panic")

    async with asyncio.timeout(1):
        results = await asyncio.gather(*(g.do("k", boom) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert_idle(g)


def test_immediate_failure_storm_in_threads_every_caller_raises_promptly() -> None:
    """Case 9 (threads), Go TestPanicDo."""
    g: Group[object] = Group()
    barrier = threading.Barrier(5, timeout=TIMEOUT)

    def boom() -> object:
        raise RuntimeError("panic")

    def caller() -> object:
        barrier.wait()
        return g.do_sync("k", boom)

    threads = [start(caller) for _ in range(5)]
    finish_all(threads, timeout=1)
    assert all(isinstance(t.exception, RuntimeError) for t in threads)
    assert_idle(g)


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, MyBaseErr])
def test_base_exception_in_sync_leader_reaches_followers_promptly(
    exc_type: type[BaseException],
) -> None:
    """Case 10, Go TestGoexitDo, the concurrent-coalesce bug: nobody hangs, nobody returns."""
    g: Group[object] = Group()
    exc = exc_type("stop")
    work = SyncWork(raises=exc)
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", never) for _ in range(4)]
    wait_until(followers_waiting(g, 4), "4 followers wait")
    work.release()
    finish_all([leader, *followers], timeout=1)
    assert leader.exception is exc
    assert all(f.exception is exc for f in followers), [f.exception for f in followers]
    assert all(c.result is None for c in [leader, *followers])
    assert_idle(g)
    assert g.do_sync("k", lambda: "usable") == "usable"


async def test_base_exception_in_async_leader_reaches_every_waiter() -> None:
    """Case 11: a non-cancellation BaseException inside fn is shared, not a re-election."""
    g: Group[object] = Group()
    exc = MyBaseErr("stop")
    work = AsyncWork(raises=exc)
    tasks = [asyncio.create_task(g.do("k", work)) for _ in range(4)]
    await async_wait_until(followers_waiting(g, 3), "3 followers wait")
    work.release()
    results = await _gather(*tasks)
    assert all(r is exc for r in results), results
    assert work.calls == 1
    assert_idle(g)


async def test_exception_type_is_preserved_for_every_waiter() -> None:
    """Case 12, Go TestPanicErrorUnwrap: never wrapped (or, if wrapped, chained)."""
    g: Group[object] = Group()
    work = AsyncWork(raises=MyErr("typed"))
    tasks = [asyncio.create_task(g.do("k", work)) for _ in range(3)]
    await async_wait_until(followers_waiting(g, 2), "2 followers wait")
    work.release()
    for r in await _gather(*tasks):
        assert isinstance(r, MyErr) or isinstance(r.__cause__, MyErr), r
    assert_idle(g)


def test_exception_type_is_preserved_for_every_thread() -> None:
    """Case 12 (threads)."""
    g: Group[object] = Group()
    work = SyncWork(raises=MyErr("typed"))
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", never) for _ in range(2)]
    wait_until(followers_waiting(g, 2), "2 followers wait")
    work.release()
    finish_all([leader, *followers])
    assert all(isinstance(c.exception, MyErr) for c in [leader, *followers])
    assert_idle(g)


def test_shared_exception_traceback_does_not_grow_with_every_follower() -> None:
    """Case 13: 50 threads share one failure; each sees a traceback of bounded depth."""
    g: Group[object] = Group()
    work = SyncWork(raises=MyErr("deep"))

    def caller(f: Any) -> int:
        try:
            g.do_sync("k", f)
        except MyErr as exc:
            return len(traceback.extract_tb(exc.__traceback__))
        raise AssertionError("no exception")

    leader = start(caller, work)
    assert work.started.wait(TIMEOUT)
    followers = [start(caller, never) for _ in range(49)]
    wait_until(followers_waiting(g, 49), "49 followers wait")
    work.release()
    finish_all([leader, *followers])
    leader_depth = leader.outcome()
    depths = [f.outcome() for f in followers]
    assert max(depths) <= leader_depth + 5, (leader_depth, sorted(depths)[-5:])
    assert_idle(g)


# =============================================================================================
# Forget
# =============================================================================================


@pytest.mark.parametrize("third_joins", ["before_first_lands", "after_first_landed"])
async def test_go_forget_sequence(third_joins: str) -> None:
    """Case 14, Go TestForget (asyncio), with the third call joining before or after the first
    flight's cleanup: it must join the second flight, never start a third (golang/go#31420)."""
    g: Group[int] = Group()
    first, second = AsyncWork(1), AsyncWork(2)
    t1 = asyncio.create_task(g.do("k", first))
    async with asyncio.timeout(TIMEOUT):
        await first.started.wait()
    g.forget("k")
    t2 = asyncio.create_task(g.do("k", second))
    async with asyncio.timeout(TIMEOUT):
        await second.started.wait()  # a NEW run started: the key was forgotten
    assert (first.calls, second.calls) == (1, 1)
    followers_before = g.stats.followers
    if third_joins == "before_first_lands":
        t3 = asyncio.create_task(g.do("k", anever))
        await async_wait_until(followers_waiting(g, followers_before + 1), "call 3 joined")
        first.release()
        assert await t1 == 1
    else:
        first.release()
        assert await t1 == 1  # the first flight has landed and cleaned up
        t3 = asyncio.create_task(g.do("k", anever))
        await async_wait_until(followers_waiting(g, followers_before + 1), "call 3 joined")
    assert g.in_flight == 1, "the first flight's cleanup must not remove the second's entry"
    second.release()
    assert await _gather(t2, t3) == [2, 2]
    assert g.stats.leaders == 2
    assert_idle(g)


@pytest.mark.parametrize("wait_for_cleanup", [True, False])
def test_go_forget_sequence_in_threads(wait_for_cleanup: bool) -> None:
    """Case 14 (threads), Go TestForget, with and without waiting for call 1's cleanup."""
    g: Group[int] = Group()
    first, second = SyncWork(1), SyncWork(2)
    t1 = start(g.do_sync, "k", first)
    assert first.started.wait(TIMEOUT)
    g.forget("k")
    t2 = start(g.do_sync, "k", second)
    assert second.started.wait(TIMEOUT), "after forget the next call must start a new run"
    first.release()
    if wait_for_cleanup:
        assert t1.outcome() == 1
    followers_before = g.stats.followers
    t3 = start(g.do_sync, "k", never)  # races call 1's landing when not waiting for it
    wait_until(followers_waiting(g, followers_before + 1), "call 3 joined")
    assert t1.outcome() == 1
    second.release()
    assert (t2.outcome(), t3.outcome()) == (2, 2)
    assert (first.calls, second.calls) == (1, 1)
    assert_idle(g)


async def test_forget_keeps_current_waiters_on_the_old_flight() -> None:
    """Case 15: waiters that joined before forget still get the old flight's value."""
    g: Group[object] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    old_followers = [asyncio.create_task(g.do("k", anever)) for _ in range(3)]
    await async_wait_until(followers_waiting(g, 3), "3 followers wait")
    g.forget("k")
    g.forget("k")  # twice is the same as once
    work.release()
    results = await _gather(leader, *old_followers)
    assert all(r is results[0] for r in results) and work.calls == 1
    assert_idle(g)


def test_forget_keeps_current_thread_waiters_and_unknown_key_is_a_no_op() -> None:
    """Case 15 (threads)."""
    g: Group[object] = Group()
    g.forget("never-seen")
    work = SyncWork()
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", never) for _ in range(3)]
    wait_until(followers_waiting(g, 3), "3 followers wait")
    g.forget("k")
    work.release()
    finish_all([leader, *followers])
    assert all(f.outcome() is leader.outcome() for f in followers)
    assert_idle(g)


def test_forget_racing_a_landing_leaves_no_stale_state() -> None:
    """forget() that reads a flight just before it lands must not leave a mark behind.

    White-box, deterministic: a trace hook pauses ``OnceMap.forget`` right after it has read
    the current flight (its local ``head``) until that flight has landed. Afterwards nothing
    may remain, and one key must still run one flight at a time: a stale "forgotten" mark
    whose id is reused by a later flight makes its followers start duplicate runs.
    """
    import sys

    from singleflight._oncemap import OnceMap

    g: Group[object] = Group()
    landed, paused = threading.Event(), threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not OnceMap.forget.__code__:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_locals.get("head") is not None and not paused.is_set():
                paused.set()
                assert landed.wait(TIMEOUT)
            return local

        return local

    def forget_traced() -> None:
        sys.settrace(tracer)
        try:
            g.forget("k")
        finally:
            sys.settrace(None)

    work = SyncWork("v")
    leader = start(lambda: (g.do_sync("k", work), landed.set()))
    assert work.started.wait(TIMEOUT)
    forgetter = start(forget_traced)
    assert paused.wait(TIMEOUT), "could not pause forget() after it read the flight"
    work.release()
    finish_all([leader, forgetter])
    assert_idle(g)
    # Behaviour: one flight per key still holds, round after round.
    for _ in range(20):
        w = SyncWork()
        lead = start(g.do_sync, "k", w)
        assert w.started.wait(TIMEOUT)
        followers_before = g.stats.followers
        follower = start(g.do_sync, "k", w)
        wait_until(
            lambda fb=followers_before, w=w: g.stats.followers > fb or w.calls > 1,
            "the second caller joined or started",
        )
        w.release()
        finish_all([lead, follower])
        assert w.calls == 1, "a second caller started a duplicate run of an in-flight key"
    assert_idle(g)


# =============================================================================================
# Background calls (Go DoChan analogues: a task running g.do)
# =============================================================================================


async def test_go_do_chan_background_call_resolves_to_the_value() -> None:
    """Go TestDoChan."""
    g: Group[str] = Group()

    async def fn() -> str:
        return "bar"

    task = asyncio.create_task(g.do("key", fn))
    assert await _gather(task) == ["bar"]
    assert_idle(g)


async def test_go_example_group_second_background_call_shares_the_first() -> None:
    """Case 16, Go ExampleGroup: both get "func 1", fn2 never runs, the second is a follower."""
    g: Group[str] = Group()
    block = asyncio.Event()
    ran = []

    async def fn1() -> str:
        ran.append("fn1")
        await block.wait()
        return "func 1"

    async def fn2() -> str:
        ran.append("fn2")
        return "func 2"

    res1 = asyncio.create_task(g.do_with_role("key", fn1))
    await asyncio.sleep(0)
    res2 = asyncio.create_task(g.do_with_role("key", fn2))
    await async_wait_until(followers_waiting(g, 1), "the second call joined")
    block.set()
    (v1, _), (v2, role2) = await _gather(res1, res2)
    assert (v1, v2, role2, ran) == ("func 1", "func 1", "follower", ["fn1"])
    assert_idle(g)


async def test_go_panic_do_chan_failure_is_delivered_to_the_background_call() -> None:
    """Case 17, Go TestPanicDoChan: never pending forever, never swallowed."""
    g: Group[str] = Group()

    async def boom() -> str:
        raise MyErr("Panicking in DoChan")

    task = asyncio.create_task(g.do("", boom))
    with pytest.raises(MyErr, match="Panicking in DoChan"):
        async with asyncio.timeout(TIMEOUT):
            await task
    assert_idle(g)


async def test_go_panic_do_shared_by_do_chan_follower_gets_it_and_never_runs() -> None:
    """Case 17, Go TestPanicDoSharedByDoChan."""
    g: Group[str] = Group()
    work = AsyncWork(raises=MyErr("Panicking in Do"))
    leader = asyncio.create_task(g.do("", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()

    async def unexpected() -> str:
        raise AssertionError("DoChan unexpectedly executed callback")

    background = asyncio.create_task(g.do("", unexpected))
    await async_wait_until(followers_waiting(g, 1), "the background call joined")
    work.release()
    results = await _gather(leader, background)
    assert [str(r) for r in results] == ["Panicking in Do"] * 2
    assert results[0] is results[1]
    assert_idle(g)


# =============================================================================================
# Re-entrancy, bad input, fresh callables
# =============================================================================================


async def test_async_flight_awaiting_its_own_key_raises_reentrancy_error() -> None:
    """Case 25: a clear error within 1 s instead of a deadlock; a nested different key works."""
    g: Group[str] = Group()

    async def inner() -> str:
        return "inner"

    async def outer() -> str:
        return await g.do("same", inner)

    with pytest.raises(ReentrancyError, match="own key") as info:
        async with asyncio.timeout(1):
            await g.do("same", outer)
    assert isinstance(info.value, RuntimeError)
    assert "'same'" in str(info.value)
    assert_idle(g)

    async def outer_other() -> str:
        return await g.do("other", inner)

    async with asyncio.timeout(1):
        assert await g.do("same", outer_other) == "inner"
    assert_idle(g)


async def test_async_reentrancy_is_detected_through_a_do_with_role_leader() -> None:
    g: Group[str] = Group()

    async def outer() -> str:
        value, _ = await g.do_with_role("k", anever)
        return value

    with pytest.raises(ReentrancyError):
        async with asyncio.timeout(1):
            await g.do_with_role("k", outer)
    assert_idle(g)


def test_sync_flight_calling_its_own_key_raises_reentrancy_error() -> None:
    """Case 26: do_sync re-entered on the leader's thread fails at once."""
    g: Group[str] = Group()

    def outer() -> str:
        return g.do_sync("same", lambda: "inner")

    caller = start(g.do_sync, "same", outer)
    caller.finish(timeout=1)
    assert isinstance(caller.exception, ReentrancyError), caller.exception
    assert g.do_sync("same", lambda: g.do_sync("other", lambda: "nested")) == "nested"
    assert_idle(g)


def test_sync_flight_running_an_event_loop_on_its_own_key_raises_reentrancy_error() -> None:
    """A sync leader whose work runs asyncio.run(g.do(same key)) would wait on itself."""
    g: Group[str] = Group()

    def outer() -> str:
        return asyncio.run(g.do("same", anever))

    caller = start(g.do_sync, "same", outer)
    caller.finish(timeout=1)
    assert isinstance(caller.exception, ReentrancyError), caller.exception
    assert_idle(g)


async def test_unhashable_key_raises_type_error_at_once_and_leaves_nothing() -> None:
    """Case 29 (async): the message names the key and suggests key=."""
    g: Group[object] = Group()
    with pytest.raises(TypeError, match=r"\[1, 2\].*key=") as info:
        await g.do([1, 2], anever)
    assert "hashable" in str(info.value)
    with pytest.raises(TypeError):
        await g.do_with_role({"a": 1}, anever)
    assert_idle(g)
    assert g.stats.calls == 0


def test_unhashable_key_raises_type_error_in_do_sync() -> None:
    """Case 29 (threads)."""
    g: Group[object] = Group()
    with pytest.raises(TypeError, match=r"\[1, 2\].*key="):
        g.do_sync([1, 2], never)
    assert_idle(g)


async def test_followers_own_fns_never_run_and_leave_no_warnings() -> None:
    """Case 30: only the leader's fn runs; followers' fns are not even called (no coroutine
    is created, so no "never awaited" RuntimeWarning, which this suite turns into errors)."""
    g: Group[object] = Group()
    work = AsyncWork()
    called = []

    async def follower_fn() -> object:
        called.append(1)
        return object()

    leader = asyncio.create_task(g.do("k", work))
    followers = [asyncio.create_task(g.do("k", follower_fn)) for _ in range(5)]
    await async_wait_until(followers_waiting(g, 5), "5 followers wait")
    work.release()
    await _gather(leader, *followers)
    gc.collect()
    assert called == [] and work.calls == 1
    assert_idle(g)


def test_thread_followers_own_fns_never_run() -> None:
    """Case 30 (threads)."""
    g: Group[object] = Group()
    work = SyncWork()
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync, "k", never) for _ in range(5)]
    wait_until(followers_waiting(g, 5), "5 followers wait")
    work.release()
    finish_all([leader, *followers])
    assert all(f.outcome() is leader.outcome() for f in followers)
    assert_idle(g)


def test_group_rejects_a_cache_that_is_not_a_mapping_and_bad_reelect_on() -> None:
    with pytest.raises(TypeError, match="MutableMapping"):
        Group(cache=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reelect_on"):
        Group(reelect_on=[TimeoutError])  # type: ignore[arg-type]


async def test_group_with_a_cache_serves_hits_without_a_flight() -> None:
    g: Group[object] = Group(cache={})
    work = AsyncWork()
    work.release()
    first = await g.do_with_role("k", work)
    second = await g.do_with_role("k", anever)
    assert first[1] == "leader" and second == (first[0], "cache")
    assert g.do_sync_with_role("k", never) == (first[0], "cache")
    assert g.stats.cache_hits == 2 and g.stats.calls == 3
    assert_idle(g)


# =============================================================================================
# Cross-world: loops in other threads, plain threads, sync leaders, trio
# =============================================================================================


async def test_async_leader_serves_followers_in_another_loop_and_in_plain_threads() -> None:
    g: Group[object] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()
    with LoopThread() as other:
        remote = [other.submit(g.do("k", anever)) for _ in range(2)]
        threads = [start(g.do_sync, "k", never) for _ in range(2)]
        await async_wait_until(followers_waiting(g, 4), "4 followers in other worlds wait")
        work.release()
        value = (await _gather(leader))[0]
        assert value is work.returned[0]
        assert all(f.result(TIMEOUT) is value for f in remote)
        finish_all(threads)
        assert all(t.outcome() is value for t in threads)
    assert work.calls == 1
    assert_idle(g)


async def test_sync_leader_serves_async_followers_in_this_and_another_loop() -> None:
    g: Group[object] = Group()
    work = SyncWork()
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    with LoopThread() as other:
        remote = other.submit(g.do("k", anever))
        local = [asyncio.create_task(g.do("k", anever)) for _ in range(3)]
        await async_wait_until(followers_waiting(g, 4), "4 async followers wait")
        work.release()
        results = await _gather(*local)
        value = leader.outcome()
        assert all(r is value for r in results)
        assert remote.result(TIMEOUT) is value
    assert work.calls == 1
    assert_idle(g)


async def test_sync_leaders_exception_reaches_async_followers() -> None:
    g: Group[object] = Group()
    err = MyBaseErr("from a thread")
    work = SyncWork(raises=err)
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    local = [asyncio.create_task(g.do("k", anever)) for _ in range(2)]
    await async_wait_until(followers_waiting(g, 2), "2 async followers wait")
    work.release()
    assert await _gather(*local) == [err, err]
    assert leader.finish().exception is err
    assert_idle(g)


def test_group_is_reused_across_two_asyncio_run_calls() -> None:
    """Case 28: no "attached to a different loop" error, no stale entry."""
    g: Group[object] = Group()

    async def round_() -> list[Any]:
        work = AsyncWork()
        tasks = [asyncio.create_task(g.do("k", work)) for _ in range(3)]
        await async_wait_until(followers_waiting(g, g.stats.followers + 2), "followers wait")
        work.release()
        return await _gather(*tasks)

    for _ in range(2):
        results = asyncio.run(round_())
        assert all(r is results[0] for r in results)
        assert not isinstance(results[0], BaseException), results
        assert_idle(g)


def test_group_is_reused_after_a_loop_closed_with_a_flight_in_it() -> None:
    """Case 28: the first asyncio.run ends with a leader (and a follower) still in flight."""
    g: Group[object] = Group()
    ran = []

    async def slow() -> object:
        ran.append("slow")
        await asyncio.sleep(3600)
        return "never"

    async def first_run() -> None:
        asyncio.create_task(g.do("k", slow))
        asyncio.create_task(g.do("k", slow))
        await async_wait_until(followers_waiting(g, 1), "the follower waits")
        # return: asyncio.run cancels both tasks and closes the loop

    asyncio.run(first_run())
    assert_idle(g)
    assert ran == ["slow"], "only the leader ran; the cancelled follower must not re-run"

    async def fast() -> str:
        return "second loop"

    assert asyncio.run(g.do("k", fast)) == "second loop"
    assert_idle(g)


def test_a_follower_on_a_closed_loop_does_not_break_the_leaders_landing() -> None:
    """The follower's loop ended (its task cancelled, loop closed) while the leader runs on."""
    g: Group[object] = Group()
    work = SyncWork("value")
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)

    async def follow_then_leave() -> None:
        asyncio.create_task(g.do("k", anever))
        await async_wait_until(followers_waiting(g, 1), "the follower waits")

    asyncio.run(follow_then_leave())  # cancels the follower and closes its loop
    work.release()
    assert leader.outcome() == "value"
    assert_idle(g)


def test_trio_leader_and_followers_share_one_run() -> None:
    trio = pytest.importorskip("trio")
    g: Group[object] = Group()

    async def main() -> list[Any]:
        gate = trio.Event()
        calls = []

        async def work() -> object:
            calls.append(1)
            await gate.wait()
            return object()

        results: list[Any] = []

        async def call(fn: Any) -> None:
            results.append(await g.do("k", fn))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, work)
                await trio.sleep(0)
                for _ in range(4):
                    nursery.start_soon(call, anever)
                while g.stats.followers < 4:
                    await trio.sleep(0)
                gate.set()
        assert calls == [1]
        return results

    results = trio.run(main)
    assert len(results) == 5 and all(r is results[0] for r in results)
    assert_idle(g)


def test_cancelled_trio_leader_reelects_a_follower() -> None:
    """trio.Cancelled in the leader re-elects: one follower runs its own fn, the other follows."""
    trio = pytest.importorskip("trio")
    g: Group[object] = Group()
    runs: list[str] = []
    results: dict[str, Any] = {}

    async def main() -> None:
        gate = trio.Event()
        leader_scope = trio.CancelScope()

        async def work(tag: str) -> str:
            runs.append(tag)
            await gate.wait()
            return tag

        async def lead() -> None:
            with leader_scope:
                results["leader"] = await g.do("k", work, "leader")
            results.setdefault("leader", "cancelled")

        async def follow(tag: str) -> None:
            results[tag] = await g.do("k", work, tag)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lead)
                while not runs:
                    await trio.sleep(0)
                nursery.start_soon(follow, "f1")
                nursery.start_soon(follow, "f2")
                while g.stats.followers < 2:
                    await trio.sleep(0)
                leader_scope.cancel()
                while len(runs) < 2:
                    await trio.sleep(0)
                gate.set()

    trio.run(main)
    assert runs[0] == "leader" and len(runs) == 2, runs
    new_leader = runs[1]
    assert results == {"leader": "cancelled", "f1": new_leader, "f2": new_leader}
    assert_idle(g)


def test_trio_follower_of_an_asyncio_leader_in_another_thread() -> None:
    trio = pytest.importorskip("trio")
    g: Group[object] = Group()
    with LoopThread() as other:
        started = threading.Event()
        gate = threading.Event()

        async def work() -> str:
            started.set()
            while not gate.is_set():
                await asyncio.sleep(0.001)
            return "from asyncio"

        leader = other.submit(g.do("k", work))
        assert started.wait(TIMEOUT)

        async def follow() -> object:
            with trio.fail_after(TIMEOUT):
                return await g.do("k", anever)

        follower = start(trio.run, follow)
        wait_until(followers_waiting(g, 1), "the trio follower waits")
        gate.set()
        assert leader.result(TIMEOUT) == "from asyncio"
        assert follower.outcome() == "from asyncio"
    assert_idle(g)


def test_caller_thread_helper_reports_hangs() -> None:
    """The suite's own guard: a blocked caller fails ``finish`` instead of hanging the run."""
    never_set = threading.Event()
    c = Caller(never_set.wait)
    c.start()
    with pytest.raises(AssertionError, match="still blocked"):
        c.finish(timeout=0.05)
    never_set.set()
    c.finish()
