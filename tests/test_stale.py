"""stale_ttl (issue 13, the core part): stale-while-revalidate and stale-if-error.

Time is a fake clock (the honest tool for "15 s later"); loops, tasks and worker threads are
real. Before ttl: role "cache"; between ttl and ttl + stale_ttl: the old value at once, role
"stale", and exactly one background refresh per key; after that: a normal flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from singleflight import Group, singleflight

from .core_helpers import TIMEOUT, SyncWork, assert_idle, async_wait_until, start, wait_until

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stale_group(ttl: float = 10, stale_ttl: float = 20, **kw: Any) -> tuple[Group[Any], Clock]:
    g: Group[Any] = Group(ttl=ttl, stale_ttl=stale_ttl, **kw)
    clock = Clock()
    g._front._timer = clock  # type: ignore[union-attr]
    return g, clock


class Source:
    """Async work returning v1, v2, ...; runs after the first may be held at a gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        n = self.calls
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return f"v{n}"


def _refreshing(g: Group[Any]) -> bool:
    return bool(g._front._refreshing)  # type: ignore[union-attr]


async def test_fresh_then_stale_at_once_with_one_refresh_for_a_burst_then_the_new_value() -> None:
    g, clock = _stale_group()
    src = Source()
    assert await g.do_with_role("k", src) == ("v1", "leader")
    clock.now += 5
    assert await g.do_with_role("k", src) == ("v1", "cache")
    clock.now += 10  # 15 s: stale
    src.gate.clear()  # the refresh will hang upstream until released
    burst = await asyncio.wait_for(
        asyncio.gather(*(g.do_with_role("k", src) for _ in range(50))), TIMEOUT
    )
    assert burst == [("v1", "stale")] * 50  # at once: nobody waits for the upstream
    await async_wait_until(lambda: src.calls == 2, "the one refresh started")
    more = await asyncio.wait_for(asyncio.gather(*(g.do_with_role("k", src) for _ in range(5))), 5)
    assert more == [("v1", "stale")] * 5 and src.calls == 2  # still one refresh
    src.gate.set()
    await async_wait_until(lambda: not _refreshing(g), "the refresh landed")
    assert await g.do_with_role("k", src) == ("v2", "cache")
    assert src.calls == 2
    stats = g.stats
    assert stats.calls == stats.leaders + stats.followers + stats.cache_hits
    assert (stats.leaders, stats.cache_hits) == (2, 1 + 50 + 5 + 1)  # the refresh is a leader
    assert_idle(g)


async def test_after_ttl_plus_stale_ttl_callers_wait_for_a_new_flight() -> None:
    g, clock = _stale_group()
    src = Source()
    assert await g.do("k", src) == "v1"
    clock.now += 31
    assert await g.do_with_role("k", src) == ("v2", "leader")
    assert "k" in g.cache  # type: ignore[operator]
    assert_idle(g)


async def test_stale_if_error_serves_stale_logs_once_backs_off_then_the_error_reaches_callers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g, clock = _stale_group()
    src = Source()
    assert await g.do("k", src) == "v1"
    src.fail = RuntimeError("upstream down")
    clock.now += 15
    caplog.set_level(logging.WARNING, logger="singleflight")
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await async_wait_until(lambda: not _refreshing(g), "the failed refresh ended")
    assert src.calls == 2
    # Within the back-off: stale, and no new refresh.
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await asyncio.sleep(0)
    assert src.calls == 2 and not _refreshing(g)
    # After the back-off: one more try, which fails again; logged once for the whole run.
    clock.now += g._front.backoff  # type: ignore[union-attr]
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await async_wait_until(lambda: src.calls == 3 and not _refreshing(g), "the retry ended")
    records = [r for r in caplog.records if "refresh" in r.getMessage()]
    assert len(records) == 1 and "upstream down" in records[0].getMessage()
    # After ttl + stale_ttl the error reaches the caller, and nothing is cached.
    clock.now += 20
    with pytest.raises(RuntimeError, match="upstream down"):
        await g.do("k", src)
    assert "k" not in g.cache  # type: ignore[operator]
    src.fail = None
    assert await g.do_with_role("k", src) == ("v5", "leader")
    assert_idle(g)


