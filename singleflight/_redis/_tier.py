"""RedisTier: one flight per key across every process that shares a Redis, plus a shared cache.

Order of a call (see docs/redis.md): the Group's L1 cache and local flight come first; only the
local leader of a key calls ``RedisTier.run`` (async) or ``run_sync`` (threads). Both run the
same protocol steps (``_protocol``) with their own I/O (``_aio``, ``_threads``): one LOOKUP
round trip returns a fresh shared value, a stale one (serve it; maybe refresh it), the lease
(lead) or the holder's token (follow). A leader renews its lease, calls ``produce()`` and
FINISHes: store, drop the lease if still ours, publish. A follower subscribes, waits for the
ack, re-CHECKs, then waits for a message or its poll interval, and takes over when the lease
is gone without a result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import redis
import redis.asyncio as aioredis

from .._group import Codec
from ._aio import AsyncIO
from ._core import Core, RedisTierStats, Settings
from ._threads import Threads

__all__ = ("RedisTier", "RedisTierStats")

_ASYNC_CLIENTS = (aioredis.Redis, aioredis.RedisCluster)
_SYNC_CLIENTS = (redis.Redis, redis.RedisCluster)
_CLUSTERS = (aioredis.RedisCluster, redis.RedisCluster)


class RedisTier:
    """RedisTier makes one upstream call per key for a whole fleet of processes sharing a Redis.

    Sync or async by its client: with a ``redis.asyncio.Redis`` (or ``RedisCluster``) pass it
    to ``Group(tier=...)``, ``@singleflight(tier=...)`` on an async function,
    ``AsyncSingleflightTransport(tier=...)`` or ``SingleflightMiddleware(tier=...)``; with a
    ``redis.Redis`` (or ``RedisCluster``) to ``Group(tier=...).do_sync``,
    ``@singleflight(tier=...)`` on a plain function or ``SingleflightTransport(tier=...)``.
    Both kinds share flights and values. In each process only the local leader of a key talks
    to Redis; across processes one holds the key's lease and calls upstream, the others wait
    for its result (pub/sub, with polling as the safety net) or take over when it dies. Results
    the caller allows to be cached are kept for ``ttl`` seconds (then served stale for
    ``stale_ttl`` more while one process refreshes them). If Redis fails, calls fall back to
    local coalescing (one warning, then Redis is retried after a back-off).

    Args:
        client: ``redis.asyncio.Redis``, ``redis.asyncio.RedisCluster``, ``redis.Redis`` or
            ``redis.RedisCluster``, with ``decode_responses=False`` (the default). The tier
            never closes it; an async tier belongs to the client's event loop.
        namespace: prefix of every Redis name; processes share flights only within one.
        ttl: seconds a cacheable value stays fresh in Redis; None shares flights only.
        stale_ttl: seconds a value is served stale after ``ttl`` while one refresh runs.
        lease_ttl: seconds a dead leader blocks its key at most (renewed every lease_ttl/3).
        poll: (first, max) seconds between a follower's re-checks (doubling, ±20 % jitter).
        timeout: seconds for each Redis command (async) and for waiting for a pooled
            connection (both) before Redis counts as down; None: no limit.
        fail_open: True: coalesce locally when Redis fails; False: raise Redis's error.
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "sf",
        ttl: float | None = 30.0,
        stale_ttl: float = 0.0,
        lease_ttl: float = 10.0,
        poll: tuple[float, float] = (0.05, 1.0),
        timeout: float | None = 2.0,
        fail_open: bool = True,
    ) -> None:
        is_async = isinstance(client, _ASYNC_CLIENTS)
        if not is_async and not isinstance(client, _SYNC_CLIENTS):
            raise TypeError(
                f"client must be a redis-py client, got {type(client).__module__}."
                f"{type(client).__qualname__}; pass redis.asyncio.Redis(...) for async code, "
                "redis.Redis(...) for threads (or the RedisCluster of either)"
            )
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "client has decode_responses=True, but the tier stores raw bytes; "
                "give the tier a client created with decode_responses=False (the default)"
            )
        settings = Settings.check(namespace, ttl, stale_ttl, lease_ttl, poll, timeout, fail_open)
        self._core = Core(settings, cluster=isinstance(client, _CLUSTERS))
        self._client = client
        self._async = is_async
        self._io: AsyncIO | Threads = (AsyncIO if is_async else Threads)(self._core, client)

    def __repr__(self) -> str:
        s = self._core.settings
        return (
            f"RedisTier(namespace={s.namespace!r}, ttl={s.ttl!r}, "
            f"stale_ttl={s.stale_ttl!r}, lease_ttl={s.lease_ttl!r})"
        )

    @property
    def namespace(self) -> str:
        return self._core.settings.namespace

    @property
    def is_async(self) -> bool:
        """True for a ``redis.asyncio`` client (async work), False for a sync one (threads)."""
        return self._async

    @property
    def stats(self) -> RedisTierStats:
        """A snapshot of this process's counters."""
        return self._core.stats()

    def require(self, is_async: bool, user: str) -> None:
        """require raises TypeError unless this tier's client suits ``user``'s kind of work."""
        if is_async == self._async:
            return
        if is_async:
            raise TypeError(
                f"{user} runs async work, but this RedisTier has a sync client "
                f"({type(self._client).__name__}); give it a redis.asyncio.Redis(...) "
                "(or redis.asyncio.RedisCluster(...))"
            )
        raise TypeError(
            f"{user} runs sync work, but this RedisTier has an async client "
            f"(redis.asyncio.{type(self._client).__name__}); give it a redis.Redis(...) "
            "(or redis.RedisCluster(...))"
        )

    # -- the Tier protocol ------------------------------------------------------------------

    async def run(
        self,
        key: Hashable,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]:
        """run serves one local leader's async call: from Redis, another process, or produce().

        Returns ``(value, role)`` with role ``"shared"`` (fresh value from Redis), ``"stale"``,
        ``"remote"`` (another process's flight) or ``"leader"`` (``produce()`` ran here). An
        ``Unshared`` value from ``produce()`` is returned as is and never stored.
        """
        io = self._io
        if not isinstance(io, AsyncIO):
            self.require(True, "await Group.do()")
            raise AssertionError  # require raised
        return await io.run(key, produce, codec, cacheable)

    def run_sync(
        self,
        key: Hashable,
        produce: Callable[[], Any],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
        wait: float | None = None,
    ) -> tuple[Any, str]:
        """run_sync is ``run`` for a thread (a sync client): blocks until the value is there.

        ``wait``: the caller's budget for waiting on another process's flight (its read
        timeout); then ``FleetWaitTimeout``, which the Group answers by re-electing a local
        follower (with its own budget), as a cancelled async leader is.
        """
        io = self._io
        if not isinstance(io, Threads):
            self.require(False, "Group.do_sync()")
            raise AssertionError  # require raised
        return io.run(key, produce, codec, cacheable, wait)

    # -- lifecycle --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """aclose stops renewals and refreshes, releases held leases and unsubscribes.

        The Redis client stays open: it belongs to the caller. (A sync tier: ``close()``.)
        """
        if isinstance(self._io, AsyncIO):
            await self._io.aclose()
        else:
            self._io.close()

    def close(self) -> None:
        """close is ``aclose`` for a sync tier: joins its threads (bounded) and unsubscribes."""
        if isinstance(self._io, Threads):
            self._io.close()
        else:
            self.require(False, "RedisTier.close()")

    async def __aenter__(self) -> RedisTier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> RedisTier:
        self.require(False, "with RedisTier(...)")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
