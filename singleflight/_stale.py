"""Stale-while-revalidate: a ttl cache whose expired values are served while one refresh runs."""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from contextvars import ContextVar
from typing import Any, Final

from ._cache import MISSING
from ._errors import hash_error
from ._observe import logger
from ._oncemap import OnceMap
from ._waiters import Flight

__all__ = ("REFRESHING", "REFRESH_THREADS", "StaleFront", "TtlOf")

#: The most worker threads one Group uses for background refreshes of sync work.
REFRESH_THREADS: Final = 4

#: True while a background refresh runs the work (its task's or thread's own context): the
#: work can tell that no caller waits for its value (the HTTP adapters close what they
#: cannot store).
REFRESHING: ContextVar[bool] = ContextVar("singleflight_refreshing", default=False)

#: Per-value times: ``ttl_of(value) -> (ttl, stale_ttl)``, or None to keep the value out.
TtlOf = Callable[[Any], "tuple[float, float] | None"]


class _Entry:
    __slots__ = ("fresh_until", "stale_until", "value")

    def __init__(self, value: Any, fresh_until: float, stale_until: float) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.stale_until = stale_until


_JOIN_BOUND: Final = 1.0  # seconds close() waits, in all, for its idle refresh threads to end


class _RefreshThreads:
    """At most ``n`` daemon threads named ``singleflight-refresh-<i>``, fed by one queue.

    Daemon threads: a refresh stuck upstream must never keep the process from exiting (its
    value was only ever going to the cache). ``close`` drops the queued jobs and lets each
    thread end after the job it is running.
    """

    def __init__(self, n: int) -> None:
        self._n = n
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a job (the caller holds the front's lock); start a thread if one is missing."""
        self._jobs.put((fn, args))
        self._threads = [t for t in self._threads if t.is_alive()]
        if len(self._threads) < self._n:
            name = f"singleflight-refresh-{len(self._threads)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException:  # the job reports its own errors (refresh_done)
                pass

    def close(self) -> None:
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(None)
        # An idle thread takes its None and ends at once: wait for those, bounded, so a closed
        # transport leaves no thread behind. One running a refresh ends after it (its request's
        # own timeouts bound that); it is a daemon thread, so it never holds the process.
        deadline = time.monotonic() + _JOIN_BOUND
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))


