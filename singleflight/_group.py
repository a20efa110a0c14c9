"""Group: one flight per key, with an optional cache in front and an optional shared tier."""

from __future__ import annotations

import asyncio
import functools
import threading
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from dataclasses import dataclass
from types import CoroutineType
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, cast, final

from ._observe import note_reelection
from ._oncemap import (
    ALONE,
    ERROR,
    LEAD,
    REELECT,
    SIGNAL,
    SYNC_LEADERS,
    VALUE,
    OnceMap,
    _ThreadWaiter,
    _Waiter,
    abandon_future,
    is_reentrant,
    new_waiter,
    reentrancy_error,
    runs_flight,
    wait_for_outcome,
)
from ._options import (
    check_cache,
    check_cache_if,
    check_codec,
    check_reelect_on,
    check_tier,
    check_timeout,
)

__all__ = ("Codec", "Group", "Role", "Stats", "Tier", "Unshared")

T = TypeVar("T")
V = TypeVar("V")

#: How a call was served.
Role = Literal["leader", "follower", "cache", "shared", "remote", "stale"]

_MISSING: Final = object()
# The leader's own end, not an outcome: cancelled, or its coroutine closed with its loop.
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


class Codec(Protocol[V]):
    """Turns values into bytes and back, for a shared tier (never pickle)."""

    def encode(self, value: V, /) -> bytes: ...

    def decode(self, data: bytes, /) -> V: ...


class Tier(Protocol):
    """A shared tier (e.g. ``singleflight.redis.RedisTier``) the local leader goes through."""

    async def run(
        self,
        key: Hashable,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]: ...


@final
@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a Group's counters.

    ``calls == leaders + followers + cache_hits``: every call is counted once, by how it
    ended up being served. ``errors`` counts flights whose work raised (cancellations and
    re-elections excluded); ``reelections`` counts flights a leader handed to a follower
    (cancelled, timed out); ``bypasses`` counts requests an HTTP adapter let straight through.
    """

    calls: int
    leaders: int
    followers: int
    cache_hits: int
    errors: int
    reelections: int = 0
    bypasses: int = 0


@final
class Unshared(Generic[T]):
    """Returned by a leader's work: give ``value`` to the leader only.

    Every follower of that flight then runs its own work, alone. Used by the HTTP adapters for
    responses that must not be shared (Set-Cookie, event streams, oversized bodies).
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


