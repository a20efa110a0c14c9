"""OnceMap: the uv-style in-flight map protocol (register / done / fail / abandon / wait)."""

from __future__ import annotations

import asyncio
import time

import pytest

from singleflight import FlightAbandoned, OnceMap, SingleflightError

from .core_helpers import (
    TIMEOUT,
    Caller,
    LoopThread,
    all_waiters,
    assert_idle,
    finish_all,
    start,
    wait_until,
    waiters_in_flight,
)

pytestmark = pytest.mark.timeout(30)


async def _joined_task(m: OnceMap[str, object], key: str) -> asyncio.Task[object]:
    """Start ``m.wait(key)`` in a task and return once it is registered as a waiter."""
    task = asyncio.create_task(m.wait(key))
    await asyncio.sleep(0)  # the task's first step runs up to its first real await
    assert not task.done(), task
    return task


def _blocking_waiters(m: OnceMap[str, object], key: str, n: int, **kw: float) -> list[Caller]:
    callers = [start(m.wait_blocking, key, **kw) for _ in range(n)]
    wait_until(lambda: waiters_in_flight(m, key) >= n, f"{n} threads wait on {key!r}")
    return callers


# -- register ---------------------------------------------------------------------------------


def test_register_makes_only_the_first_caller_leader() -> None:
    m: OnceMap[str, int] = OnceMap()
    assert m.register("k") is not None
    assert m.register("k") is None
    assert m.register("other") is not None
    assert len(m) == 2 and "k" in m
    m.done("k", 1)
    m.done("other", 2)
    assert_idle(m)


def test_register_after_done_leads_a_new_flight_nothing_is_memoised() -> None:
    m: OnceMap[str, int] = OnceMap()
    assert m.register("k")
    m.done("k", 1)
    assert "k" not in m
    assert m.register("k") is not None
    m.done("k", 2)
    assert_idle(m)


def test_register_rejects_an_unhashable_key_and_leaves_nothing_behind() -> None:
    m: OnceMap[object, int] = OnceMap()
    with pytest.raises(TypeError):
        m.register(["not", "hashable"])
    assert_idle(m)


# -- done / fail / abandon reach async waiters -------------------------------------------------


async def test_done_gives_every_waiter_the_same_object() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    tasks = [await _joined_task(m, "k") for _ in range(5)]
    value = object()
    m.done("k", value)
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*tasks)
    assert all(r is value for r in results)
    assert_idle(m)


async def test_fail_gives_every_waiter_the_same_exception_object() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    tasks = [await _joined_task(m, "k") for _ in range(3)]
    err = ValueError("boom")
    m.fail("k", err)
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is err for r in results), results
    assert_idle(m)


async def test_abandon_makes_waiters_raise_flight_abandoned_and_register_again() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    tasks = [await _joined_task(m, "k") for _ in range(2)]
    m.abandon("k")
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, FlightAbandoned) for r in results), results
    assert isinstance(results[0], SingleflightError)
    assert "register" in str(results[0])
    assert_idle(m)
    # The way out the error names: register again, and lead.
    assert m.register("k") is not None
    m.done("k", "second try")
    assert_idle(m)


# -- unknown keys --------------------------------------------------------------------------------


async def test_wait_on_a_key_not_in_flight_raises_key_error() -> None:
    m: OnceMap[str, int] = OnceMap()
    with pytest.raises(KeyError, match="register"):
        await m.wait("nope")
    assert m.register("k")
    m.done("k", 1)
    with pytest.raises(KeyError):  # landed: nothing to wait for any more
        await m.wait("k")
    assert_idle(m)


def test_wait_blocking_on_a_key_not_in_flight_raises_key_error() -> None:
    m: OnceMap[str, int] = OnceMap()
    with pytest.raises(KeyError, match="register"):
        m.wait_blocking("nope", timeout=TIMEOUT)
    assert_idle(m)


@pytest.mark.parametrize("end", ["done", "fail", "abandon"])
def test_ending_a_flight_that_was_never_registered_raises_key_error(end: str) -> None:
    m: OnceMap[str, int] = OnceMap()
    args: tuple[object, ...] = {"done": (1,), "fail": (ValueError(),), "abandon": ()}[end]
    with pytest.raises(KeyError, match="not registered"):
        getattr(m, end)("nope", *args)
    assert m.register("k")
    m.done("k", 1)
    with pytest.raises(KeyError):  # ending it twice is the same mistake
        getattr(m, end)("k", *args)
    assert_idle(m)


# -- waiters in other worlds ---------------------------------------------------------------------


def test_wait_blocking_from_plain_threads_gets_the_value() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    callers = _blocking_waiters(m, "k", 4)
    value = object()
    m.done("k", value)
    finish_all(callers)
    assert all(c.outcome() is value for c in callers)
    assert_idle(m)


def test_wait_blocking_raises_the_leaders_exception_in_every_thread() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    callers = _blocking_waiters(m, "k", 3)
    err = KeyboardInterrupt()  # BaseException: delivered like any other
    m.fail("k", err)
    finish_all(callers)
    assert all(c.exception is err for c in callers)
    assert_idle(m)


def test_wait_blocking_timeout_raises_timeout_error_and_the_flight_goes_on() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    patient = _blocking_waiters(m, "k", 1)[0]
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="'k'"):
        m.wait_blocking("k", timeout=0.05)
    assert time.monotonic() - began < TIMEOUT
    assert waiters_in_flight(m, "k") == 1, "the timed-out waiter must leave the flight"
    m.done("k", "late")
    assert patient.outcome() == "late"
    assert_idle(m)