class StaleFront(MutableMapping[Any, Any]):
    """StaleFront is a Group's ttl cache, with a stale window and one refresh per key.

    A value stored at time t is *fresh* until ``t + ttl`` (served with role ``"cache"``),
    then *stale* until ``t + ttl + stale_ttl`` (served at once with role ``"stale"``, while the
    Group refreshes it in the background: ``claim_refresh`` lets exactly one refresh per key
    run, and after a failed one waits ``backoff`` seconds before the next), then gone.
    ``ttl_of(value)`` may give each value its own ``(ttl, stale_ttl)``, or None to keep it out
    (a refresh judged uncacheable removes the entry). At most ``maxsize`` entries (LRU).

    Like ``CacheFront``, every access holds one lock, and ``forget`` marks the key's flight
    under it: a flight (or refresh) forgotten while it ran never stores its value.
    """

    def __init__(
        self,
        ttl: float,
        stale_ttl: float,
        maxsize: int,
        cache_if: Callable[[Any], bool] | None,
        ttl_of: TtlOf | None,
        flights: OnceMap[Any, Any],
    ) -> None:
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.maxsize = maxsize
        self.cache_if = cache_if
        self.ttl_of = ttl_of
        self.backoff = min(1.0, stale_ttl / 4) if stale_ttl else 1.0
        self._timer: Callable[[], float] = time.monotonic
        self._entries: OrderedDict[Any, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._map = flights
        self._refreshing: set[Any] = set()  # keys whose refresh runs now
        self._retry_at: dict[Any, float] = {}  # key -> no new refresh before (after a failure)
        self._workers: _RefreshThreads | None = None
        self.tasks: set[Any] = set()  # refresh tasks running on event loops

    @property
    def cache(self) -> StaleFront:
        """The mapping view of the values (fresh or stale), for ``Group.cache``."""
        return self

    # -- what a call sees ------------------------------------------------------------------

    def lookup(self, key: Hashable) -> Any:
        """``(value, "cache")`` if fresh, ``(value, "stale")`` in the stale window, or MISSING."""
        try:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    return MISSING
                now = self._timer()
                if now < entry.fresh_until:
                    self._entries.move_to_end(key)
                    return entry.value, "cache"
                if now < entry.stale_until:
                    return entry.value, "stale"
                del self._entries[key]
                return MISSING
        except TypeError as exc:
            raise hash_error(key, exc) from None

    def fresh(self, key: Hashable) -> Any:
        """The fresh value of ``key``, or MISSING (a new leader looks again before it runs)."""
        hit = self.lookup(key)
        return hit[0] if hit is not MISSING and hit[1] == "cache" else MISSING

    def store(self, key: Hashable, flight: Flight, value: Any) -> None:
        """Keep ``value`` for its ttl; a value kept out removes the key's (stale) entry."""
        times = self._times(value)
        with self._lock:
            if id(flight) in self._map._next:  # forgotten while it ran: never stored
                return
            if times is None:
                self._entries.pop(key, None)
                return
            now = self._timer()
            ttl, stale_ttl = times
            self._entries[key] = _Entry(value, now + ttl, now + ttl + stale_ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key`` outside any flight (``cache_if``/``ttl_of`` still decide)."""
        times = self._times(value)
        if times is None:
            return
        with self._lock:
            now = self._timer()
            self._entries[key] = _Entry(value, now + times[0], now + sum(times))
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def _times(self, value: Any) -> tuple[float, float] | None:
        if self.cache_if is not None and not self.cache_if(value):
            return None
        if self.ttl_of is None:
            return self.ttl, self.stale_ttl
        times = self.ttl_of(value)
        if times is None:
            return None
        ttl, stale_ttl = times
        if not (ttl >= 0 and stale_ttl >= 0):
            raise ValueError(f"ttl_of returned {times!r}; it must return (ttl, stale_ttl) >= 0")
        return float(ttl), float(stale_ttl)

    # -- invalidation ----------------------------------------------------------------------

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s value; its flight or refresh in progress will not store its own."""
        try:
            with self._lock:
                self._map.forget(key)
                self._entries.pop(key, None)
                self._retry_at.pop(key, None)
        except TypeError as exc:
            raise hash_error(key, exc) from None

    def clear(self) -> None:
        """Drop every value, forget every flight in progress, close the refresh threads."""
        with self._lock:
            for key in tuple(self._map._flights):  # one C call: atomic under the GIL
                self._map.forget(key)
            self._entries.clear()
            self._retry_at.clear()
        self._close_threads()

    # -- the refresh bookkeeping -----------------------------------------------------------

    def claim_refresh(self, key: Hashable) -> bool:
        """True for exactly one caller per stale key: it starts the refresh."""
        with self._lock:
            if key in self._refreshing or self._retry_at.get(key, -1.0) > self._timer():
                return False
            self._refreshing.add(key)
            return True

    def refresh_done(self, key: Hashable, error: BaseException | None) -> None:
        """A refresh ended; after an error no new one starts for ``backoff`` seconds."""
        with self._lock:
            self._refreshing.discard(key)
            if error is None:
                self._retry_at.pop(key, None)
                return
            first = key not in self._retry_at
            self._retry_at[key] = self._timer() + self.backoff
        if first:  # logged once per run of failures, not once per retry
            logger.warning(
                "refresh of %r failed (%s: %s); serving its stale value until it expires",
                key,
                type(error).__name__,
                error,
            )

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a sync refresh on one of ``REFRESH_THREADS`` named daemon worker threads."""
        with self._lock:
            if self._workers is None:
                self._workers = _RefreshThreads(REFRESH_THREADS)
            self._workers.submit(fn, *args)

    def close(self) -> None:
        """Cancel the refresh tasks and close the refresh threads (each ends after its job)."""
        for task in list(self.tasks):
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop is closed: the task is gone with it
                self.tasks.discard(task)
        self._close_threads()

    def _close_threads(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, None
            # Refreshes still queued are dropped below and never report back: let the
            # next stale caller start a new one (a running one was forgotten by clear()).
            self._refreshing.clear()
        if workers is not None:
            workers.close()

    # -- the mapping view (Group.cache) ----------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        hit = self.lookup(key)
        if hit is MISSING:
            raise KeyError(key)
        return hit[0]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.store(key, [], value)

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            del self._entries[key]

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
