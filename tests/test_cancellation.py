"""Cancellation is structured, with re-election (DESIGN.md "Semantics every part keeps").

The leader runs the work in its own task. Cancelling a follower affects it alone. Cancelling the
leader cancels its run, and one waiting follower takes over and runs its *own* fn afresh; the
others follow the new run. No follower sees a cancellation that was not its own, none is
stranded, and CancelledError is never swallowed.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

from singleflight import Group
from singleflight._group import Unshared

from .core_helpers import (
    TIMEOUT,
    AsyncWork,
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


class TaggedWork:
    """Async work that records which caller's fn ran, and which runs were cancelled."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.cancelled: list[str] = []
        self.gate = asyncio.Event()

    async def __call__(self, tag: str) -> str:
        self.runs.append(tag)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        return f"value from {tag}"


async def _gather(*aws: Any) -> list[Any]:
    async with asyncio.timeout(TIMEOUT):
        return await asyncio.gather(*aws, return_exceptions=True)


async def _start_flight(
    g: Group[Any], work: TaggedWork, tags: list[str]
) -> dict[str, asyncio.Task[Any]]:
    """The first tag leads, the others follow; returns once every follower waits."""
    tasks = {tags[0]: asyncio.create_task(g.do("k", work, tags[0]))}
    await async_wait_until(lambda: work.runs == [tags[0]], "the leader runs")
    before = g.stats.followers
    for tag in tags[1:]:
        tasks[tag] = asyncio.create_task(g.do("k", work, tag))
    await async_wait_until(followers_waiting(g, before + len(tags) - 1), "the followers wait")
    return tasks


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


# =============================================================================================
# The leader is cancelled
# =============================================================================================


async def test_cancelled_leader_hands_the_work_to_one_follower() -> None:
    """Case 18 under re-election: A is cancelled; B or C runs its own fn; both get its value."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C"])
    await _cancel(tasks["A"])
    assert work.cancelled == ["A"], "the leader's run is cancelled with it"
    await async_wait_until(lambda: len(work.runs) == 2, "a follower re-runs the work")
    new_leader = work.runs[1]
    assert new_leader in ("B", "C")
    work.gate.set()
    assert await _gather(tasks["B"], tasks["C"]) == [f"value from {new_leader}"] * 2
    assert len(work.runs) == 2, "exactly one extra run"
    assert g.stats.errors == 0
    assert_idle(g)


async def test_leader_cancelled_twice_in_a_row_the_third_run_serves_the_rest() -> None:
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C", "D"])
    await _cancel(tasks["A"])
    await async_wait_until(lambda: len(work.runs) == 2, "the first re-election")
    second = work.runs[1]
    await _cancel(tasks[second])
    await async_wait_until(lambda: len(work.runs) == 3, "the second re-election")
    third = work.runs[2]
    assert len({"A", second, third}) == 3
    assert work.cancelled == ["A", second]
    work.gate.set()
    rest = [t for t in "BCD" if t != second]
    assert await _gather(*(tasks[t] for t in rest)) == [f"value from {third}"] * 2
    assert len(work.runs) == 3
    assert_idle(g)


async def test_cancelled_leader_with_many_followers_starts_exactly_one_new_run() -> None:
    g: Group[str] = Group()
    work = TaggedWork()
    tags = ["L", *(f"f{i}" for i in range(20))]
    tasks = await _start_flight(g, work, tags)
    await _cancel(tasks["L"])
    await async_wait_until(lambda: len(work.runs) == 2, "a follower re-runs the work")
    work.gate.set()
    results = await _gather(*(tasks[t] for t in tags[1:]))
    assert results == [f"value from {work.runs[1]}"] * 20
    assert len(work.runs) == 2
    assert_idle(g)


async def test_cancelled_leader_reelects_through_do_with_role() -> None:
    g: Group[str] = Group()
    work = TaggedWork()
    leader = asyncio.create_task(g.do_with_role("k", work, "A"))
    await async_wait_until(lambda: work.runs == ["A"], "the leader runs")
    follower = asyncio.create_task(g.do_with_role("k", work, "B"))
    await async_wait_until(followers_waiting(g, 1), "the follower waits")
    await _cancel(leader)
    await async_wait_until(lambda: len(work.runs) == 2, "the follower re-runs")
    work.gate.set()
    assert await _gather(follower) == [("value from B", "leader")]
    assert_idle(g)


async def test_leader_and_first_follower_cancelled_together_the_next_one_takes_over() -> None:
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C", "D"])
    tasks["A"].cancel()
    tasks["B"].cancel()
    await async_wait_until(lambda: len(work.runs) == 2, "a live follower re-runs")
    assert work.runs[1] in ("C", "D")
    work.gate.set()
    results = await _gather(*tasks.values())
    assert [type(r) for r in results[:2]] == [asyncio.CancelledError] * 2
    assert results[2:] == [f"value from {work.runs[1]}"] * 2
    assert_idle(g)


async def test_elected_follower_cancelled_before_it_starts_passes_the_lead_on() -> None:
    """The lead reaches B, but B is cancelled before its task runs again: C or D must lead
    instead, and nobody is stranded."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C", "D"])
    tasks["A"].cancel()
    await async_wait_until(lambda: work.cancelled == ["A"], "the leader's run is cancelled")
    tasks["B"].cancel()  # B's wake-up is queued behind this: it sees its own cancellation
    await async_wait_until(lambda: len(work.runs) == 2, "another follower re-runs")
    assert work.runs[1] in ("C", "D"), work.runs
    work.gate.set()
    results = await _gather(*tasks.values())
    assert [type(r) for r in results[:2]] == [asyncio.CancelledError] * 2
    assert results[2:] == [f"value from {work.runs[1]}"] * 2
    assert_idle(g)


