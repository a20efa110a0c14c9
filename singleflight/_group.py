"""Group: one flight per key, with an optional cache in front and an optional shared tier.

Group is the public face: options, counters, invalidation, and the calls (``do``,
``do_sync``...). The life of a call is in ``_flight`` (async) and ``_sync`` (threads); a Group
with neither cache nor tier takes ``do``'s fast path: one insert, the work, one delete.
"""

from __future__ import annotations

import asyncio
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from sys import _getframe
from typing import Any, TypeVar, cast

from ._cache import CacheFront
from ._errors import AWAITS, hash_error, misused_do
from ._flight import Flights
from ._oncemap import OnceMap
from ._options import (
    check_cache,
    check_cache_if,
    check_codec,
    check_reelect_on,
    check_tier,
    check_timeout,
    check_ttl_options,
)
from ._reentrancy import _CO_ASYNC, SYNC_LEADERS, is_reentrant, reentrancy_error, runs_flight
from ._stale import StaleFront, TtlOf
from ._sync import run_sync
from ._types import Codec, Role, Stats, Tier, Unshared
from ._waiters import (
    ALONE,
    LEAD,
    SIGNAL,
    VALUE,
    Flight,
    abandon_future,
)

__all__ = ("Codec", "Group", "Role", "Stats", "Tier", "Unshared")

V = TypeVar("V")

# The leader's own end, not an outcome: cancelled, or its coroutine closed with its loop.
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


