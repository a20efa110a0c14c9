"""Waiters: how a flight's outcome reaches each caller in its own world (loop, thread, trio).

Waiters are level-triggered objects created before they are published: an
``asyncio.Future`` (woken directly on its own loop, through ``call_soon_threadsafe`` from
anywhere else), a ``_ThreadWaiter`` (a lock acquired in advance and released by the leader)
or a ``_TrioWaiter``. A *flight* is a plain ``list`` of them (see ``_oncemap``).
"""

from __future__ import annotations

import asyncio
import threading
from asyncio import InvalidStateError
from asyncio.events import _get_running_loop
from typing import TYPE_CHECKING, Any, Final, TypeAlias

if TYPE_CHECKING:
    from ._oncemap import OnceMap

__all__ = (
    "ALONE",
    "ERROR",
    "FORGOTTEN",
    "LEAD",
    "REELECT",
    "SIGNAL",
    "VALUE",
    "Flight",
    "abandon_future",
    "new_waiter",
    "wait_for_outcome",
    "wake",
)

# Outcome kinds a leader hands to its waiters.
VALUE: Final = 0
ERROR: Final = 1
SIGNAL: Final = 2  # payload is REELECT or ALONE

#: The leader gave up (cancelled, or failed on its own deadline): register again, maybe lead.
REELECT: Final = object()
#: The leader's result must not be shared: run your own work, outside any flight.
ALONE: Final = object()
#: You are the flight's leader now: the previous one gave up (re-election, DESIGN.md).
LEAD: Final = object()
#: Appended to a flight by ``forget`` so that its leader takes the locked landing path.
FORGOTTEN: Final = object()

Flight: TypeAlias = "list[Any]"  # waiters, and FORGOTTEN once forgotten


class _Waiter:
    """A waiter that is not an asyncio future. ``settle`` may be called from any thread."""

    __slots__ = ("kind", "payload")

    def __init__(self) -> None:
        self.kind = SIGNAL
        self.payload: Any = None

    def settle(self, kind: int, payload: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def wake(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def outcome(self) -> Any:
        """Return the delivered value or sentinel, or raise the delivered exception."""
        if self.kind == ERROR:
            exc, tb = self.payload
            # Raise with the leader's traceback so it does not grow with every waiter.
            raise exc.with_traceback(tb)
        return self.payload


class _ThreadWaiter(_Waiter):
    """A thread blocked on a lock that it acquired before publishing itself."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.lock.acquire()

    def settle(self, kind: int, payload: Any) -> None:
        self.kind = kind
        self.payload = (payload, payload.__traceback__) if kind == ERROR else payload
        self.wake()

    def wake(self) -> bool:
        self.lock.release()  # kind/payload are written before: the waiter reads after acquire
        return True


class _TrioWaiter(_Waiter):
    """A trio task waiting on a ``trio.Event`` of its own run."""

    __slots__ = ("event", "token")

    def __init__(self) -> None:
        import trio

        super().__init__()
        self.event = trio.Event()
        self.token = trio.lowlevel.current_trio_token()

    def settle(self, kind: int, payload: Any) -> None:
        self.kind = kind
        self.payload = (payload, payload.__traceback__) if kind == ERROR else payload
        self.wake()

    def wake(self) -> bool:
        try:
            self.token.run_sync_soon(self.event.set)
        except Exception:  # the trio run has ended: nobody is waiting any more
            return False
        return True


def _settle_future(fut: asyncio.Future[Any], kind: int, payload: Any) -> None:
    if fut.done():  # the waiter was cancelled: its own business
        return
    if kind == ERROR:
        if isinstance(payload, StopIteration):  # futures refuse StopIteration
            payload = RuntimeError(f"work raised {payload!r}")
        fut.set_exception(payload)
    else:
        fut.set_result(payload)


def _offer_lead(
    fut: asyncio.Future[Any], owner: OnceMap[Any, Any], key: Any, flight: Flight
) -> None:
    """On the elected follower's own loop: make it the leader, or pass on if it just left."""
    if fut.done():
        owner.handover(key, flight)
    else:
        fut.set_result(LEAD)


_Future = asyncio.Future


def wake(waiters: list[Any], kind: int, payload: Any) -> None:
    """Deliver one outcome to every waiter, each in its own world (loop, thread, trio run)."""
    here = _get_running_loop()
    if kind == ERROR:
        for w in waiters:
            _wake_one(w, kind, payload, here)
        return
    future = _Future
    for w in waiters:
        # The common case inline: a future of the leader's own loop.
        if type(w) is future and w._loop is here:
            try:
                w.set_result(payload)
            except InvalidStateError:  # the waiter was cancelled: its own business
                pass
        else:
            _wake_one(w, kind, payload, here)


def _wake_one(w: Any, kind: int, payload: Any, here: asyncio.AbstractEventLoop | None) -> None:
    if w is FORGOTTEN:
        return
    if isinstance(w, _Waiter):
        w.settle(kind, payload)
        return
    loop = w.get_loop()
    if loop is here:
        _settle_future(w, kind, payload)
        return
    try:
        loop.call_soon_threadsafe(_settle_future, w, kind, payload)
    except RuntimeError:  # that loop is closed: its waiter is gone with it
        pass


def new_waiter() -> Any:
    """A waiter for the current async context: a future on asyncio, an event on trio."""
    loop = _get_running_loop()
    if loop is not None:
        return loop.create_future()
    return _TrioWaiter()


async def wait_for_outcome(owner: OnceMap[Any, Any], key: Any, flight: Flight, waiter: Any) -> Any:
    """Await an async waiter's outcome; a caller that leaves early passes on a lead it got."""
    if isinstance(waiter, _Waiter):  # trio
        try:
            await waiter.event.wait()  # type: ignore[attr-defined]
        except BaseException:
            if not owner.leave(flight, waiter):
                owner.resign(key, flight, waiter.payload)
            raise
        return waiter.outcome()
    try:
        return await waiter
    except BaseException:
        abandon_future(owner, key, flight, waiter)
        raise


def abandon_future(owner: OnceMap[Any, Any], key: Any, flight: Flight, fut: Any) -> None:
    """A follower whose future may hold an outcome is leaving: pass on a lead, mark seen."""
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        owner.resign(key, flight, fut.result())