def test_follower_on_an_idle_loop_does_not_strand_the_others_when_the_leader_is_cancelled() -> None:
    """A follower whose event loop is not running right now (a loop driven step by step with
    run_until_complete, a task left pending between steps) cannot take over at once. The
    leader is cancelled: the other follower, a plain thread, must not wait for that loop to
    run again. DESIGN: "none is stranded"."""
    g: Group[str] = Group()
    started = threading.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    async def idle_fn() -> str:
        return "idle loop's own"

    idle = asyncio.new_event_loop()
    try:
        with LoopThread() as leader_loop:
            leader = leader_loop.submit(g.do("k", slow))
            assert started.wait(TIMEOUT)
            parked = idle.create_task(g.do("k", idle_fn))
            idle.run_until_complete(asyncio.sleep(0))  # it joins, then its loop stops
            wait_until(followers_waiting(g, 1), "the idle loop's follower waits")
            thread = start(g.do_sync_with_role, "k", lambda: "thread's own")
            wait_until(followers_waiting(g, 2), "the thread follower waits")
            leader_loop.loop.call_soon_threadsafe(leader.cancel)
            thread.join(TIMEOUT)
            stranded = thread.is_alive()
            # Let the idle loop run again in any case, so everything ends.
            idle_result = idle.run_until_complete(asyncio.wait_for(parked, TIMEOUT))
            thread.finish()
        assert not stranded, "the thread follower waited for an idle loop to take the lead"
        assert thread.outcome() == ("thread's own", "leader")
        assert idle_result == "thread's own"
    finally:
        idle.close()
    assert_idle(g)


# =============================================================================================
# A follower is cancelled; everybody is cancelled
# =============================================================================================


async def test_cancelled_follower_leaves_the_leader_and_other_followers_untouched() -> None:
    """Case 19."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C"])
    await _cancel(tasks["B"])
    assert work.cancelled == [] and work.runs == ["A"]
    work.gate.set()
    assert await _gather(tasks["A"], tasks["C"]) == ["value from A"] * 2
    assert_idle(g)


async def test_sole_caller_cancelled_cancels_the_work_and_the_next_call_is_fresh() -> None:
    """Cases 20 and 21: the run sees CancelledError and never completes; nothing remains;
    a later call runs afresh and gets a real value, never the old cancellation."""
    g: Group[object] = Group()
    work = AsyncWork()
    task = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()
    await _cancel(task)
    assert (work.cancelled, work.finished) == (1, 0)
    assert_idle(g)
    work.release()
    async with asyncio.timeout(TIMEOUT):
        value = await g.do("k", work)
    assert value is work.returned[0] and work.calls == 2
    assert_idle(g)


async def test_followers_cancelled_first_do_not_touch_the_work_the_leader_last_cancels_it() -> None:
    """Case 20 with 3 waiters cancelled one by one (followers first)."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C"])
    await _cancel(tasks["C"])
    await _cancel(tasks["B"])
    assert work.cancelled == []
    await _cancel(tasks["A"])
    gc.collect()
    assert work.cancelled == ["A"] and work.runs == ["A"], "nobody is left to re-run it"
    assert_idle(g)
    work.gate.set()
    async with asyncio.timeout(TIMEOUT):
        assert await g.do("k", work, "fresh") == "value from fresh"
    assert_idle(g)


