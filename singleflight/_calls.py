"""How a decorated call reaches its flight: the key, then the Group, with no frame to spare."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from ._errors import AWAITS, hash_error, misused_do
from ._group import Group
from ._keys import unhashable_error
from ._reentrancy import runs_flight
from ._types import Unshared
from ._waiters import ALONE, SIGNAL, VALUE

if TYPE_CHECKING:
    from ._decorator import Singleflight

__all__ = ("async_caller", "caller")


def caller(sf: Singleflight[Any, Any], fn: Callable[..., Any], group: Group[Any]) -> Any:
    """The function a call of ``sf`` runs: the key, then the Group's ``do`` or ``do_sync``.

    A closure over everything it needs (no attribute look-ups), called straight from C by
    ``functools.partial``: the decorator's whole cost on top of the Group is this function.
    """
    flights = group._flights
    make_key = sf._make_key
    plain = sf._plain
    qualname = sf._qualname

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if plain and not kwargs:
            try:
                hash(args)  # the args tuple is the key: equal to hashkey(*args)
            except TypeError:
                raise unhashable_error(fn, args, kwargs) from None
            return args
        return make_key(args, kwargs)

    if sf._is_async:
        return async_caller(sf, fn, group, make_key, plain, qualname)
    do_sync = group.do_sync

    def call_sync(*args: Any, **kwargs: Any) -> Any:
        k = key_of(args, kwargs)
        if flights and not sf._warned and k not in flights:
            sf._check_identity(args, kwargs)
        return do_sync(k, fn, *args, **kwargs) if kwargs else do_sync(k, fn, *args)

    return call_sync


def async_caller(
    sf: Singleflight[Any, Any],
    fn: Callable[..., Any],
    group: Group[Any],
    make_key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable],
    plain: bool,
    qualname: str,
) -> Any:
    """The function a call of an async ``sf`` runs: the key (its errors at call time), then a
    coroutine of ``flight_of``: ``Group.do``'s fast path over closure cells, no bound method,
    no re-packing, named after the user's function once here instead of once per call. Keep
    the leader's branch in step with ``Group.do``'s: the decorator's tests run through it."""
    flights = group._flights
    onmap = group._map
    fast = group._plain  # no cache, no tier: fixed at the Group's construction
    run = group._run
    follow = group._follow

    def call_async(*args: Any, **kwargs: Any) -> Any:
        if plain and not kwargs:
            try:
                hash(args)  # the args tuple is the key: equal to hashkey(*args)
            except TypeError:
                raise unhashable_error(fn, args, kwargs) from None
            k: Hashable = args
        else:
            k = make_key(args, kwargs)
        if flights and not sf._warned and k not in flights:
            sf._check_identity(args, kwargs)  # it leads while another flight is on
        return flight_of(k, args, kwargs)  # errors above: at call time, before any coroutine

    async def flight_of(k: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not fast:
            return (await run(k, fn, args, kwargs, None, None))[0]
        flight: list[Any] = []
        try:
            head = flights.setdefault(k, flight)
        except TypeError as exc:  # hashed already: an __eq__ that raises TypeError
            raise hash_error(k, exc) from None
        if head is flight:  # we lead: a copy of Group.do's leader branch
            group._leaders += 1
            try:
                value = await (fn(*args, **kwargs) if kwargs else fn(*args))
            except BaseException as exc:
                told = misused_do(exc, fn)
                group._land_failed(k, flight, told)
                if told is not exc:
                    raise told from None
                raise
            if type(value) is Unshared:
                onmap.land(k, flight, SIGNAL, ALONE)
                return value.value
            if not flight:
                del flights[k]  # remove first, then look again (see _oncemap)
                if not flight:
                    return value
                onmap._land_locked(k, flight, VALUE, value, removed=True)
            else:
                onmap._land_locked(k, flight, VALUE, value, removed=False)
            return value
        del flight  # a follower's wait keeps this frame alive: not this empty list too
        return await follow(k, fn, args, kwargs, head)

    # Python's "coroutine ... was never awaited" (and tracebacks) name the user's function.
    flight_of.__qualname__ = qualname
    runs_flight(flight_of)  # its local ``flight`` is the flight it leads (re-entrancy)
    AWAITS.add(flight_of.__code__)  # where our own await meets fn's value (misused_do)
    return call_async
