"""Stress: lost wake-ups, random cancellations, mixed worlds, exact stats, no leaks.

Every test is bounded (pytest-timeout plus per-wait deadlines) and seeded, so a failure can be
replayed. The whole file is meant to run in well under 30 s on two busy cores.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import threading
import weakref
from collections import Counter
from itertools import pairwise
from typing import Any

import pytest

from singleflight import Group

from .core_helpers import TIMEOUT, assert_idle, finish_all, start

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


def test_lost_wakeup_16_threads_500_rounds_on_one_key() -> None:
    """uv #3724: every call returns, and each round runs the work between 1 and 16 times."""
    g: Group[tuple[int, int]] = Group()
    n_threads, rounds = 16, 500
    barrier = threading.Barrier(n_threads, timeout=TIMEOUT)
    lock = threading.Lock()
    runs = Counter[int]()

    def work(r: int) -> tuple[int, int]:
        with lock:
            runs[r] += 1
            return r, runs[r]

    def caller() -> list[tuple[int, int]]:
        got = []
        for r in range(rounds):
            barrier.wait()  # everyone's call of round r-1 has returned
            got.append(g.do_sync("k", work, r))
        return got

    threads = [start(caller) for _ in range(n_threads)]
    finish_all(threads, timeout=45)
    for t in threads:
        got = t.outcome()
        assert [r for r, _ in got] == list(range(rounds)), "a call got another round's value"
    bad = {r: n for r, n in runs.items() if not 1 <= n <= n_threads}
    assert len(runs) == rounds and not bad, bad
    stats = g.stats
    assert stats.calls == n_threads * rounds
    assert stats.leaders == sum(runs.values())
    assert_idle(g)


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_cancellations_errors_and_timeouts_across_1000_tasks(seed: int) -> None:
    """1,000 tasks over 4 keys; the work sometimes fails, callers sometimes time out and a
    chaos task cancels some of them. Nobody hangs, nobody sees a cancellation or a timeout
    that was not its own, the map ends empty and the stats add up to what really happened."""
    rng = random.Random(seed)
    g: Group[Any] = Group()
    n = 1000
    started = 0
    fn_runs = 0
    fn_errors = 0
    cancelled_by_us: set[int] = set()
    has_timeout: set[int] = set()

    class Boom(Exception):
        pass

    async def work(fail: bool, pause: float) -> str:
        nonlocal fn_runs, fn_errors
        fn_runs += 1
        await asyncio.sleep(pause)
        if fail:
            fn_errors += 1
            raise Boom
        return "ok"

    async def caller(i: int, key: int, fail: bool, pause: float, timeout: float | None) -> Any:
        nonlocal started
        started += 1
        if timeout is None:
            return await g.do(key, work, fail, pause)
        async with asyncio.timeout(timeout):
            return await g.do(key, work, fail, pause)

    tasks: list[asyncio.Task[Any]] = []

    async def chaos() -> None:
        while len(tasks) < n or not all(t.done() for t in tasks):
            if tasks and rng.random() < 0.3:
                i = rng.randrange(len(tasks))
                if not tasks[i].done():
                    cancelled_by_us.add(i)
                    tasks[i].cancel()
            await asyncio.sleep(rng.choice([0, 0, 0.0002]))

    chaos_task = asyncio.create_task(chaos())
    for i in range(n):
        timeout = rng.choice([None, None, None, 0.0005, 0.002])
        if timeout is not None:
            has_timeout.add(i)
        pause = rng.choice([0, 0.0005, 0.001, 0.003])
        args = (i, rng.randrange(4), rng.random() < 0.2, pause, timeout)
        tasks.append(asyncio.create_task(caller(*args)))
        if rng.random() < 0.2:
            await asyncio.sleep(0)  # let some flights land and new ones start

    async with asyncio.timeout(20):
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await chaos_task

    kinds = Counter[str]()
    for i, r in enumerate(results):
        if isinstance(r, asyncio.CancelledError):
            kinds["cancelled"] += 1
            assert i in cancelled_by_us, f"task {i} was cancelled by someone else's cancellation"
        elif isinstance(r, TimeoutError):
            kinds["timeout"] += 1
            assert i in has_timeout, f"task {i} got someone else's timeout"
        elif isinstance(r, Boom):
            kinds["error"] += 1
        else:
            assert r == "ok", r
            kinds["ok"] += 1
    assert all(kinds[k] > 0 for k in ("ok", "error", "timeout", "cancelled")), kinds
    assert g.stats.followers > 0
    assert_idle(g)
    stats = g.stats
    assert stats.calls == stats.leaders + stats.followers + stats.cache_hits
    assert stats.calls == started, (stats, started)
    assert stats.leaders == fn_runs, (stats, fn_runs)
    assert stats.errors == fn_errors, (stats, fn_errors)