async def test_a_refresh_judged_uncacheable_removes_the_entry() -> None:
    g, clock = _stale_group(cache_if=lambda v: v != "v2")
    src = Source()
    assert await g.do("k", src) == "v1"
    clock.now += 15
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await async_wait_until(lambda: not _refreshing(g), "the refresh landed")
    assert "k" not in g.cache  # type: ignore[operator]
    assert await g.do_with_role("k", src) == ("v3", "leader")


async def test_ttl_of_gives_each_value_its_own_times() -> None:
    times = {"v1": (1.0, 0.0), "v2": (100.0, 5.0)}
    g, clock = _stale_group(ttl_of=lambda v: times.get(v))
    src = Source()
    assert await g.do("k", src) == "v1"
    clock.now += 2  # past v1's own ttl, and it has no stale window
    assert await g.do_with_role("k", src) == ("v2", "leader")
    clock.now += 104
    assert await g.do_with_role("k", src) == ("v2", "stale")
    await async_wait_until(lambda: not _refreshing(g), "the refresh landed")
    assert "k" not in g.cache  # type: ignore[operator]  # ttl_of(v3) is None: kept out


@pytest.mark.parametrize("how", ["forget", "cache_pop", "cache_clear"])
async def test_forget_during_a_refresh_wins(how: str) -> None:
    g, clock = _stale_group()
    src = Source()
    assert await g.do("k", src) == "v1"
    clock.now += 15
    src.gate.clear()
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await async_wait_until(lambda: src.calls == 2, "the refresh runs")
    getattr(g, how)(*(() if how == "cache_clear" else ("k",)))
    src.gate.set()
    # The next caller starts a new flight (the refresh was forgotten), and its value stays.
    assert await g.do_with_role("k", src) == ("v3", "leader")
    await async_wait_until(lambda: not g._front.tasks, "the refresh ended")  # type: ignore[union-attr]
    assert await g.do_with_role("k", src) == ("v3", "cache")
    assert_idle(g)


def test_a_refresh_cancelled_by_loop_shutdown_leaves_nothing_behind() -> None:
    g, clock = _stale_group()

    async def first() -> str:
        return "v1"

    async def hangs() -> str:
        await asyncio.Event().wait()
        raise AssertionError("never")

    assert asyncio.run(g.do("k", first)) == "v1"
    clock.now += 15

    async def main() -> Any:
        got = await g.do_with_role("k", hangs)
        await async_wait_until(lambda: g.in_flight == 1, "the refresh runs")
        return got

    assert asyncio.run(main()) == ("v1", "stale")  # asyncio.run cancels the refresh task
    front = g._front
    assert not front.tasks and not front._refreshing  # type: ignore[union-attr]
    assert_idle(g)
    assert g.stats.reelections == 1  # the refresh's leader was cancelled, nobody followed it


async def test_close_cancels_a_running_refresh() -> None:
    g, clock = _stale_group()
    src = Source()
    assert await g.do("k", src) == "v1"
    clock.now += 15
    src.gate.clear()
    assert await g.do_with_role("k", src) == ("v1", "stale")
    await async_wait_until(lambda: src.calls == 2, "the refresh runs")
    g.close()
    await async_wait_until(lambda: not g._front.tasks and g.in_flight == 0, "it was cancelled")  # type: ignore[union-attr]
    assert_idle(g)


# -- sync work: a bounded, named worker thread ---------------------------------------------------


def _refresh_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("singleflight-refresh")]