def test_wait_from_another_threads_event_loop_is_woken_by_done() -> None:
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    value = object()
    with LoopThread() as other:

        async def waiter() -> object:
            return await m.wait("k")

        fut = other.submit(waiter())
        wait_until(lambda: waiters_in_flight(m, "k") == 1, "the other loop waits")
        m.done("k", value)  # from this thread: no loop here at all
        assert fut.result(TIMEOUT) is value
    assert_idle(m)


def test_async_leader_wakes_waiters_in_another_loop_and_in_plain_threads() -> None:
    m: OnceMap[str, object] = OnceMap()
    value = object()
    with LoopThread() as other:

        async def main() -> None:
            assert m.register("k")
            fut = other.submit(m.wait("k"))
            threads = _blocking_waiters(m, "k", 2)
            local = await _joined_task(m, "k")
            wait_until(lambda: waiters_in_flight(m, "k") == 4, "every waiter joined")
            m.done("k", value)
            async with asyncio.timeout(TIMEOUT):
                assert await local is value
                assert await asyncio.wrap_future(fut) is value
            finish_all(threads)
            assert all(t.outcome() is value for t in threads)

        asyncio.run(main())
    assert_idle(m)


def test_trio_waiter_is_woken_by_a_leader_in_another_thread() -> None:
    trio = pytest.importorskip("trio")
    m: OnceMap[str, object] = OnceMap()
    assert m.register("k")
    value = object()

    async def main() -> object:
        with trio.fail_after(TIMEOUT):
            return await m.wait("k")

    caller = start(trio.run, main)
    wait_until(lambda: waiters_in_flight(m, "k") == 1, "the trio task waits")
    m.done("k", value)
    assert caller.outcome() is value
    assert_idle(m)


# -- forget ----------------------------------------------------------------------------------


def test_forget_of_an_unknown_key_is_a_no_op() -> None:
    m: OnceMap[str, int] = OnceMap()
    m.forget("nope")
    assert m.register("k")
    m.done("k", 1)
    m.forget("k")
    assert_idle(m)


def test_forget_lets_a_new_leader_register_while_old_waiters_keep_the_old_flight() -> None:
    """Go TestForget on the raw protocol: two flights of one key, each landing its own waiters.

    The old leader finishes first (as in Go's TestForget): its waiters get its value, the new
    flight's waiter gets the new value, each Lead lands its own flight and the map ends empty.
    """
    m: OnceMap[str, object] = OnceMap()
    old_lead = m.register("k")
    assert old_lead
    old_waiters = _blocking_waiters(m, "k", 2, timeout=2.0)
    m.forget("k")
    new_lead = m.register("k")
    assert new_lead is not None, "after forget, the next caller must lead a new flight"
    new_waiter = start(m.wait_blocking, "k", timeout=2.0)
    wait_until(lambda: all_waiters(m) == 3, "the new waiter joined the new flight")
    old_lead.done("old")  # the first leader lands first
    new_lead.done("new")
    finish_all([*old_waiters, new_waiter], timeout=2 * TIMEOUT)
    outcomes = [c.result if c.exception is None else c.exception for c in old_waiters]
    assert (outcomes, new_waiter.result) == (["old", "old"], "new")
    assert_idle(m)


@pytest.mark.parametrize("order", ["newer_lands_first", "older_lands_first"])
async def test_each_lead_lands_its_own_flight_after_forget(order: str) -> None:
    """Issue 10: ``register; wait(a); forget; register; wait(b); done("B"); done("A")`` gave
    a="B", b="A" (``done`` ended the oldest flight). Each Lead lands the flight it leads."""
    m: OnceMap[str, str] = OnceMap()
    lead_a = m.register("k")
    assert lead_a is not None
    a = await _joined_task(m, "k")  # type: ignore[arg-type]
    m.forget("k")
    lead_b = m.register("k")
    assert lead_b is not None and lead_b is not lead_a
    b = await _joined_task(m, "k")  # type: ignore[arg-type]
    if order == "newer_lands_first":
        lead_b.done("B")
        lead_a.done("A")
    else:
        lead_a.done("A")
        lead_b.done("B")
    async with asyncio.timeout(TIMEOUT):
        assert (await a, await b) == ("A", "B")
    assert_idle(m)


def test_keyed_done_refuses_a_key_with_two_flights_and_names_the_lead() -> None:
    """The keyed shorthand cannot know whose flight it lands once forget made two: it says
    so (naming the way out) instead of landing the wrong one; each Lead still lands its own."""
    m: OnceMap[str, str] = OnceMap()
    lead_a = m.register("k")
    m.forget("k")
    lead_b = m.register("k")
    assert lead_a is not None and lead_b is not None
    with pytest.raises(ValueError, match=r"2 flights.*Lead.*lead\.done"):
        m.done("k", "?")
    lead_b.fail(RuntimeError("b"))
    m.done("k", "A")  # one flight left: the shorthand is unambiguous again
    assert_idle(m)


def test_a_lead_lands_once() -> None:
    m: OnceMap[str, int] = OnceMap()
    lead = m.register("k")
    assert lead is not None and lead.key == "k" and "k" in repr(lead)
    lead.done(1)
    for land in (lambda: lead.done(2), lambda: lead.fail(RuntimeError()), lead.abandon):
        with pytest.raises(RuntimeError, match="landed already"):
            land()
    with pytest.raises(KeyError, match="not registered"):
        m.done("k", 3)
    assert_idle(m)
