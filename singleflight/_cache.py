"""The cache in front of a Group's flights: hits, stores that a forget wins over, invalidation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, Final

from ._errors import hash_error
from ._oncemap import OnceMap
from ._waiters import Flight

__all__ = ("MISSING", "CacheFront")

#: What ``CacheFront.get`` returns for a miss.
MISSING: Final = object()


class CacheFront:
    """CacheFront keeps completed values of a Group's flights in a mapping, behind one lock.

    The mapping (e.g. ``cachetools.TTLCache``) is not thread-safe; every access holds the lock.
    ``forget`` marks the key's flight in the map *under that same lock*, and ``store`` checks
    the mark under it, so a flight forgotten while it ran never stores its (stale) value.
    """

    __slots__ = ("cache", "cache_if", "_lock", "_map")

    def __init__(
        self,
        cache: MutableMapping[Any, Any],
        cache_if: Callable[[Any], bool] | None,
        flights: OnceMap[Any, Any],
    ) -> None:
        self.cache = cache
        self.cache_if = cache_if
        self._lock = threading.Lock()
        self._map = flights

    def fresh(self, key: Hashable) -> Any:
        """The cached value of ``key``, or ``MISSING``."""
        try:
            with self._lock:
                return self.cache.get(key, MISSING)
        except TypeError as exc:
            raise hash_error(key, exc) from None

    def lookup(self, key: Hashable) -> Any:
        """``(value, "cache")``, or ``MISSING`` (the shape ``StaleFront.lookup`` returns)."""
        value = self.fresh(key)
        return MISSING if value is MISSING else (value, "cache")

    def close(self) -> None:
        """Nothing runs in the background here."""

    def store(self, key: Hashable, flight: Flight, value: Any) -> None:
        """Keep ``value``, unless ``cache_if`` refuses it or its flight was forgotten."""
        if self.cache_if is None or self.cache_if(value):
            with self._lock:
                if id(flight) not in self._map._next:  # not forgotten (see forget)
                    self.cache[key] = value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key`` outside any flight (``cache_if`` still decides)."""
        if self.cache_if is None or self.cache_if(value):
            with self._lock:
                self.cache[key] = value

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s value; its flight in progress (if any) is forgotten: it never stores."""
        try:
            with self._lock:
                self._map.forget(key)
                self.cache.pop(key, None)
        except TypeError as exc:
            raise hash_error(key, exc) from None

    def clear(self) -> None:
        """Drop every value; every flight in progress is forgotten."""
        with self._lock:
            for key in tuple(self._map._flights):  # one C call: atomic under the GIL
                self._map.forget(key)
            self.cache.clear()