def test_mixed_asyncio_loops_and_threads_on_one_group() -> None:
    """Two event loops (in threads) and four plain threads hammer the same four keys."""
    g: Group[int] = Group()
    lock = threading.Lock()
    counters = Counter[int]()
    runs = [0]
    per_world = 3000

    def produce(key: int) -> int:
        with lock:
            runs[0] += 1
            counters[key] += 1
            return counters[key]

    async def awork(key: int) -> int:
        await asyncio.sleep(0)
        return produce(key)

    def swork(key: int) -> int:
        return produce(key)

    def check_increasing(seen: dict[int, list[int]]) -> None:
        for key, values in seen.items():
            assert all(a < b for a, b in pairwise(values)), (
                f"key {key}: a call joined a flight that had already landed"
            )

    def thread_world(seed: int) -> int:
        rng = random.Random(seed)
        seen: dict[int, list[int]] = {k: [] for k in range(4)}
        for _ in range(per_world):
            key = rng.randrange(4)
            seen[key].append(g.do_sync(key, swork, key))
        check_increasing(seen)
        return per_world

    def loop_world(seed: int) -> int:
        async def one_task(rng: random.Random) -> None:
            seen: dict[int, list[int]] = {k: [] for k in range(4)}
            for _ in range(per_world // 10):
                key = rng.randrange(4)
                seen[key].append(await g.do(key, awork, key))
            check_increasing(seen)

        async def main() -> None:
            async with asyncio.timeout(30):
                await asyncio.gather(*(one_task(random.Random(seed * 100 + i)) for i in range(10)))

        asyncio.run(main())
        return per_world

    callers = [start(thread_world, s) for s in range(4)] + [start(loop_world, s) for s in (7, 8)]
    finish_all(callers, timeout=40)
    total = sum(c.outcome() for c in callers)
    assert g.stats.calls == total
    assert g.stats.leaders == runs[0]
    assert g.stats.followers == total - runs[0]
    assert g.stats.followers > 0, "no call was ever shared: the test exercised nothing"
    assert_idle(g)


def test_tiny_switch_interval_with_many_threads_keeps_stats_exact() -> None:
    """With a thread switch every microsecond, the counters still match what happened."""
    g: Group[str] = Group()
    lock = threading.Lock()
    runs = [0]
    errors = [0]
    n_threads, per_thread = 24, 1500

    def work(key: int, fail: bool) -> str:
        with lock:
            runs[0] += 1
            if fail:
                errors[0] += 1
        if fail:
            raise ValueError(key)
        return "ok"

    def caller(seed: int) -> Counter[str]:
        rng = random.Random(seed)
        outcomes = Counter[str]()
        for _ in range(per_thread):
            try:
                g.do_sync(rng.randrange(3), work, rng.randrange(3), rng.random() < 0.25)
                outcomes["ok"] += 1
            except ValueError:
                outcomes["error"] += 1
        return outcomes

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        callers = [start(caller, s) for s in range(n_threads)]
        finish_all(callers, timeout=40)
    finally:
        sys.setswitchinterval(old)
    total = sum((c.outcome() for c in callers), Counter[str]())
    stats = g.stats
    assert total["ok"] + total["error"] == n_threads * per_thread
    assert stats.calls == n_threads * per_thread
    assert stats.leaders == runs[0]
    assert stats.followers == stats.calls - runs[0]
    assert stats.errors == errors[0]
    assert stats.followers > 0, "no call was ever shared: the test exercised nothing"
    assert_idle(g)


# -- leaks -------------------------------------------------------------------------------------


class Marker:
    """Created inside failing work; no instance may outlive the flights."""


class Failed(Exception):
    pass


def _assert_no_marker_survives(refs: list[weakref.ref[Marker]]) -> None:
    gc.collect()
    alive = sum(1 for r in refs if r() is not None)
    assert alive == 0, f"{alive} of {len(refs)} Marker objects survived their failed flights"


def test_no_object_created_in_a_failed_async_flight_survives_1000_keys() -> None:
    """async-lru's reference-cleanup test: 1,000 distinct failing keys, each with followers."""
    g: Group[Any] = Group()
    refs: list[weakref.ref[Marker]] = []

    async def fail(i: int) -> None:
        marker = Marker()
        refs.append(weakref.ref(marker))
        await asyncio.sleep(0)
        raise Failed(i, marker)

    async def caller(i: int) -> str:
        try:
            await g.do(i, fail, i)
        except Failed:
            return "failed"
        return "returned"

    async def main() -> list[str]:
        async with asyncio.timeout(20):
            return await asyncio.gather(*(caller(i % 1000) for i in range(3000)))

    outcomes = asyncio.run(main())
    assert outcomes == ["failed"] * 3000
    assert len(refs) == 1000 and g.stats.followers == 2000
    assert_idle(g)
    _assert_no_marker_survives(refs)


def test_no_object_created_in_a_failed_thread_flight_survives() -> None:
    g: Group[Any] = Group()
    refs: list[weakref.ref[Marker]] = []
    lock = threading.Lock()

    def fail(i: int) -> None:
        marker = Marker()
        with lock:
            refs.append(weakref.ref(marker))
        raise Failed(i, marker)

    def caller(seed: int) -> int:
        n = 0
        for i in range(seed % 3, 1000, 3):  # every key is failed by two threads
            try:
                g.do_sync(i % 1000, fail, i)
            except Failed:
                n += 1
        return n

    callers = [start(caller, s) for s in range(6)]
    finish_all(callers, timeout=30)
    assert sum(c.outcome() for c in callers) == 2000
    del callers
    assert_idle(g)
    _assert_no_marker_survives(refs)


def test_no_object_survives_cancelled_and_reelected_flights() -> None:
    """Cancelled leaders and re-elections leave nothing behind either."""
    g: Group[Any] = Group()
    refs: list[weakref.ref[Marker]] = []

    async def work(i: int) -> Marker:
        marker = Marker()
        refs.append(weakref.ref(marker))
        await asyncio.sleep(0.001)
        return marker

    async def main() -> None:
        for key in range(100):
            tasks = [asyncio.create_task(g.do(key, work, key)) for _ in range(3)]
            await asyncio.sleep(0)
            tasks[0].cancel()  # the leader: one follower takes over
            async with asyncio.timeout(TIMEOUT):
                results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert results[1] is results[2] and isinstance(results[1], Marker)

    asyncio.run(main())
    assert_idle(g)
    _assert_no_marker_survives(refs)


def test_1000_distinct_failing_keys_in_threads_leave_the_map_empty() -> None:
    g: Group[Any] = Group()

    def fail(i: int) -> None:
        raise Failed(i)

    failures = 0
    for i in range(1000):
        try:
            g.do_sync(("key", i), fail, i)
        except Failed:
            failures += 1
    assert failures == 1000 and g.stats.errors == 1000
    assert_idle(g)
