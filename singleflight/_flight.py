"""The life of an async call: the cache in front, the flight, the tier (or the work) behind.

``Flights._run`` reads top-down in three steps (``_sync.run_sync`` is its thread twin):

1. **the cache in front** (``_cache.CacheFront``): a hit answers at once;
2. **the flight** (``_oncemap.OnceMap``): the first caller of a key leads, the others follow
   and get the leader's outcome (``_waiters``); a follower elected when the leader gives up
   leads on;
3. **the tier behind** (``Tier.run``), or the work itself: only the leader goes there; its
   value lands in the cache (unless the flight was forgotten meanwhile) and reaches every
   follower, or its error reaches them (never cached).
"""

from __future__ import annotations

import functools
from asyncio.events import _get_running_loop
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar, cast

from ._cache import MISSING, CacheFront
from ._errors import AWAITS, hash_error, is_cancellation, misused_do
from ._observe import note_reelection
from ._oncemap import OnceMap
from ._reentrancy import is_reentrant, reentrancy_error, runs_flight
from ._stale import REFRESHING, StaleFront
from ._types import Codec, Role, Tier, Unshared
from ._waiters import (
    ALONE,
    ERROR,
    LEAD,
    REELECT,
    SIGNAL,
    VALUE,
    Flight,
    _Waiter,
    new_waiter,
    wait_for_outcome,
)

__all__ = ("Flights",)

V = TypeVar("V")