async def test_every_caller_cancelled_leader_first_leaves_nothing_behind() -> None:
    """Case 20, leader first: each re-elected follower is cancelled in turn; map empty."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "B", "C"])
    for n in range(1, 4):
        await async_wait_until(lambda n=n: len(work.runs) == n, f"run {n} started")
        await _cancel(tasks[work.runs[-1]])
    assert sorted(work.cancelled) == ["A", "B", "C"]
    assert all(t.cancelled() for t in tasks.values())
    assert_idle(g)
    work.gate.set()
    async with asyncio.timeout(TIMEOUT):
        assert await g.do("k", work, "fresh") == "value from fresh"
    assert_idle(g)


async def test_work_raising_cancelled_error_itself_ends_every_waiter_cancelled() -> None:
    """Case 23: fn raises CancelledError with nobody cancelling it. Every current waiter ends
    with CancelledError (each re-elected follower runs its own fn, which raises it too), the
    entry is removed and the group stays usable."""
    g: Group[object] = Group()
    gate = asyncio.Event()

    async def cancels_itself() -> object:
        await gate.wait()
        raise asyncio.CancelledError

    tasks = [asyncio.create_task(g.do("k", cancels_itself)) for _ in range(3)]
    await async_wait_until(followers_waiting(g, 2), "2 followers wait")
    gate.set()
    results = await _gather(*tasks)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert_idle(g)

    async def fine() -> str:
        return "usable"

    assert await g.do("k", fine) == "usable"
    assert_idle(g)


# =============================================================================================
# Per-waiter timeouts
# =============================================================================================


async def test_follower_timeout_with_asyncio_timeout_affects_only_that_follower() -> None:
    """Case 22."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A", "C"])

    async def impatient() -> str:
        async with asyncio.timeout(0.01):
            return await g.do("k", work, "B")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(TIMEOUT):
            await impatient()
    work.gate.set()
    assert await _gather(tasks["A"], tasks["C"]) == ["value from A"] * 2
    assert work.runs == ["A"] and work.cancelled == []
    assert_idle(g)


async def test_follower_timeout_with_wait_for_affects_only_that_follower() -> None:
    """Case 22, asyncio.wait_for."""
    g: Group[str] = Group()
    work = TaggedWork()
    tasks = await _start_flight(g, work, ["A"])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(g.do("k", work, "B"), 0.01)
    work.gate.set()
    assert await _gather(tasks["A"]) == ["value from A"]
    assert work.runs == ["A"]
    assert_idle(g)


@pytest.mark.parametrize("how", ["timeout", "wait_for"])
async def test_leader_timeout_fails_only_the_leader_a_follower_takes_over(how: str) -> None:
    """Case 22 when the timed waiter is the leader: it gets TimeoutError, its run is cancelled,
    and the follower without a deadline gets a value from one re-run."""
    g: Group[str] = Group()
    work = TaggedWork()

    async def leader() -> str:
        if how == "timeout":
            async with asyncio.timeout(0.05):
                return await g.do("k", work, "A")
        return await asyncio.wait_for(g.do("k", work, "A"), 0.05)

    lt = asyncio.create_task(leader())
    await async_wait_until(lambda: work.runs == ["A"], "the leader runs")
    follower = asyncio.create_task(g.do("k", work, "B"))
    await async_wait_until(followers_waiting(g, 1), "the follower waits")
    results = await _gather(lt)
    assert isinstance(results[0], TimeoutError), results
    await async_wait_until(lambda: len(work.runs) == 2, "the follower re-runs")
    work.gate.set()
    assert await _gather(follower) == ["value from B"]
    assert work.cancelled == ["A"]
    assert_idle(g)


# =============================================================================================
# CancelledError is never swallowed
# =============================================================================================


