"""Invalidation: a write drops the group's cached GET/HEAD responses of the URLs it changed.

The rule (which URLs a write changes) is ``rules.invalidated_urls``; this module applies it to
a Group shared by any number of adapters. Cached entries are found by their ``RequestKey``'s
method and URL (a custom ``key=`` names no URL: such entries expire by their TTL only). A GET
flight that is still running when the write lands was sent before it: its callers get its
response, but it is never stored (``Flights.start`` hands the leader a ticket the write marks).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Iterable
from typing import Any, final

from .key import RequestKey

__all__ = ("Flights", "Ticket", "flights_of", "invalidate")

_READS = ("GET", "HEAD")


@final
class Ticket:
    """A leader's flight of a URL; ``stale`` once a write to that URL landed meanwhile."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


@final
class Flights:
    """The GET/HEAD flights of one Group by URL, so that a write can mark them stale."""

    __slots__ = ("__weakref__", "_by_url", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, set[Ticket]] = {}

    def start(self, key: Hashable) -> Ticket | None:
        """A leader starts a flight of ``key``: its ticket, or None if no write can find it."""
        if not isinstance(key, RequestKey) or key.method not in _READS:
            return None
        ticket = Ticket()
        with self._lock:
            self._by_url.setdefault(key.url, set()).add(ticket)
        return ticket

    def end(self, key: Hashable, ticket: Ticket | None) -> None:
        """The flight of ``key`` landed (or failed): forget its ticket."""
        if ticket is None:
            return
        url = key.url  # type: ignore[attr-defined]  # start() handed tickets to RequestKeys only
        with self._lock:
            tickets = self._by_url.get(url)
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self._by_url[url]

    def mark(self, urls: Iterable[str]) -> None:
        with self._lock:
            for url in urls:
                for ticket in self._by_url.get(url, ()):
                    ticket.stale = True


_FLIGHTS: weakref.WeakKeyDictionary[Any, Flights] = weakref.WeakKeyDictionary()
_FLIGHTS_LOCK = threading.Lock()


def flights_of(group: Any) -> Flights:
    """The Flights of ``group``, shared by every adapter on it (made on first use)."""
    flights = _FLIGHTS.get(group)
    if flights is None:
        with _FLIGHTS_LOCK:
            flights = _FLIGHTS.setdefault(group, Flights())
    return flights


def invalidate(group: Any, urls: tuple[str, ...]) -> int:
    """Drop ``group``'s cached GET/HEAD responses for ``urls``; mark their flights stale.

    Returns how many cache entries were dropped. Safe from any thread: the keys are listed
    first (again if another thread changed the cache meanwhile), then each is popped under the
    Group's own lock (``cache_pop``).
    """
    if not urls:
        return 0
    flights_of(group).mark(urls)
    cache = group.cache
    if cache is None:
        return 0
    wanted = set(urls)
    for _attempt in range(100):
        try:
            keys = list(cache)
            break
        except RuntimeError:  # changed size during iteration: another thread stored or expired
            continue
    else:  # pragma: no cover - a cache written in a tight loop by other threads
        keys = []
    dropped = 0
    for key in keys:
        if isinstance(key, RequestKey) and key.method in _READS and key.url in wanted:
            group.cache_pop(key)
            dropped += 1
    return dropped