class Group(Flights[V]):
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
        ttl: instead of ``cache``: keep each value ``ttl`` seconds from its completion
            (role ``"cache"``), in a cache of ``maxsize`` entries (default 1024).
        stale_ttl: with ``ttl``: for ``stale_ttl`` more seconds serve the old value at once
            (role ``"stale"``) while one background refresh per key runs (stale-while-
            revalidate); if it fails, keep serving it until then (stale-if-error).
        maxsize: the most values the ``ttl`` cache keeps (least recently used go first).
        ttl_of: with ``ttl``: ``ttl_of(value) -> (ttl, stale_ttl)`` gives each value its own
            times, or None to keep it out (a refresh kept out removes the stale entry).
    """

    def __init__(
        self,
        cache: MutableMapping[Any, V] | None = None,
        *,
        cache_if: Callable[[V], bool] | None = None,
        reelect_on: tuple[type[BaseException], ...] = (),
        tier: Tier | None = None,
        codec: Codec[Any] | None = None,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        maxsize: int | None = None,
        ttl_of: TtlOf | None = None,
    ) -> None:
        cache = check_cache(cache)
        cache_if = check_cache_if(cache_if)
        reelect_on = check_reelect_on(reelect_on)
        self._tier: Tier | None = check_tier(tier)
        self._codec = check_codec(codec)
        times = check_ttl_options(ttl, stale_ttl, maxsize, ttl_of, cache)
        self._map: OnceMap[Any, V] = OnceMap()
        self._flights = self._map._flights  # the hot path reads the dict directly
        self._front: CacheFront | StaleFront | None = None
        if times is not None:
            self._front = StaleFront(*times, cache_if, ttl_of, self._map)
        elif cache is not None:
            self._front = CacheFront(cache, cache_if, self._map)
        self._cache_if = cache_if
        self._reelect = _CANCELLED + reelect_on
        self._reelect_sync: tuple[type[BaseException], ...] = (
            asyncio.CancelledError,
            *reelect_on,
        )
        self._plain = self._front is None and tier is None  # True: do() may take the fast path
        # Counters: plain += under the GIL (no preemption inside one such statement).
        self._leaders = 0
        self._followers = 0
        self._cache_hits = 0
        self._errors = 0
        self._reelections = 0

    # -- introspection and invalidation ---------------------------------------------------

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
        return None if self._front is None else cast("MutableMapping[Any, V]", self._front.cache)

    def forget(self, key: Hashable) -> None:
        """Forget ``key``: the next caller runs the work afresh.

        Its cached value (if any) is dropped, and the flight in progress, if any, will not
        store its value when it lands; its current callers still get that value. Callers
        that come after this start a new flight.
        """
        if self._front is None:
            self._map.forget(key)
        else:
            self._front.forget(key)

    def cache_put(self, key: Hashable, value: V) -> None:
        """Store ``value`` for ``key`` in the cache, outside any flight (no-op without one).

        The cache's rules still apply (``cache_if``, the ttl). An HTTP adapter uses it for a
        body that was shared live and became whole after its flight landed.
        """
        if self._front is not None:
            self._front.put(key, value)

    def cache_pop(self, key: Hashable) -> None:
        """Invalidate ``key`` (async-lru's ``cache_invalidate``): the same as ``forget``.

        The cached value is dropped and a flight in progress will not store its value.
        """
        self.forget(key)

    def cache_clear(self) -> None:
        """Drop every cached value; flights in progress will not store theirs.

        Their current callers still get their values; later callers start new flights.
        The background refresh threads (``stale_ttl``) are closed.
        """
        if self._front is not None:
            self._front.clear()

    def close(self) -> None:
        """Stop the background refreshes (``stale_ttl``): their tasks are cancelled and their
        worker threads closed. The Group still works; a later stale value refreshes anew."""
        if self._front is not None:
            self._front.close()

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
            raise hash_error(key, exc) from None
        if head is flight:  # we lead: a copy of this branch is in _decorator
            self._leaders += 1
            try:
                value = await (fn(*args, **kwargs) if kwargs else fn(*args) if args else fn())
            except BaseException as exc:
                told = misused_do(exc, fn)
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
        del flight  # a follower's wait keeps its frame alive: not this empty list too
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
        # The walk (is_reentrant) only when it could find something: our caller is a coroutine
        # (the work of a flight may be up the chain) or a sync leader runs somewhere. A task
        # that runs do() itself has the loop's own (sync) frame below: nothing to walk.
        if (_getframe(1).f_code.co_flags & _CO_ASYNC or SYNC_LEADERS[0]) and is_reentrant(head):
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

    async def _follow(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: Flight,
    ) -> V:
        """The decorator's follower (``_decorator._async_caller``): a copy of ``do``'s follower
        branch (``head`` owns ``key``)."""
        loop = _get_running_loop()
        if loop is None or self._map._next:
            return (await self._run(key, fn, args, kwargs, head, None))[0]
        # The follower's fast path (asyncio, nothing forgotten): no lock, no task, no future
        # of the map's. Register first, then re-check the flight still owns the key (uv #3724).
        fut = loop.create_future()
        head.append(fut)
        if self._flights.get(key) is not head:
            fut.cancel()  # the flight landed before it could see us: start over
            return (await self._run(key, fn, args, kwargs, None, None))[0]
        if (_getframe(2).f_code.co_flags & _CO_ASYNC or SYNC_LEADERS[0]) and is_reentrant(
            head,
            depth=3,  # skip this frame and its caller's (as in do: walk only if it can find)
        ):
            fut.cancel()
            raise reentrancy_error(key)
        self._followers += 1
        value: Any
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
        return cast(V, value)

    async def do_with_role(
        self, key: Hashable, fn: Callable[..., Awaitable[V]], /, *args: Any, **kwargs: Any
    ) -> tuple[V, Role]:
        """Like ``do``, and also say how the call was served (``"leader"``, ``"follower"``…)."""
        return await self._run(key, fn, args, kwargs, None, None)

    # -- threads (the life of a sync call: _sync.run_sync) ------------------------------------

    def do_sync(self, key: Hashable, fn: Callable[..., V], /, *args: Any, **kwargs: Any) -> V:
        """Run ``fn(*args, **kwargs)`` once per ``key`` in flight, from any thread.

        The leader runs ``fn`` in its own thread; followers block until it lands and get its
        value or exception (``BaseException`` included). Shares flights with ``do``.
        """
        return cast(V, run_sync(self, key, fn, args, kwargs)[0])

    def do_sync_with_role(
        self, key: Hashable, fn: Callable[..., V], /, *args: Any, **kwargs: Any
    ) -> tuple[V, Role]:
        """Like ``do_sync``, and also say how the call was served."""
        return run_sync(self, key, fn, args, kwargs)

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
        return run_sync(self, key, fn, args, kwargs, timeout)


AWAITS.add(Group.do.__code__)  # where our own await meets fn's value
