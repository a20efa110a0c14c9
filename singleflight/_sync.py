"""The life of a call for sync work, in threads: the thread twin of ``Flights._run``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from types import CoroutineType
from typing import TYPE_CHECKING, Any, cast

from ._cache import MISSING
from ._reentrancy import SYNC_LEADERS, is_reentrant, reentrancy_error, runs_flight
from ._stale import REFRESHING
from ._types import Role, Unshared
from ._waiters import ALONE, LEAD, REELECT, Flight, _ThreadWaiter

if TYPE_CHECKING:
    from ._group import Group

__all__ = ("run_sync",)


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _use_do(fn: object, value: Any) -> TypeError:
    """``do_sync`` was given async work: close its coroutine and say which method to use."""
    value.close()  # never awaited: no RuntimeWarning later
    return TypeError(
        f"Group.do_sync runs sync work, but {_name(fn)} is async (it returned a coroutine); "
        f"use await group.do(key, {_name(fn)}, ...) for async functions"
    )


@runs_flight
def run_sync(
    group: Group[Any],
    key: Hashable,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None = None,
    *,
    refresh: bool = False,
) -> tuple[Any, Role]:
    """The whole of a sync call, in three steps as in ``Flights._run``: the cache in front,
    the flight (lead it, or block until it lands), the work behind. ``timeout`` bounds a
    follower's wait (``TimeoutError``; the flight goes on without it); ``refresh``: a
    background refresh of a stale value (it skips the cache in front)."""
    # 1. The cache in front (a stale value answers at once and starts one refresh).
    front = group._front
    if front is not None and not refresh:
        hit = front.lookup(key)
        if hit is not MISSING:
            group._cache_hits += 1
            if hit[1] == "stale" and front.claim_refresh(key):  # type: ignore[union-attr]
                front.submit(_refresh_sync, group, key, fn, args, kwargs)  # type: ignore[union-attr]
            return cast("tuple[Any, Role]", hit)
    # 2. The flight.
    owned: Flight | None = None
    while True:
        if owned is not None:
            flight, owned, lead = owned, None, True
        else:
            entered = group._enter(key, None, _ThreadWaiter)
            if entered is None:
                continue  # the flight landed before we could join: start over
            flight, lead, waiter = entered
            if lead and front is not None:
                value = group._cached_for_leader(key, flight)
                if value is not MISSING:
                    return value, "cache"
        if lead:
            # 3. The work behind.
            group._leaders += 1
            value, role = _lead_sync(group, key, flight, fn, args, kwargs, timeout)
            return group._land_value(key, flight, value, role)
        if is_reentrant(flight, whole_stack=True):
            group._map.leave(flight, waiter)
            raise reentrancy_error(key)
        group._followers += 1
        value = _follow_sync(group, key, flight, waiter, timeout)
        if value is REELECT:
            group._followers -= 1
            continue
        if value is LEAD:
            group._followers -= 1
            owned = flight
            continue
        if value is ALONE:
            group._followers -= 1
            group._leaders += 1
            value = fn(*args, **kwargs)
            return (value.value if type(value) is Unshared else value), "leader"
        return value, "follower"


def _refresh_sync(
    group: Group[Any],
    key: Hashable,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """On a refresh worker thread: run the key's flight; an error keeps the stale value."""
    error: BaseException | None = None
    token = REFRESHING.set(True)  # the worker thread's context: reset below
    try:
        run_sync(group, key, fn, args, kwargs, refresh=True)
    except Exception as exc:  # logged once by refresh_done; callers keep the stale value
        error = exc
    finally:
        REFRESHING.reset(token)
        front = group._front
        if front is not None:
            front.refresh_done(key, error)  # type: ignore[union-attr]


def _lead_sync(
    group: Group[Any],
    key: Hashable,
    flight: Flight,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None = None,
) -> tuple[Any, Role]:
    """Run the work for ``flight`` (through the sync tier, if any: it may answer for another
    process's flight within ``timeout``); if it raises, hand the flight over or share the error."""
    SYNC_LEADERS[0] += 1
    try:
        tier = group._tier
        if tier is None:
            value, role = fn(*args, **kwargs), "leader"
        else:  # sync tier (issue 14)
            produce = functools.partial(fn, *args, **kwargs)
            value, role = tier.run_sync(key, produce, group._codec, group._cache_if, timeout)
        if type(value) is CoroutineType:
            raise _use_do(fn, value)
        return value, cast(Role, role)
    except BaseException as exc:
        group._land_failed(key, flight, exc, sync=True)
        raise
    finally:
        SYNC_LEADERS[0] -= 1


def _follow_sync(
    group: Group[Any], key: Hashable, flight: Flight, waiter: _ThreadWaiter, timeout: float | None
) -> Any:
    """Block until ``flight`` lands (or ``timeout``); return its outcome or signal."""
    try:
        got = waiter.lock.acquire(timeout=-1 if timeout is None else timeout)
    except BaseException:  # e.g. KeyboardInterrupt while blocked
        if not group._map.leave(flight, waiter):
            group._map.resign(key, flight, waiter.payload)
        raise
    if not got:
        if group._map.leave(flight, waiter):
            raise TimeoutError(
                f"waited {timeout} s for the flight of {key!r}; it goes on without us"
            )
        waiter.lock.acquire()  # an outcome is on its way: released right after
    return waiter.outcome()