def test_sync_stale_is_served_at_once_and_one_named_thread_refreshes() -> None:
    g, clock = _stale_group()
    calls: list[int] = []
    gate = threading.Event()

    def work() -> str:
        calls.append(1)
        if len(calls) > 1:
            assert gate.wait(TIMEOUT)
        return f"v{len(calls)}"

    assert g.do_sync_with_role("k", work) == ("v1", "leader")
    clock.now += 15
    callers = [start(g.do_sync_with_role, "k", work) for _ in range(20)]
    assert [c.outcome() for c in callers] == [("v1", "stale")] * 20
    wait_until(lambda: len(calls) == 2, "the one refresh runs")
    threads = _refresh_threads()
    assert threads and all(t.name.startswith("singleflight-refresh-") for t in threads)
    assert all(t.daemon for t in threads)  # a refresh stuck upstream never blocks exit
    gate.set()
    wait_until(lambda: not _refreshing(g), "the refresh landed")
    assert g.do_sync_with_role("k", work) == ("v2", "cache") and len(calls) == 2
    g.cache_clear()  # closes the refresh threads
    for t in _refresh_threads():
        t.join(TIMEOUT)
    assert _refresh_threads() == []
    assert_idle(g)


def test_sync_refresh_failure_keeps_stale_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g, clock = _stale_group()
    work = SyncWork("v1")
    work.release()
    assert g.do_sync("k", work) == "v1"
    failing = SyncWork(raises=OSError("gone"))
    failing.release()
    clock.now += 15
    caplog.set_level(logging.WARNING, logger="singleflight")
    assert g.do_sync_with_role("k", failing) == ("v1", "stale")
    wait_until(lambda: failing.calls == 1 and not _refreshing(g), "the refresh failed")
    assert g.do_sync_with_role("k", failing) == ("v1", "stale")
    assert [r.levelno for r in caplog.records if "refresh" in r.getMessage()] == [logging.WARNING]
    g.close()
    for t in _refresh_threads():
        t.join(TIMEOUT)
    assert _refresh_threads() == []


# -- the decorator ------------------------------------------------------------------------------


async def test_decorator_stale_ttl() -> None:
    runs: list[int] = []
    gate = asyncio.Event()

    @singleflight(ttl=10, stale_ttl=20)
    async def fetch(x: int) -> str:
        runs.append(x)
        if len(runs) > 1:
            await gate.wait()
        return f"v{len(runs)}"

    clock = Clock()
    fetch.group._front._timer = clock  # type: ignore[union-attr]
    assert await fetch(1) == "v1"
    clock.now += 15
    assert await asyncio.wait_for(fetch(1), TIMEOUT) == "v1"  # stale, at once
    await async_wait_until(lambda: len(runs) == 2, "the refresh runs")
    gate.set()
    await async_wait_until(lambda: not _refreshing(fetch.group), "the refresh landed")
    assert await fetch(1) == "v2" and len(runs) == 2
    assert len(fetch.group.cache) == 1  # type: ignore[arg-type]


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"stale_ttl": 5}, ValueError, ("stale_ttl= needs ttl=", "pass ttl= too")),
        ({"ttl": 5, "stale_ttl": -1}, ValueError, ("stale_ttl must be >= 0", "-1")),
        ({"ttl": 5, "stale_ttl": float("inf")}, ValueError, ("stale_ttl must be >= 0 and finite",)),
        ({"ttl": 5, "stale_ttl": "30"}, TypeError, ("stale_ttl must be a number", "'30'")),
        ({"ttl": 5, "stale_ttl": True}, TypeError, ("stale_ttl must be a number",)),
        ({"maxsize": 5}, ValueError, ("maxsize= needs ttl=",)),
        ({"ttl_of": len}, ValueError, ("ttl_of= needs ttl=",)),
        ({"ttl": 5, "ttl_of": 3}, TypeError, ("ttl_of must be a callable", "3")),
        ({"ttl": 5, "cache": {}}, ValueError, ("either cache= or ttl=",)),
    ],
)
def test_group_stale_options_fail_at_construction(
    kwargs: dict[str, Any], exc: type[Exception], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(exc) as info:
        Group(**kwargs)
    assert all(f in str(info.value) for f in fragments), str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"stale_ttl": 5}, ValueError, "stale_ttl= needs ttl="),
        ({"ttl": 5, "stale_ttl": -2}, ValueError, "stale_ttl must be >= 0"),
        ({"ttl": 5, "stale_ttl": "x"}, TypeError, "stale_ttl must be a number"),
    ],
)
def test_decorator_stale_options_fail_at_decoration(
    kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc, match=fragment):
        singleflight(**kwargs)


