"""Shared helpers for the core tests (OnceMap, Group, decorator): bounded waits, thread callers.

Every wait here has a deadline, so a hang fails the test instead of freezing the suite.
Waiting for a *condition* (say "9 followers are waiting") polls the public counters; it never
waits for an amount of time and hopes that something happened meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from singleflight import Group, OnceMap

#: Upper bound for any single wait in these tests (seconds). Nothing should come close.
TIMEOUT = 5.0


def assert_idle(group: Group[Any] | OnceMap[Any, Any]) -> None:
    """Assert nothing is in flight, and (white-box, if the internals exist) nothing is stale."""
    if isinstance(group, Group):
        assert group.in_flight == 0, f"{group.in_flight} key(s) still in flight"
        m = getattr(group, "_map", None)
    else:
        assert len(group) == 0, f"{len(group)} key(s) still in flight"
        m = group
    for name in ("_flights", "_next", "_registered"):
        state = getattr(m, name, None)
        assert not state, f"stale internal state OnceMap.{name} = {state!r}"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` from a plain thread until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.0005)


async def async_wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT
) -> None:
    """Poll ``predicate`` from a coroutine (yielding to the loop) until it holds."""
    deadline = time.monotonic() + timeout
    spins = 0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        spins += 1
        # First just let the other tasks of this loop run; then leave room for other threads.
        await asyncio.sleep(0 if spins < 200 else 0.0005)


def followers_waiting(group: Group[Any], n: int) -> Callable[[], bool]:
    """A predicate: at least ``n`` callers have joined a flight as followers (ever)."""
    return lambda: group.stats.followers >= n


def waiters_in_flight(m: OnceMap[Any, Any], key: Any) -> int:
    """White-box: how many waiters are registered in the current flight of ``key``."""
    from singleflight._oncemap import FORGOTTEN

    flight = m._flights.get(key)
    return 0 if flight is None else sum(1 for w in flight if w is not FORGOTTEN)


def all_waiters(m: OnceMap[Any, Any]) -> int:
    """White-box: waiters registered in every flight of ``m`` (forgotten flights included)."""
    from singleflight._oncemap import FORGOTTEN

    flights = [*m._flights.values(), *(f for f in list(m._next.values()) if f)]
    return sum(1 for f in flights for w in list(f) if w is not FORGOTTEN)


class Caller(threading.Thread):
    """Runs ``fn(*args, **kwargs)`` in a daemon thread and keeps its result or exception.

    Catches every ``BaseException`` (SystemExit and KeyboardInterrupt included), so no thread
    ever dies with an unhandled exception.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.result: Any = None
        self.exception: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - the test inspects it
            self.exception = exc
        finally:
            self.done.set()

    def finish(self, timeout: float = TIMEOUT) -> Caller:
        """Join within ``timeout``; fail the test if the thread is still blocked."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} is still blocked after {timeout} s (hang)"
        return self

    def outcome(self, timeout: float = TIMEOUT) -> Any:
        """Join, then return the result or raise the exception the call ended with."""
        self.finish(timeout)
        if self.exception is not None:
            raise self.exception
        return self.result


def start(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Caller:
    """Start a ``Caller`` thread and return it."""
    caller = Caller(fn, *args, **kwargs)
    caller.start()
    return caller


def finish_all(callers: list[Caller], timeout: float = TIMEOUT) -> None:
    """Join every caller with one shared deadline; fail if any is still blocked."""
    deadline = time.monotonic() + timeout
    for c in callers:
        c.join(max(0.0, deadline - time.monotonic()))
    stuck = [c.name for c in callers if c.is_alive()]
    assert not stuck, f"still blocked after {timeout} s: {stuck}"


class LoopThread:
    """An asyncio event loop running in its own thread, for cross-loop followers.

    ``submit(coro)`` returns a ``concurrent.futures.Future``. ``close()`` cancels what is left,
    stops the loop and closes it (in its own thread, so it may be called from another loop).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(TIMEOUT)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the loop thread did not stop"

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncWork:
    """Async work that counts its runs, says it started, and waits for ``release()``.

    ``result`` is returned (a fresh ``object()`` per run by default), or ``raises`` is raised.
    Create it inside the loop that runs it (asyncio events bind to their loop).
    """

    def __init__(self, result: Any = None, *, raises: BaseException | None = None) -> None:
        self.calls = 0
        self.finished = 0  # runs that got past the gate and ended normally or by raising
        self.cancelled = 0  # runs that saw CancelledError
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.result = result
        self.raises = raises
        self.returned: list[Any] = []

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.raises is not None:
            raise self.raises
        value = object() if self.result is None else self.result
        self.returned.append(value)
        return value


class SyncWork:
    """Sync work for threads: counts runs, signals ``started``, blocks until ``release()``."""

    def __init__(self, result: Any = None, *, raises: BaseException | None = None) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.result = result
        self.raises = raises
        self.returned: list[Any] = []

    def release(self) -> None:
        self.gate.set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
        self.started.set()
        assert self.gate.wait(TIMEOUT), "the test never released the work"
        if self.raises is not None:
            raise self.raises
        value = object() if self.result is None else self.result
        self.returned.append(value)
        return value


def never(*args: Any, **kwargs: Any) -> Any:
    """Work that must not run: a follower's own fn, when it joins a flight."""
    raise AssertionError("a follower's own work ran")


async def anever(*args: Any, **kwargs: Any) -> Any:
    """Async work that must not run (never even called: no coroutine is created)."""
    raise AssertionError("a follower's own work ran")