async def test_task_group_cancels_leader_and_follower_cleanly() -> None:
    """A failing sibling in a TaskGroup cancels the callers; only its error comes out."""
    g: Group[object] = Group()
    work = AsyncWork()

    class Sibling(Exception):
        pass

    async def sibling() -> None:
        await async_wait_until(followers_waiting(g, 1), "the follower waits")
        raise Sibling

    with pytest.raises(ExceptionGroup) as info:  # noqa: F821 - Python 3.11+, like TaskGroup
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            leader = tg.create_task(g.do("k", work))
            follower = tg.create_task(g.do("k", anever))
            tg.create_task(sibling())
    assert [type(e) for e in info.value.exceptions] == [Sibling]
    assert leader.cancelled() and follower.cancelled()
    assert work.cancelled == 1 and work.calls == 1
    assert_idle(g)


async def test_asyncio_timeout_around_every_caller_raises_timeout_error_for_each() -> None:
    """If do() swallowed CancelledError, asyncio.timeout could not turn it into TimeoutError."""
    g: Group[object] = Group()
    work = AsyncWork()

    async def caller() -> object:
        async with asyncio.timeout(0.05):
            return await g.do("k", work)

    results = await _gather(*(caller() for _ in range(4)))
    assert all(isinstance(r, TimeoutError) for r in results), results
    assert work.finished == 0
    assert_idle(g)


async def test_cancelled_leader_and_follower_tasks_report_cancelled() -> None:
    g: Group[object] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()
    follower = asyncio.create_task(g.do("k", anever))
    await async_wait_until(followers_waiting(g, 1), "the follower waits")
    follower.cancel("follower's own")
    leader.cancel("leader's own")
    await _gather(leader, follower)
    assert leader.cancelled() and follower.cancelled()
    assert work.calls == 1
    assert_idle(g)


# =============================================================================================
# Followers in other worlds re-elect
# =============================================================================================


async def test_cancelled_async_leader_reelects_a_follower_in_another_loop() -> None:
    g: Group[str] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()

    async def remote_fn() -> str:
        return "from the other loop"

    with LoopThread() as other:
        remote = other.submit(g.do("k", remote_fn))
        await async_wait_until(followers_waiting(g, 1), "the remote follower waits")
        await _cancel(leader)
        assert await asyncio.wrap_future(remote) == "from the other loop"
    assert work.cancelled == 1
    assert_idle(g)


async def test_cancelled_async_leader_reelects_a_plain_thread_follower() -> None:
    g: Group[str] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()
    thread = start(g.do_sync_with_role, "k", lambda: "from a thread")
    await async_wait_until(followers_waiting(g, 1), "the thread follower waits")
    await _cancel(leader)
    await async_wait_until(lambda: not thread.is_alive(), "the thread re-elected")
    assert thread.outcome() == ("from a thread", "leader")
    assert_idle(g)


async def test_cancelled_async_leader_with_followers_everywhere_runs_once_more() -> None:
    """Followers in this loop, another loop and a thread: one of them re-runs its own fn, the
    other two join that run, and all three get its value."""
    g: Group[object] = Group()
    work = AsyncWork()
    leader = asyncio.create_task(g.do("k", work))
    async with asyncio.timeout(TIMEOUT):
        await work.started.wait()
    reruns: list[str] = []
    reruns_lock = threading.Lock()
    rerun_gate = threading.Event()

    def record(where: str) -> str:
        with reruns_lock:
            reruns.append(where)
        return f"re-run in {where}"

    async def here_fn() -> str:
        record("this loop")
        while not rerun_gate.is_set():
            await asyncio.sleep(0.001)
        return "re-run in this loop"

    async def remote_fn() -> str:
        record("other loop")
        while not rerun_gate.is_set():
            await asyncio.sleep(0.001)
        return "re-run in other loop"

    def thread_fn() -> str:
        record("thread")
        assert rerun_gate.wait(TIMEOUT)
        return "re-run in thread"

    with LoopThread() as other:
        remote = other.submit(g.do("k", remote_fn))
        local = asyncio.create_task(g.do("k", here_fn))
        thread = start(g.do_sync, "k", thread_fn)
        await async_wait_until(followers_waiting(g, 3), "3 followers wait")
        await _cancel(leader)
        # Every caller is counted again once it has re-led or re-joined: 4 calls in all.
        await async_wait_until(lambda: bool(reruns) and g.stats.calls == 4, "re-election")
        rerun_gate.set()
        (local_value,) = await _gather(local)
        remote_value = await asyncio.wrap_future(remote)
        await async_wait_until(lambda: not thread.is_alive(), "the thread is done")
        thread_value = thread.outcome()
    assert len(reruns) == 1, f"exactly one follower re-runs the work, got {reruns}"
    assert local_value == remote_value == thread_value == f"re-run in {reruns[0]}"
    assert (g.stats.leaders, g.stats.followers) == (2, 2)
    assert_idle(g)