def _is_cancellation(exc: BaseException) -> bool:
    """Cancellation of the current task, on asyncio or on trio (without importing trio)."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    cls = type(exc)
    return cls.__name__ == "Cancelled" and cls.__module__.startswith("trio")


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _use_do(fn: object, value: object) -> TypeError:
    """``do_sync`` was given async work: close its coroutine and say which method to use."""
    value.close()  # type: ignore[attr-defined]  # never awaited: no RuntimeWarning later
    return TypeError(
        f"Group.do_sync runs sync work, but {_name(fn)} is async (it returned a coroutine); "
        f"use await group.do(key, {_name(fn)}, ...) for async functions"
    )


def _misused_do(exc: BaseException, fn: object) -> BaseException:
    """The leader's ``await fn(...)`` raised ``exc``: if ``fn`` was sync work, say so.

    Only a TypeError raised by our own ``await`` (the innermost frame is Group code) counts:
    the same TypeError raised inside the work is the work's own outcome.
    """
    tb = exc.__traceback__
    if type(exc) is not TypeError or tb is None:
        return exc
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code not in _AWAITS:
        return exc
    return TypeError(
        f"Group.do awaits async work, but {_name(fn)} is sync (it ran, and returned a value "
        f"that cannot be awaited: {exc}); use group.do_sync(key, {_name(fn)}, ...) for sync "
        "functions"
    )


def _hash_error(key: object, exc: TypeError) -> TypeError:
    return TypeError(
        f"singleflight key {key!r} is not hashable ({exc}); "
        "pass a hashable key, e.g. a tuple instead of a list, or give the decorator key=..."
    )


class Group(Generic[V]):
    """Group runs work once per key at a time; every concurrent caller of a key shares it.

    ``await do(key, fn, ...)`` (async work) and ``do_sync(key, fn, ...)`` (sync work, from any
    thread) share one in-flight map: the first caller of a key leads and runs ``fn``; callers
    that arrive while it runs follow and get the leader's value or exception. Works from any
    number of event loops (asyncio or trio) and threads at once, and outlives them.

    Args:
        cache: optional mapping (e.g. ``cachetools.TTLCache``) of completed values; a hit skips
            the flight. The Group guards it with its own lock.
        cache_if: store a value in ``cache`` only if this returns True.
        reelect_on: exception types that end only the leader's own attempt (e.g. its own
            timeout): the leader gets its exception and a follower runs the work afresh.
            Cancelling the leader always does this.
        tier: a shared tier (``singleflight.redis.RedisTier``) the local leader goes through.
        codec: how the tier stores values; None lets the tier choose.
    """

    def __init__(
        self,
        cache: MutableMapping[Any, V] | None = None,
        *,
        cache_if: Callable[[V], bool] | None = None,
        reelect_on: tuple[type[BaseException], ...] = (),
        tier: Tier | None = None,
        codec: Codec[Any] | None = None,
    ) -> None:
        cache = check_cache(cache)
        cache_if = check_cache_if(cache_if)
        reelect_on = check_reelect_on(reelect_on)
        tier = check_tier(tier)
        codec = check_codec(codec)
        self._map: OnceMap[Any, V] = OnceMap()
        self._flights = self._map._flights  # the hot path reads the dict directly
        self._cache = cache
        self._cache_if = cache_if
        self._cache_lock = threading.Lock()  # guards self._cache (cachetools is not thread-safe)
        self._reelect = _CANCELLED + reelect_on
        self._reelect_sync: tuple[type[BaseException], ...] = (
            asyncio.CancelledError,
            *reelect_on,
        )
        self._tier = tier
        self._codec = codec
        self._plain = cache is None and tier is None  # True: do() may take the fast path
        # Counters: plain += under the GIL (no preemption inside one such statement).
        self._leaders = 0
        self._followers = 0
        self._cache_hits = 0
        self._errors = 0
        self._reelections = 0

    # -- introspection -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """The number of keys in flight now."""
        return len(self._map)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters (see ``Stats``)."""
        leaders, followers, hits = self._leaders, self._followers, self._cache_hits
        return Stats(
            leaders + followers + hits, leaders, followers, hits, self._errors, self._reelections
        )

    def __contains__(self, key: object) -> bool:
        """Is ``key`` in flight now? A hint: the answer may change the moment it is given."""
        return key in self._flights

    @property
    def tier(self) -> Tier | None:
        """The shared tier the leaders go through, or None."""
        return self._tier

    @property
    def cache(self) -> MutableMapping[Any, V] | None:
        """The cache of completed values, or None."""
        return self._cache

    def forget(self, key: Hashable) -> None:
        """Forget ``key``: the next caller runs the work afresh.

        Its cached value (if any) is dropped, and the flight in progress, if any, will not
        store its value when it lands; its current callers still get that value. Callers
        that come after this start a new flight.
        """
        if self._cache is None:
            self._map.forget(key)
            return
        try:
            with self._cache_lock:  # atomic with a landing leader's "forgotten? else store"
                self._map.forget(key)
                self._cache.pop(key, None)
        except TypeError as exc:
            raise _hash_error(key, exc) from None

    def cache_pop(self, key: Hashable) -> None:
        """Invalidate ``key`` (async-lru's ``cache_invalidate``): the same as ``forget``.

        The cached value is dropped and a flight in progress will not store its value.
        """
        self.forget(key)

    def cache_clear(self) -> None:
        """Drop every cached value; flights in progress will not store theirs.

        Their current callers still get their values; later callers start new flights.
        """
        if self._cache is None:
            return
        with self._cache_lock:
            for key in tuple(self._flights):  # tuple(dict): one C call, atomic under the GIL
                self._map.forget(key)
            self._cache.clear()

    # -- async ----------------------------------------------------------------------------

    @runs_flight
    async def do(
        self, key: Hashable, fn: Callable[..., Awaitable[V]], /, *args: Any, **kwargs: Any
    ) -> V:
        """Run ``await fn(*args, **kwargs)`` once per ``key`` in flight; return its value.

        Every caller of a key whose flight is under way gets the same value, or the same
        exception. Cancelling a caller affects it alone; if the leader is cancelled, one waiting
        caller becomes the leader and runs its own ``fn``, and the others wait for that run. A
        flight that awaits its own key raises ``ReentrancyError``.
        """
        if not self._plain:
            return (await self._run(key, fn, args, kwargs, None, None))[0]
        # The fast path: an uncontended flight is one insert, the work, one delete. This is a
        # deliberate copy of the leader and follower branches of _run (which handles the rest):
        # a second coroutine per call would cost more than the whole of this path.
        flights = self._flights
        flight: list[Any] = []
        try:
            head = flights.setdefault(key, flight)
        except TypeError as exc:
            raise _hash_error(key, exc) from None
        if head is flight:
            self._leaders += 1
            try:
                value = await fn(*args, **kwargs)
            except BaseException as exc:
                told = _misused_do(exc, fn)
                self._land_failed(key, flight, told)
                if told is not exc:
                    raise told from None
                raise
            if type(value) is Unshared:
                self._map.land(key, flight, SIGNAL, ALONE)
                return cast(V, value.value)  # type: ignore[attr-defined]
            if not flight:
                del flights[key]  # remove first, then look again (see _oncemap)
                if not flight:
                    return value
                self._map._land_locked(key, flight, VALUE, value, removed=True)
            else:
                self._map._land_locked(key, flight, VALUE, value, removed=False)
            return value
        loop = _get_running_loop()
        if loop is None or self._map._next:
            return (await self._run(key, fn, args, kwargs, head, None))[0]
        # The follower's fast path (asyncio, nothing forgotten): no lock, no coroutine of its
        # own. Register first, then re-check that the flight still owns the key (uv #3724).
        fut = loop.create_future()
        head.append(fut)
        if flights.get(key) is not head:
            fut.cancel()  # the flight landed before it could see us: start over
            return (await self._run(key, fn, args, kwargs, None, None))[0]
        if is_reentrant(head):
            fut.cancel()
            raise reentrancy_error(key)
        self._followers += 1
        try:
            value = await fut
        except BaseException:
            abandon_future(self._map, key, head, fut)
            raise
        if value is LEAD:  # the leader gave up and handed the flight to us
            self._followers -= 1
            return (await self._run(key, fn, args, kwargs, None, head))[0]
        if value is ALONE:
            self._followers -= 1
            return await self._alone(fn, args, kwargs)
        return value

    async def do_with_role(
        self, key: Hashable, fn: Callable[..., Awaitable[V]], /, *args: Any, **kwargs: Any
    ) -> tuple[V, Role]:
        """Like ``do``, and also say how the call was served (``"leader"``, ``"follower"``…)."""
        return await self._run(key, fn, args, kwargs, None, None)

    def _land_failed(
        self, key: Hashable, flight: list[Any], exc: BaseException, *, sync: bool = False
    ) -> None:
        """The leader's run raised: hand the flight over, or share the error.

        Sync work (``sync=True``) runs in a thread, where no loop closes it: a
        ``GeneratorExit`` it raises is its outcome like any other exception, shared once.
        """
        reelect = self._reelect_sync if sync else self._reelect
        gave_up = isinstance(exc, reelect) or _is_cancellation(exc)
        if gave_up:
            # Its own cancellation or deadline, or its coroutine closed with its loop: not an
            # outcome the followers should see. One of them leads the flight from here.
            self._reelections += 1
            note_reelection(key, exc)
            self._map.handover(key, flight)
        else:
            self._errors += 1
            self._map.land(key, flight, ERROR, exc)

    def _cached(self, key: Hashable) -> Any:
        cache = self._cache
        if cache is None:
            return _MISSING
        try:
            with self._cache_lock:
                return cache.get(key, _MISSING)
        except TypeError as exc:
            raise _hash_error(key, exc) from None

    def _enter(
        self, key: Hashable, head: list[Any] | None, make_waiter: Callable[[], Any]
    ) -> tuple[list[Any], bool, Any] | None:
        """Lead a new flight of ``key``, or join the one in flight with a new waiter.

        ``head``: what ``setdefault`` already returned, if the caller tried. Returns
        ``(flight, lead, waiter)``, or None if the flight landed before we could join.
        """
        flight: list[Any] = []
        if head is None:
            try:
                head = self._flights.setdefault(key, flight)
            except TypeError as exc:
                raise _hash_error(key, exc) from None
            if head is flight:
                return flight, True, None
        waiter = make_waiter()
        joined, lead = self._map.join(key, head, waiter)
        return None if joined is None else (joined, lead, waiter)

    def _cached_for_leader(self, key: Hashable, flight: list[Any]) -> Any:
        """A new leader looks again: a flight may have landed (and cached) since we looked."""
        value = self._cached(key)
        if value is not _MISSING:
            self._cache_hits += 1
            self._map.land(key, flight, VALUE, value)
        return value

    def _land_value(
        self, key: Hashable, flight: list[Any], value: Any, role: Role
    ) -> tuple[Any, Role]:
        """The leader's work returned: cache it (if allowed) and hand it to the flight."""
        if type(value) is Unshared:
            self._map.land(key, flight, SIGNAL, ALONE)
            return value.value, role
        if role != "stale":  # a stale value is served, never kept for longer
            self._store(key, flight, value)
        self._map.land(key, flight, VALUE, value)
        return value, role

    def _store(self, key: Hashable, flight: list[Any], value: Any) -> None:
        """Keep ``value`` in the cache, unless it may not be kept or its flight was forgotten."""
        cache = self._cache
        if cache is not None and (self._cache_if is None or self._cache_if(value)):
            with self._cache_lock:
                # forget/cache_pop/cache_clear hold this lock while they mark the flight, so
                # a flight forgotten while it ran never stores its (now stale) value.
                if id(flight) not in self._map._next:
                    cache[key] = value

    async def _alone(
        self, fn: Callable[..., Awaitable[V]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> V:
        """The leader's value was not for sharing: run our own work, outside any flight."""
        self._leaders += 1
        value: Any = await fn(*args, **kwargs)
        return value.value if type(value) is Unshared else value  # type: ignore[no-any-return]

    @runs_flight
    async def _run(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: list[Any] | None,
        owned: list[Any] | None,
    ) -> tuple[V, Role]:
        """The whole of a call: cache, flight (leader or follower), tier, hand-over.

        ``head``: the flight ``setdefault`` already returned (we are not its leader);
        ``owned``: a flight just handed over to us (we lead it).
        """
        value: Any
        if head is None and owned is None:
            value = self._cached(key)
            if value is not _MISSING:
                self._cache_hits += 1
                return value, "cache"
        while True:
            if owned is not None:
                flight, owned, lead = owned, None, True
            else:
                entered = self._enter(key, head, new_waiter)
                head = None
                if entered is None:
                    continue  # the flight landed before we could join: start over
                flight, lead, waiter = entered
                if lead and self._cache is not None:
                    value = self._cached_for_leader(key, flight)
                    if value is not _MISSING:
                        return value, "cache"
            if lead:
                self._leaders += 1
                role: Role = "leader"
                try:
                    if self._tier is None:
                        value = await fn(*args, **kwargs)
                    else:
                        produce = functools.partial(fn, *args, **kwargs)
                        value, tier_role = await self._tier.run(
                            key, produce, self._codec, self._cache_if
                        )
                        role = tier_role  # type: ignore[assignment]
                except BaseException as exc:
                    told = _misused_do(exc, fn)
                    self._land_failed(key, flight, told)
                    if told is not exc:
                        raise told from None
                    raise
                return self._land_value(key, flight, value, role)
            if is_reentrant(flight):
                if not self._map.leave(flight, waiter) and not isinstance(waiter, _Waiter):
                    waiter.cancel()
                raise reentrancy_error(key)
            self._followers += 1
            value = await wait_for_outcome(self._map, key, flight, waiter)
            if value is REELECT:  # the flight ended without a leader: start over
                self._followers -= 1
                continue
            if value is LEAD:
                self._followers -= 1
                owned = flight
                continue
            if value is ALONE:
                self._followers -= 1
                return await self._alone(fn, args, kwargs), "leader"
            return value, "follower"

    # -- threads ------------------------------------------------------------------------

    def do_sync(self, key: Hashable, fn: Callable[..., V], /, *args: Any, **kwargs: Any) -> V:
        """Run ``fn(*args, **kwargs)`` once per ``key`` in flight, from any thread.

        The leader runs ``fn`` in its own thread; followers block until it lands and get its
        value or exception (``BaseException`` included). Shares flights with ``do``.
        """
        return self._run_sync(key, fn, args, kwargs)[0]

    def do_sync_with_role(
        self, key: Hashable, fn: Callable[..., V], /, *args: Any, **kwargs: Any
    ) -> tuple[V, Role]:
        """Like ``do_sync``, and also say how the call was served."""
        return self._run_sync(key, fn, args, kwargs)

    def do_sync_bounded(
        self,
        timeout: float | None,
        key: Hashable,
        fn: Callable[..., V],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[V, Role]:
        """Like ``do_sync_with_role``, but a follower waits at most ``timeout`` seconds.

        Then it raises ``TimeoutError`` and leaves; the flight goes on without it. A leader's
        own run is not bounded here (bound the work itself).
        """
        check_timeout(timeout)
        return self._run_sync(key, fn, args, kwargs, timeout)

    @runs_flight
    def _run_sync(
        self,
        key: Hashable,
        fn: Callable[..., V],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> tuple[V, Role]:
        value: Any = self._cached(key)
        if value is not _MISSING:
            self._cache_hits += 1
            return value, "cache"
        if self._tier is not None:
            raise TypeError(
                "a Group with a tier serves async work only (await group.do(...)); "
                "use a Group without tier= for do_sync"
            )
        owned: list[Any] | None = None
        while True:
            if owned is not None:
                flight, owned, lead = owned, None, True
            else:
                entered = self._enter(key, None, _ThreadWaiter)
                if entered is None:
                    continue  # the flight landed before we could join: start over
                flight, lead, waiter = entered
                if lead and self._cache is not None:
                    value = self._cached_for_leader(key, flight)
                    if value is not _MISSING:
                        return value, "cache"
            if lead:
                self._leaders += 1
                SYNC_LEADERS[0] += 1
                try:
                    value = fn(*args, **kwargs)
                    if type(value) is CoroutineType:
                        raise _use_do(fn, value)
                except BaseException as exc:
                    self._land_failed(key, flight, exc, sync=True)
                    raise
                finally:
                    SYNC_LEADERS[0] -= 1
                return self._land_value(key, flight, value, "leader")
            if is_reentrant(flight, whole_stack=True):
                self._map.leave(flight, waiter)
                raise reentrancy_error(key)
            self._followers += 1
            try:
                got = waiter.lock.acquire(timeout=-1 if timeout is None else timeout)
            except BaseException:  # e.g. KeyboardInterrupt while blocked
                if not self._map.leave(flight, waiter):
                    self._map.resign(key, flight, waiter.payload)
                raise
            if not got:
                if self._map.leave(flight, waiter):
                    raise TimeoutError(
                        f"waited {timeout} s for the flight of {key!r}; it goes on without us"
                    )
                waiter.lock.acquire()  # an outcome is on its way: released right after
            value = waiter.outcome()
            if value is REELECT:
                self._followers -= 1
                continue
            if value is LEAD:
                self._followers -= 1
                owned = flight
                continue
            if value is ALONE:
                self._followers -= 1
                self._leaders += 1
                value = fn(*args, **kwargs)
                return (value.value if type(value) is Unshared else value), "leader"
            return value, "follower"


#: The code objects whose own ``await fn(...)`` may meet sync work (see ``_misused_do``).
_AWAITS: Final = frozenset({Group.do.__code__, Group._run.__code__})