class Flights(Generic[V]):
    """The steps of a Group's flights; ``Group`` holds the state and the public calls."""

    _map: OnceMap[Any, V]
    _flights: dict[Any, Flight]
    _front: CacheFront | StaleFront | None
    _tier: Tier | None
    _codec: Codec[Any] | None
    _cache_if: Callable[[Any], bool] | None
    _reelect: tuple[type[BaseException], ...]
    _reelect_sync: tuple[type[BaseException], ...]
    _leaders: int
    _followers: int
    _cache_hits: int
    _errors: int
    _reelections: int

    @runs_flight
    async def _run(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: Flight | None,
        owned: Flight | None,
        *,
        refresh: bool = False,
    ) -> tuple[V, Role]:
        """The whole of a call: the cache in front, the flight, the tier (or work) behind.

        ``head``: the flight ``setdefault`` already returned (we are not its leader);
        ``owned``: a flight just handed over to us (we lead it); ``refresh``: a background
        refresh of a stale value (it skips the cache in front).
        """
        value: Any
        # 1. The cache in front (a stale value answers at once and starts one refresh).
        front = self._front
        if front is not None and head is None and owned is None and not refresh:
            hit = front.lookup(key)
            if hit is not MISSING:
                self._cache_hits += 1
                if hit[1] == "stale":
                    self._revalidate(key, fn, args, kwargs)
                return cast("tuple[V, Role]", hit)
        # 2. The flight: lead it, or follow it (and maybe be elected to lead it).
        while True:
            if owned is not None:
                flight, owned, lead = owned, None, True
            else:
                entered = self._enter(key, head, new_waiter)
                head = None
                if entered is None:
                    continue  # the flight landed before we could join: start over
                flight, lead, waiter = entered
                if lead and front is not None:
                    value = self._cached_for_leader(key, flight)
                    if value is not MISSING:
                        return value, "cache"
            if lead:
                # 3. The tier behind, or the work itself; then land the value.
                self._leaders += 1
                role: Role = "leader"
                try:
                    if self._tier is None:
                        value = await fn(*args, **kwargs)
                    else:
                        value, role = await self._through_tier(key, fn, args, kwargs)
                except BaseException as exc:
                    told = misused_do(exc, fn)
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

    async def _through_tier(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, Role]:
        """The tier hand-off: the local leader asks the shared tier, which may run ``fn``."""
        assert self._tier is not None
        produce = functools.partial(fn, *args, **kwargs)
        value, role = await self._tier.run(key, produce, self._codec, self._cache_if)
        return value, cast(Role, role)

    # -- stale-while-revalidate ---------------------------------------------------------------

    def _revalidate(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """A stale value was served: start the key's one refresh, in the background.

        On asyncio a task of the caller's loop, on trio a system task of the caller's run;
        a burst of stale callers starts nothing more (``claim_refresh``).
        """
        front = cast(StaleFront, self._front)
        if not front.claim_refresh(key):
            return
        coro = self._refresh(key, fn, args, kwargs)
        loop = _get_running_loop()
        if loop is None:  # trio
            import trio

            trio.lowlevel.spawn_system_task(lambda: coro, name=f"singleflight refresh {key!r:.40}")
            return
        task = loop.create_task(coro, name=f"singleflight refresh {key!r:.40}")
        front.tasks.add(task)
        task.add_done_callback(front.tasks.discard)

    async def _refresh(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[V]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run the key's flight (it stores the new value); an error keeps the stale one."""
        error: BaseException | None = None
        REFRESHING.set(True)  # this task's own context (a copy of its starter's)
        try:
            await self._run(key, fn, args, kwargs, None, None, refresh=True)
        except Exception as exc:  # logged once by refresh_done; callers keep the stale value
            error = exc
        finally:
            cast(StaleFront, self._front).refresh_done(key, error)

    # -- the steps both paths share ----------------------------------------------------------

    def _enter(
        self, key: Hashable, head: Flight | None, make_waiter: Callable[[], Any]
    ) -> tuple[Flight, bool, Any] | None:
        """Lead a new flight of ``key``, or join the one in flight with a new waiter.

        ``head``: what ``setdefault`` already returned, if the caller tried. Returns
        ``(flight, lead, waiter)``, or None if the flight landed before we could join.
        """
        flight: Flight = []
        if head is None:
            try:
                head = self._flights.setdefault(key, flight)
            except TypeError as exc:
                raise hash_error(key, exc) from None
            if head is flight:
                return flight, True, None
        waiter = make_waiter()
        joined, lead = self._map.join(key, head, waiter)
        return None if joined is None else (joined, lead, waiter)

    def _cached_for_leader(self, key: Hashable, flight: Flight) -> Any:
        """A new leader looks again: a flight may have landed (and cached) since we looked."""
        assert self._front is not None
        value = self._front.fresh(key)
        if value is not MISSING:
            self._cache_hits += 1
            self._map.land(key, flight, VALUE, value)
        return value

    def _land_value(
        self, key: Hashable, flight: Flight, value: Any, role: Role
    ) -> tuple[Any, Role]:
        """The leader's work returned: cache it (if allowed) and hand it to the flight."""
        if type(value) is Unshared:
            self._map.land(key, flight, SIGNAL, ALONE)
            return value.value, role
        if role != "stale" and self._front is not None:  # a stale value is never kept longer
            self._front.store(key, flight, value)
        self._map.land(key, flight, VALUE, value)
        return value, role

    def _land_failed(
        self, key: Hashable, flight: Flight, exc: BaseException, *, sync: bool = False
    ) -> None:
        """The leader's run raised: hand the flight over, or share the error.

        Sync work (``sync=True``) runs in a thread, where no loop closes it: a
        ``GeneratorExit`` it raises is its outcome like any other exception, shared once.
        """
        reelect = self._reelect_sync if sync else self._reelect
        # A sync tier marks its own deadline (a wait on another process) for re-election.
        if (
            isinstance(exc, reelect)
            or is_cancellation(exc)
            or getattr(exc, "singleflight_reelect", False)  # sync tier (issue 14)
        ):
            # Its own cancellation or deadline, or its coroutine closed with its loop: not an
            # outcome the followers should see. One of them leads the flight from here.
            self._reelections += 1
            note_reelection(key, exc)
            self._map.handover(key, flight)
        else:
            self._errors += 1
            self._map.land(key, flight, ERROR, exc)

    async def _alone(
        self, fn: Callable[..., Awaitable[V]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> V:
        """The leader's value was not for sharing: run our own work, outside any flight."""
        self._leaders += 1
        value: Any = await fn(*args, **kwargs)
        return value.value if type(value) is Unshared else value  # type: ignore[no-any-return]


AWAITS.add(Flights._run.__code__)  # where our own await meets the work's value