async def test_reelection_is_one_run_even_when_the_new_run_is_instant() -> None:
    """DESIGN: "one waiting follower takes over as the new leader and runs the work afresh;
    the other followers wait on the new run". That must hold when the new run finishes
    without suspending too (upstream recovered, answer served from memory...): the other
    followers get its value instead of each starting a run of its own (a stampede)."""
    g: Group[str] = Group()
    gate = asyncio.Event()
    runs: list[str] = []

    async def fetch(tag: str) -> str:
        runs.append(tag)
        if tag == "A":
            await gate.wait()  # only the first run waits; re-runs answer at once
        return f"value from {tag}"

    leader = asyncio.create_task(g.do("k", fetch, "A"))
    await async_wait_until(lambda: runs == ["A"], "the leader runs")
    followers = [asyncio.create_task(g.do("k", fetch, t)) for t in "BCDE"]
    await async_wait_until(followers_waiting(g, 4), "4 followers wait")
    await _cancel(leader)
    results = await _gather(*followers)
    assert len(runs) == 2, f"one re-run expected, the followers ran {runs[1:]}"
    assert results == [f"value from {runs[1]}"] * 4
    assert_idle(g)


async def test_cancelled_async_follower_of_a_sync_leader_affects_only_itself() -> None:
    g: Group[object] = Group()
    work = SyncWork("sync value")
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    doomed = asyncio.create_task(g.do("k", anever))
    patient = asyncio.create_task(g.do("k", anever))
    await async_wait_until(followers_waiting(g, 2), "2 async followers wait")
    await _cancel(doomed)
    work.release()
    assert await _gather(patient) == ["sync value"]
    assert leader.outcome() == "sync value" and work.calls == 1
    assert_idle(g)


def test_trio_leader_and_first_follower_cancelled_the_next_one_takes_over() -> None:
    trio = pytest.importorskip("trio")
    g: Group[str] = Group()
    runs: list[str] = []
    results: dict[str, Any] = {}

    async def main() -> None:
        gate = trio.Event()
        scopes = {tag: trio.CancelScope() for tag in "ABC"}

        async def work(tag: str) -> str:
            runs.append(tag)
            await gate.wait()
            return f"value from {tag}"

        async def call(tag: str) -> None:
            with scopes[tag]:
                results[tag] = await g.do("k", work, tag)
            results.setdefault(tag, "cancelled")

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "A")
                while not runs:
                    await trio.sleep(0)
                nursery.start_soon(call, "B")
                while g.stats.followers < 1:
                    await trio.sleep(0)
                nursery.start_soon(call, "C")
                while g.stats.followers < 2:
                    await trio.sleep(0)
                scopes["A"].cancel()
                scopes["B"].cancel()
                while len(runs) < 2:
                    await trio.sleep(0)
                gate.set()

    trio.run(main)
    assert runs == ["A", "C"], runs
    assert results == {"A": "cancelled", "B": "cancelled", "C": "value from C"}
    assert_idle(g)


def test_leader_coroutine_closed_with_its_loop_reelects_a_thread_follower() -> None:
    """A loop is closed with the leader's task still pending (no asyncio.run to cancel it):
    when the task is collected its coroutine is closed (GeneratorExit). That ends the
    leader's run like a cancellation: the follower re-elects and runs its own fn; it must not
    be handed a GeneratorExit it has nothing to do with, nor be stranded."""
    g: Group[str] = Group()
    started = threading.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    loop = asyncio.new_event_loop()
    task = loop.create_task(g.do("k", slow))
    loop.run_until_complete(asyncio.sleep(0))
    assert started.is_set()
    follower = start(g.do_sync_with_role, "k", lambda: "follower's own")
    wait_until(followers_waiting(g, 1), "the thread follower waits")
    loop.close()
    # Not awaited on purpose: asyncio logs "Task was destroyed but it is pending".
    del task
    gc.collect()
    follower.finish()
    assert follower.exception is None, f"the follower got {follower.exception!r}"
    assert follower.result == ("follower's own", "leader")
    assert g.stats.errors == 0
    assert_idle(g)