def test_trio_stale_refreshes_in_a_system_task() -> None:
    trio = pytest.importorskip("trio")
    g, clock = _stale_group()
    calls: list[int] = []

    async def work() -> str:
        calls.append(1)
        await trio.sleep(0)
        return f"v{len(calls)}"

    async def main() -> list[Any]:
        got = [await g.do_with_role("k", work)]
        clock.now += 15
        got.append(await g.do_with_role("k", work))  # stale at once; the refresh is spawned
        with trio.fail_after(TIMEOUT):
            while _refreshing(g):
                await trio.sleep(0.001)
        got.append(await g.do_with_role("k", work))
        return got

    assert trio.run(main) == [("v1", "leader"), ("v1", "stale"), ("v2", "cache")]
    assert_idle(g)


def test_close_with_a_queued_sync_refresh_lets_the_next_stale_caller_refresh() -> None:
    """Refreshes queued behind busy workers are cancelled by close(); they never report back,
    so close() must not leave their keys marked "refreshing" for ever."""
    from singleflight._stale import REFRESH_THREADS

    g, clock = _stale_group()
    gate = threading.Event()
    started: list[str] = []

    def work(key: str, block: bool) -> str:
        started.append(key)
        if block:
            assert gate.wait(TIMEOUT)
        return key

    keys = [f"k{i}" for i in range(REFRESH_THREADS + 1)]
    for k in keys:
        assert g.do_sync(k, work, k, False) == k
    clock.now += 15
    for k in keys:  # each stale hit starts its key's refresh; the last one queues
        assert g.do_sync_with_role(k, work, k, True) == (k, "stale")
    wait_until(lambda: len(started) == 2 * len(keys) - 1, "every worker is busy")
    g.close()  # cancels the queued refresh of the last key
    last = keys[-1]
    assert g.do_sync_with_role(last, work, last, False) == (last, "stale")
    wait_until(lambda: started.count(last) == 2, "a new refresh of the last key ran")
    gate.set()
    wait_until(lambda: not _refreshing(g) and g.in_flight == 0, "every refresh landed")
    g.close()
    for t in _refresh_threads():
        t.join(TIMEOUT)
    assert _refresh_threads() == []
    assert_idle(g)


def test_a_sync_refresh_stuck_upstream_does_not_keep_the_process_alive() -> None:
    """A real child process serves a stale value whose refresh hangs for ever, then exits."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from singleflight import Group\n"
        "g = Group(ttl=10, stale_ttl=20)\n"
        "now = [0.0]\n"
        "g._front._timer = lambda: now[0]\n"
        "assert g.do_sync('k', lambda: 'v1') == 'v1'\n"
        "now[0] = 15.0\n"
        "hang, entered = threading.Event(), threading.Event()\n"
        "def stuck():\n"
        "    sys.stdout.write('refreshing\\n')\n"
        "    entered.set()\n"
        "    hang.wait()\n"
        "sys.stdout.write(repr(g.do_sync_with_role('k', stuck)) + '\\n')\n"
        "assert entered.wait(10)\n"
        "sys.stdout.write(f'exiting {g.in_flight}\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "('v1', 'stale')" in out and "refreshing" in out and "exiting 1" in out, out
