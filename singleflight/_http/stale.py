"""Stale-while-revalidate for the HTTP adapters: its options, its Group, its refreshes' ends."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

from singleflight._options import check_ttl_options, fail_type
from singleflight._stale import REFRESHING, StaleFront
from singleflight._types import Unshared

from .freshness import Freshness, freshness
from .snapshot import Snapshot

if TYPE_CHECKING:
    from singleflight._group import Group

__all__ = (
    "ERROR_STATUSES",
    "HEADERS",
    "RefreshError",
    "StalePolicy",
    "aclose_refreshes",
    "check_stale",
    "close_refreshes",
    "refreshing",
    "settle_refresh",
    "settle_refresh_sync",
)

_V = TypeVar("_V")

HEADERS: Final = "headers"
"""``ttl="headers"``: each response's own Cache-Control sets its fresh and stale times."""

#: How long closing a transport waits for its refreshes to end (they are cancelled first).
CLOSE_WAIT: Final = 5.0


@final
@dataclass(frozen=True, slots=True)
class StalePolicy:
    """The adapters' stale-while-revalidate options, checked: what their Group is built with.

    ``ttl`` None means ``ttl="headers"``: the times come from each response's Cache-Control
    (``freshness``), capped by ``max_ttl``.
    """

    ttl: float | None
    stale_ttl: float
    max_ttl: float | None

    def ttl_of(self, value: Any) -> Freshness | None:
        """A value's own ``(ttl, stale_ttl)``; None keeps it out (and removes a stale one)."""
        if not (isinstance(value, Snapshot) and value.cacheable):
            return None
        if self.ttl is not None:
            return self.ttl, self.stale_ttl
        return freshness(value.headers, self.max_ttl)

    def group_options(self) -> dict[str, Any]:
        """``Group(**...)``'s ttl cache options (``maxsize`` is the adapter's own)."""
        if self.ttl is not None:
            return {"ttl": self.ttl, "stale_ttl": self.stale_ttl, "ttl_of": self.ttl_of}
        # ttl= is only the Group's default: ttl_of gives every value its own times.
        return {"ttl": self.max_ttl or 1.0, "stale_ttl": 0.0, "ttl_of": self.ttl_of}


def _check_max_ttl(max_ttl: object) -> float:
    if isinstance(max_ttl, bool) or not isinstance(max_ttl, (int, float)):
        raise fail_type("max_ttl", "a number of seconds or None", max_ttl, "pass e.g. max_ttl=300")
    if not (max_ttl > 0 and math.isfinite(max_ttl)):
        raise ValueError(
            f"max_ttl must be > 0 and finite, got {max_ttl!r}; pass max_ttl=None for no cap"
        )
    return float(max_ttl)


def check_stale(
    ttl: object, stale_ttl: object, max_ttl: object, cache: object
) -> tuple[Any, StalePolicy | None]:
    """Check ``ttl``/``stale_ttl``/``max_ttl``: ``(ttl, policy)``; policy None: no stale.

    The ``ttl`` returned is what ``HTTPOptions`` keeps (a number, or None for "headers").
    Plain ``ttl=`` (no ``stale_ttl``) is left to ``HTTPOptions`` as before.
    """
    if isinstance(ttl, str):
        if ttl != HEADERS:
            raise fail_type(
                "ttl",
                'a number of seconds, "headers" or None',
                ttl,
                'pass e.g. ttl=5.0, or ttl="headers" to follow each response\'s Cache-Control',
            )
        if stale_ttl is not None:
            raise ValueError(
                'with ttl="headers" the stale window comes from Cache-Control '
                "(stale-while-revalidate, stale-if-error): drop stale_ttl= (cap it with max_ttl=)"
            )
        if cache is not None:
            raise ValueError('pass either cache= or ttl="headers", not both')
        cap = None if max_ttl is None else _check_max_ttl(max_ttl)
        return None, StalePolicy(None, 0.0, cap)
    if max_ttl is not None:
        raise ValueError(
            f'max_ttl= caps the times read from Cache-Control, so it needs ttl="headers" '
            f"(got ttl={ttl!r}); with a number, ttl= is the time itself: drop max_ttl="
        )
    if stale_ttl is None:
        return ttl, None
    times = check_ttl_options(ttl, stale_ttl, None, None, cache)
    assert times is not None  # check_ttl_options raised without ttl=
    return times[0], StalePolicy(times[0], times[1], None)


def refreshing() -> bool:
    """True inside a background refresh: no caller waits for this value."""
    return REFRESHING.get()


#: What RFC 5861 counts as an error for stale-if-error: a refresh answered with one of these
#: keeps the stale response (until its window ends) instead of replacing or removing it.
ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})


class RefreshError(Exception):
    """A refresh's upstream answered with an error status: the stale response is kept.

    ``snapshot`` is that response: a caller that joined the refresh's flight (its stale
    window over) gets it as it would from any flight.
    """

    def __init__(self, message: str, snapshot: Snapshot) -> None:
        super().__init__(message)
        self.snapshot = snapshot


def _judge(group: Group[Any], key: Hashable, value: object, status: int) -> Any:
    """What to do with a refresh's value: returns the live response to close, or None.

    An error status (5xx) raises ``RefreshError``; a response that may not be shared (an
    error status too) removes the key's stale entry.
    """
    live = value.value if type(value) is Unshared else None
    if status in ERROR_STATUSES and isinstance(value, Snapshot):
        return None, RefreshError(f"the refresh was answered {status}", value)
    if live is not None:
        group.forget(key)  # neither the old response nor this one may answer the next caller
    return live, None


async def settle_refresh(
    group: Group[Any],
    key: Hashable,
    value: _V,
    status: int,
    close: Callable[[Any], Awaitable[Any]],
) -> _V:
    """A refresh landed ``value`` (its response's ``status``): an unshareable response is
    closed (nobody reads it) and removes the stale entry; an error status (5xx) raises
    ``RefreshError``, so the stale response is kept (stale-if-error). Returns ``value``."""
    live, error = _judge(group, key, value, status)
    if live is not None:
        await close(live)
    if error is not None:
        raise error
    return value


def settle_refresh_sync(
    group: Group[Any], key: Hashable, value: _V, status: int, close: Callable[[Any], Any]
) -> _V:
    """``settle_refresh`` for sync work (a refresh worker thread)."""
    live, error = _judge(group, key, value, status)
    if live is not None:
        close(live)
    if error is not None:
        raise error
    return value


async def aclose_refreshes(group: Group[Any]) -> None:
    """Cancel the Group's refresh tasks and wait (bounded) for those of this loop to end."""
    front = group._front
    if not isinstance(front, StaleFront):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: its refreshes are system tasks, ended with its run
        loop = None
    mine = [t for t in front.tasks if t.get_loop() is loop]
    group.close()
    for task in mine:
        task.cancel()  # at once: close() schedules it for the next turn of the loop
    if mine:
        await asyncio.wait(mine, timeout=CLOSE_WAIT)


def close_refreshes(group: Group[Any]) -> None:
    """Close the Group's refresh threads: queued refreshes are dropped, and a thread running
    one ends with it (bounded by that request's own timeouts: a socket closed under a
    blocked read does not wake it). They are daemon threads: none keeps the process alive."""
    if isinstance(group._front, StaleFront):
        group.close()