async def test_cancelled_leader_of_a_forgotten_flight_hands_it_to_its_own_follower() -> None:
    """forget, then the old leader is cancelled: its follower re-runs the OLD flight; the new
    flight and its follower are untouched."""
    g: Group[str] = Group()
    work = TaggedWork()
    old = await _start_flight(g, work, ["A", "B"])
    g.forget("k")
    c = asyncio.create_task(g.do("k", work, "C"))
    await async_wait_until(lambda: work.runs == ["A", "C"], "a new flight started")
    d = asyncio.create_task(g.do("k", work, "D"))
    await async_wait_until(followers_waiting(g, 2), "D joined the new flight")
    await _cancel(old["A"])
    await async_wait_until(lambda: work.runs == ["A", "C", "B"], "B re-runs the old flight")
    work.gate.set()
    assert await _gather(old["B"], c, d) == ["value from B", "value from C", "value from C"]
    assert_idle(g)


def test_interrupted_thread_follower_leaves_alone() -> None:
    """A thread follower interrupted by a signal while it waits (KeyboardInterrupt's path)
    raises, and the flight goes on for the leader and the other followers."""
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    g: Group[str] = Group()
    work = SyncWork("value")
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    other = start(g.do_sync, "k", never)
    wait_until(followers_waiting(g, 1), "the other follower waits")
    previous = signal.signal(signal.SIGINT, handler)
    try:
        main = threading.main_thread().ident
        assert main is not None

        def poke() -> None:
            try:
                wait_until(followers_waiting(g, 2), "the main thread waits")
                signal.pthread_kill(main, signal.SIGINT)
            except BaseException:
                work.release()  # never leave the main thread blocked
                raise

        poker = threading.Thread(target=poke, daemon=True)
        poker.start()
        with pytest.raises(Interrupted):
            g.do_sync("k", never)  # the main thread follows, and is interrupted
        poker.join(TIMEOUT)
    finally:
        signal.signal(signal.SIGINT, previous)
    work.release()
    assert leader.outcome() == "value" and other.outcome() == "value"
    assert work.calls == 1
    assert_idle(g)


async def test_sync_leaders_reelect_hands_the_flight_to_an_async_follower() -> None:
    g: Group[str] = Group(reelect_on=(UpstreamTimeout,))
    work = SyncWork(raises=UpstreamTimeout("the thread's own deadline"))
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)

    async def own() -> str:
        await asyncio.sleep(0)
        return "async follower's own"

    followers = [asyncio.create_task(g.do_with_role("k", own)) for _ in range(2)]
    await async_wait_until(followers_waiting(g, 2), "2 async followers wait")
    work.release()
    results = await _gather(*followers)
    assert sorted(role for _, role in results) == ["follower", "leader"]
    assert {v for v, _ in results} == {"async follower's own"}
    assert isinstance(leader.finish().exception, UpstreamTimeout)
    assert_idle(g)


# =============================================================================================
# reelect_on and Unshared (internal hooks the HTTP adapters use)
# =============================================================================================


class UpstreamTimeout(Exception):
    pass


@pytest.mark.parametrize("rerun", ["suspends", "is_instant"])
async def test_reelect_on_makes_a_follower_take_over_with_one_extra_run(rerun: str) -> None:
    """The leader's fn raises one of ``reelect_on`` (its own deadline): the leader gets that
    exception, one follower re-runs its own fn, the others follow it: one extra run."""
    g: Group[str] = Group(reelect_on=(UpstreamTimeout,))
    first_gate, rerun_gate = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def fetch(tag: str) -> str:
        runs.append(tag)
        if tag == "A":
            await first_gate.wait()
            raise UpstreamTimeout("A's own deadline")
        if rerun == "suspends":
            await rerun_gate.wait()
        return f"value from {tag}"

    leader = asyncio.create_task(g.do("k", fetch, "A"))
    await async_wait_until(lambda: runs == ["A"], "the leader runs")
    followers = {t: asyncio.create_task(g.do("k", fetch, t)) for t in "BCD"}
    await async_wait_until(followers_waiting(g, 3), "3 followers wait")
    first_gate.set()
    (leader_result,) = await _gather(leader)
    assert isinstance(leader_result, UpstreamTimeout), "the leader gets its own exception"
    await async_wait_until(lambda: len(runs) >= 2 and g.stats.calls == 4, "re-election")
    rerun_gate.set()
    results = await _gather(*followers.values())
    assert len(runs) == 2 and runs[1] in "BCD", f"one re-run expected, got {runs}"
    assert results == [f"value from {runs[1]}"] * 3
    assert g.stats.errors == 0
    assert_idle(g)


@pytest.mark.parametrize("rerun", ["blocks", "is_instant"])
def test_reelect_on_in_threads_makes_a_follower_take_over(rerun: str) -> None:
    g: Group[str] = Group(reelect_on=(UpstreamTimeout,))
    work = SyncWork(raises=UpstreamTimeout("leader's own"))
    leader = start(g.do_sync, "k", work)
    assert work.started.wait(TIMEOUT)
    ran = []
    rerun_gate = threading.Event()

    def rerun_fn() -> str:
        ran.append(1)
        if rerun == "blocks":
            assert rerun_gate.wait(TIMEOUT)
        return "re-run"

    followers = [start(g.do_sync, "k", rerun_fn) for _ in range(3)]
    wait_until(followers_waiting(g, 3), "3 followers wait")
    work.release()
    leader.finish()
    wait_until(lambda: bool(ran) and g.stats.calls == 4, "re-election")
    rerun_gate.set()
    finish_all(followers)
    assert isinstance(leader.exception, UpstreamTimeout)
    assert [f.outcome() for f in followers] == ["re-run"] * 3
    assert ran == [1], f"one re-run expected, got {len(ran)}"
    assert_idle(g)


async def test_other_errors_are_shared_not_reelected_with_reelect_on() -> None:
    g: Group[str] = Group(reelect_on=(UpstreamTimeout,))
    work = AsyncWork(raises=ValueError("shared"))
    tasks = [asyncio.create_task(g.do("k", work)) for _ in range(3)]
    await async_wait_until(followers_waiting(g, 2), "2 followers wait")
    work.release()
    results = await _gather(*tasks)
    assert all(isinstance(r, ValueError) for r in results) and work.calls == 1
    assert g.stats.errors == 1
    assert_idle(g)


def _unshared_work() -> tuple[TaggedWork, Any]:
    work = TaggedWork()

    async def fetch(tag: str) -> Unshared[str]:
        return Unshared(await work(tag))

    return work, fetch


@pytest.mark.parametrize("api", ["do", "do_with_role"])
async def test_unshared_gives_the_leader_its_value_and_each_follower_runs_its_own(
    api: str,
) -> None:
    g: Group[Any] = Group()
    work, fetch = _unshared_work()

    async def call(tag: str) -> Any:
        if api == "do":
            return await g.do("k", fetch, tag)
        value, _role = await g.do_with_role("k", fetch, tag)
        return value

    leader = asyncio.create_task(call("A"))
    await async_wait_until(lambda: work.runs == ["A"], "the leader runs")
    followers = [asyncio.create_task(call(t)) for t in "BC"]
    await async_wait_until(followers_waiting(g, 2), "2 followers wait")
    work.gate.set()
    results = await _gather(leader, *followers)
    assert results == ["value from A", "value from B", "value from C"]
    assert sorted(work.runs) == ["A", "B", "C"]
    assert_idle(g)


async def test_unshared_roles_say_every_caller_made_its_own_call() -> None:
    g: Group[Any] = Group()
    work, fetch = _unshared_work()
    leader = asyncio.create_task(g.do_with_role("k", fetch, "A"))
    await async_wait_until(lambda: work.runs == ["A"], "the leader runs")
    follower = asyncio.create_task(g.do_with_role("k", fetch, "B"))
    await async_wait_until(followers_waiting(g, 1), "the follower waits")
    work.gate.set()
    assert await _gather(leader, follower) == [
        ("value from A", "leader"),
        ("value from B", "leader"),
    ]
    assert_idle(g)


def test_unshared_in_threads_each_follower_runs_its_own_and_nothing_is_cached() -> None:
    g: Group[Any] = Group(cache={})
    work = SyncWork()
    leader = start(g.do_sync_with_role, "k", lambda: Unshared(work()))
    assert work.started.wait(TIMEOUT)
    followers = [start(g.do_sync_with_role, "k", lambda: Unshared("own")) for _ in range(2)]
    wait_until(followers_waiting(g, 2), "2 followers wait")
    work.release()
    finish_all([leader, *followers])
    assert leader.outcome() == (work.returned[0], "leader")
    assert [f.outcome() for f in followers] == [("own", "leader")] * 2
    assert g.cache == {}
    assert g.do_sync_with_role("k", lambda: "cached now") == ("cached now", "leader")
    assert g.do_sync_with_role("k", never) == ("cached now", "cache")
    assert_idle(g)
