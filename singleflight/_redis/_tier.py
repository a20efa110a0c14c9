"""RedisTier: one flight per key across every process that shares a Redis, plus a shared cache.

Order of a call (see docs/redis.md): the Group's L1 cache and local flight come first; only the
local leader of a key calls ``RedisTier.run``. ``run`` makes one LOOKUP round trip, which
returns a fresh shared value, a stale one (serve it; maybe refresh it), the lease (lead), or the
holder's token (follow). A leader renews its lease, calls ``produce()`` and FINISHes: store,
drop the lease if still ours, PUBLISH. A follower subscribes, waits for the ack, re-CHECKs, then
waits for a message or its poll interval, whichever comes first, and takes over when the
lease is gone without a result.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .._group import Codec, Unshared
from . import _scripts
from ._format import DEFAULT_CODEC, BadRecord, Keys, decode_record, encode_record, key_digest
from ._pubsub import Subscriptions

__all__ = ("RedisTier", "RedisTierStats")

log = logging.getLogger("singleflight.redis")
T = TypeVar("T")

# Errors that mean "Redis is unreachable or misbehaving", never "the user's work failed".
_REDIS_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)
_RETRY_MIN: Final = 1.0  # seconds without Redis after a failure; doubles while it keeps failing
_RETRY_MAX: Final = 30.0


class _RedisDown(Exception):
    """Internal: a Redis call failed (the cause is the library's error)."""


class _Outcome:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_RETRY: Final = _Outcome("retry")  # the holder is gone or abandoned: run LOOKUP again
_ERR: Final = _Outcome("err")  # the holder's work raised
_ALONE: Final = _Outcome("alone")  # nothing to share: make your own call, outside the fleet


@final
@dataclass(frozen=True, slots=True)
class RedisTierStats:
    """A snapshot of a RedisTier's counters (this process only).

    ``shared_hits``: served from the shared cache. ``stale_served``: served a stale value.
    ``refreshes``: stale-while-revalidate refreshes this process ran. ``fleet_leads``: flights
    this process led (called upstream for the fleet). ``remote_follows``: calls served by, or
    waiting on, another process's flight. ``takeovers``: a follower took over a dead or
    abandoned leader's lease. ``lease_lost``: a lease expired under a slow leader. ``redis_errors``:
    failed Redis calls. ``fallbacks``: calls served without Redis (local coalescing only).
    """

    shared_hits: int
    stale_served: int
    refreshes: int
    fleet_leads: int
    remote_follows: int
    takeovers: int
    lease_lost: int
    redis_errors: int
    fallbacks: int


@final
@dataclass(slots=True)
class _Lease:
    keys: Keys
    token: str
    lost: bool = False  # set once the lease is known to have expired under us


@final
@dataclass(slots=True)
class _Orphan:
    lease: _Lease
    handle: asyncio.TimerHandle


@final
@dataclass(frozen=True, slots=True)
class _Got:
    value: Any


def _number(name: str, value: object, *, minimum: float, fix: str, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}; {fix}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum:g}, got {value!r}; {fix}")
    return float(value)


class RedisTier:
    """RedisTier makes one upstream call per key for a whole fleet of processes sharing a Redis.

    Pass it to ``Group(tier=...)``, ``AsyncSingleflightTransport(tier=...)`` or
    ``SingleflightMiddleware(tier=...)``. In each process only the local leader of a key talks
    to Redis; across processes one holds the key's lease and calls upstream, the others wait
    for its result (pub/sub, with polling as the safety net) or take over when it dies. Results
    the caller allows to be cached are kept for ``ttl`` seconds (then served stale for
    ``stale_ttl`` more while one process refreshes them). If Redis fails, calls fall back to
    local coalescing (one warning, then Redis is retried after a back-off).

    Args:
        client: a ``redis.asyncio.Redis`` with ``decode_responses=False`` (the default). The
            tier never closes it; use one tier per event loop, like the client.
        namespace: prefix of every Redis name; processes share flights only within one.
        ttl: seconds a cacheable value stays fresh in Redis; None shares flights only.
        stale_ttl: seconds a value is served stale after ``ttl`` while one refresh runs.
        lease_ttl: seconds a dead leader blocks its key at most (renewed every lease_ttl/3).
        poll: (first, max) seconds between a follower's re-checks (doubling, ±20 % jitter).
        timeout: seconds for each Redis command before Redis counts as down; None: no limit.
        fail_open: True: coalesce locally when Redis fails; False: raise Redis's error.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = "sf",
        ttl: float | None = 30.0,
        stale_ttl: float = 0.0,
        lease_ttl: float = 10.0,
        poll: tuple[float, float] = (0.05, 1.0),
        timeout: float | None = 2.0,
        fail_open: bool = True,
    ) -> None:
        if not isinstance(client, aioredis.Redis):
            raise TypeError(
                f"client must be a redis.asyncio.Redis, got {type(client).__module__}."
                f"{type(client).__qualname__}; create it with redis.asyncio.Redis(...) or "
                "redis.asyncio.from_url(...)"
            )
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                "client has decode_responses=True, but the tier stores raw bytes; "
                "give the tier a client created with decode_responses=False (the default)"
            )
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(
                f"namespace must be a non-empty str without braces, got {namespace!r}; "
                'braces would break the Redis Cluster hash tag, e.g. namespace="sf"'
            )
        self._ttl = None
        if ttl is not None:
            self._ttl = _number(
                "ttl", ttl, minimum=0, fix="pass ttl=None to share flights without caching"
            )
        self._stale_ttl = _number(
            "stale_ttl", stale_ttl, minimum=0, strict=False, fix="pass 0 to serve nothing stale"
        )
        if self._stale_ttl and self._ttl is None:
            raise ValueError(
                f"stale_ttl={stale_ttl!r} needs a ttl: pass ttl=<seconds> or stale_ttl=0"
            )
        self._lease_ttl = _number(
            "lease_ttl", lease_ttl, minimum=0.01, strict=False, fix="e.g. lease_ttl=10.0"
        )
        if not isinstance(poll, tuple) or len(poll) != 2:
            raise TypeError(f"poll must be a (first, max) tuple of seconds, got {poll!r}")
        self._poll_min = _number("poll[0]", poll[0], minimum=0, fix="e.g. poll=(0.05, 1.0)")
        self._poll_max = _number("poll[1]", poll[1], minimum=0, fix="e.g. poll=(0.05, 1.0)")
        if self._poll_max < self._poll_min:
            raise ValueError(f"poll must be (first, max) with first <= max, got {poll!r}")
        self._timeout = None
        if timeout is not None:
            self._timeout = _number(
                "timeout", timeout, minimum=0, fix="pass timeout=None to wait for Redis forever"
            )
        if not isinstance(fail_open, bool):
            raise TypeError(f"fail_open must be True or False, got {fail_open!r}")
        self._fail_open = fail_open

        self._client = client
        self._namespace = namespace
        self._lease_ms = str(max(1, round(self._lease_ttl * 1000)))
        self._stale_ms = str(round(self._stale_ttl * 1000))
        self._value_ms = (
            None if self._ttl is None else max(1, round((self._ttl + self._stale_ttl) * 1000))
        )
        # Uncached results and bare outcomes stay long enough for a follower that polls.
        self._result_ms = round(max(5.0, 3 * self._poll_max) * 1000)
        # How long a cancelled leader's lease waits for a local re-elected leader to adopt it.
        self._grace = min(0.1, self._lease_ttl / 4)
        self._lookup = client.register_script(_scripts.LOOKUP)
        self._check = client.register_script(_scripts.CHECK)
        self._extend = client.register_script(_scripts.EXTEND)
        self._finish = client.register_script(_scripts.FINISH)
        self._subs = Subscriptions(client, ack_timeout=self._poll_max, send_timeout=self._timeout)
        # Below: touched only on the event loop's thread.
        self._orphans: dict[str, _Orphan] = {}  # lease name -> lease of a cancelled leader
        self._tasks: set[asyncio.Task[Any]] = set()  # renewals and SWR refreshes
        self._cleanups: set[asyncio.Task[Any]] = set()  # lease releases (awaited on aclose)
        self._down_until = 0.0  # monotonic time before which Redis is skipped
        self._backoff = 0.0  # > 0 while Redis counts as down
        # Test hook: awaited between a failed LOOKUP and SUBSCRIBE (the subscribe race).
        self._before_subscribe: Callable[[], Awaitable[None]] | None = None
        self._shared_hits = self._stale_served = self._refreshes = 0
        self._fleet_leads = self._remote_follows = self._takeovers = 0
        self._lease_lost = self._redis_errors = self._fallbacks = 0

    def __repr__(self) -> str:
        return (
            f"RedisTier(namespace={self._namespace!r}, ttl={self._ttl!r}, "
            f"stale_ttl={self._stale_ttl!r}, lease_ttl={self._lease_ttl!r})"
        )

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def stats(self) -> RedisTierStats:
        """A snapshot of this process's counters."""
        return RedisTierStats(
            shared_hits=self._shared_hits,
            stale_served=self._stale_served,
            refreshes=self._refreshes,
            fleet_leads=self._fleet_leads,
            remote_follows=self._remote_follows,
            takeovers=self._takeovers,
            lease_lost=self._lease_lost,
            redis_errors=self._redis_errors,
            fallbacks=self._fallbacks,
        )

    # -- the Tier protocol ------------------------------------------------------------------

    async def run(
        self,
        key: Hashable,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any] | None,
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]:
        """run serves one local leader's call: from Redis, from another process, or by produce().

        Returns ``(value, role)`` with role ``"shared"`` (fresh value from Redis), ``"stale"``,
        ``"remote"`` (another process's flight) or ``"leader"`` (``produce()`` ran here). An
        ``Unshared`` value from ``produce()`` is returned as is and never stored.
        """
        codec = DEFAULT_CODEC if codec is None else codec
        keys = Keys.of(self._namespace, key_digest(key))
        orphan = self._orphans.pop(keys.lease, None)
        if orphan is not None:
            # A cancelled leader of this process left its lease a moment ago (DESIGN.md:
            # re-election): the re-elected local leader carries on with it.
            orphan.handle.cancel()
            return await self._lead(orphan.lease, produce, codec, cacheable), "leader"
        if self._down_until and time.monotonic() < self._down_until:
            self._fallbacks += 1
            return await produce(), "leader"
        try:
            return await self._run(keys, produce, codec, cacheable)
        except _RedisDown as down:
            self._went_down(down)
            self._fallbacks += 1
            return await produce(), "leader"

    async def _run(
        self,
        keys: Keys,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> tuple[Any, str]:
        skip_value = "0"
        if not self._stale_ttl:
            # Without stale_ttl a value is fresh for as long as it exists, so an L2 hit needs
            # only a plain GET; a miss pays one more round trip (before an upstream call).
            raw: bytes | None = await self._op(self._client.get(keys.value))  # type: ignore[arg-type]
            if self._backoff:
                self._came_back()
            if raw is not None:
                try:
                    value = self._decode(raw, codec)
                except BadRecord as exc:
                    log.debug("singleflight: unreadable value (%s); replacing it", exc)
                    skip_value = "1"
                else:
                    self._shared_hits += 1
                    return value, "shared"
        token = secrets.token_hex(16)
        followed = False
        errors = 0
        while True:
            res = await self._op(
                self._lookup(
                    keys=[keys.value, keys.lease],
                    args=[token, self._lease_ms, self._stale_ms, skip_value],
                )
            )
            if self._backoff:
                self._came_back()
            kind = res[0]
            if kind == b"lead":
                if followed:
                    self._takeovers += 1
                return await self._lead(_Lease(keys, token), produce, codec, cacheable), "leader"
            if kind == b"follow":
                if not followed:
                    followed = True
                    self._remote_follows += 1
                outcome = await self._follow(keys, res[1].decode(), codec)
                if isinstance(outcome, _Got):
                    return outcome.value, "remote"
                if outcome is _ERR:
                    # Exceptions do not travel between processes: try one more flight, then
                    # make our own call so our caller sees its own error.
                    errors += 1
                    if errors < 2:
                        continue
                if outcome is _RETRY:
                    continue
                return await produce(), "leader"
            try:
                value = self._decode(res[1], codec)
            except BadRecord as exc:
                log.debug("singleflight: unreadable value (%s); replacing it", exc)
                if kind == b"stale_lead":
                    lease = _Lease(keys, token)
                    return await self._lead(lease, produce, codec, cacheable), "leader"
                skip_value = "1"
                continue
            if kind == b"fresh":
                self._shared_hits += 1
                return value, "shared"
            self._stale_served += 1
            if kind == b"stale_lead":
                self._refresh(_Lease(keys, token), produce, codec, cacheable)
            return value, "stale"

    # -- leading ----------------------------------------------------------------------------

    async def _lead(
        self,
        lease: _Lease,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> Any:
        self._fleet_leads += 1
        renewal = self._spawn(self._renew(lease), self._tasks)
        try:
            value = await produce()
        except asyncio.CancelledError:
            renewal.cancel()
            self._park(lease)
            raise
        except BaseException:
            renewal.cancel()
            await self._settle(lease, "result", encode_record("err"), self._result_ms, quiet=True)
            raise
        renewal.cancel()
        if type(value) is Unshared:
            await self._settle(lease, "result", encode_record("unshared"), self._result_ms)
            return value
        try:
            payload = codec.encode(value)
        except BaseException:
            # Not storable: let the followers make their own calls, and tell our caller why.
            await self._settle(
                lease, "result", encode_record("unshared"), self._result_ms, quiet=True
            )
            raise
        record = encode_record("ok", payload)
        if self._value_ms is not None and (cacheable is None or cacheable(value)):
            await self._settle(lease, "value", record, self._value_ms)
        else:
            await self._settle(lease, "result", record, self._result_ms)
        return value

    async def _renew(self, lease: _Lease) -> None:
        period = self._lease_ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                ok = await self._op(
                    self._extend(keys=[lease.keys.lease], args=[lease.token, self._lease_ms])
                )
            except _RedisDown as down:
                log.debug("singleflight: lease renewal failed: %r", down.__cause__)
                continue
            if not ok:
                self._lost(lease)
                return

    def _lost(self, lease: _Lease) -> None:
        if not lease.lost:
            lease.lost = True
            self._lease_lost += 1
            log.warning(
                "singleflight: a lease expired before its flight finished; another process may "
                "call upstream too. Raise lease_ttl (now %gs) above the slowest call",
                self._lease_ttl,
            )

    async def _settle(
        self, lease: _Lease, mode: str, record: bytes, px: int, *, quiet: bool = False
    ) -> None:
        """Store the outcome, drop the lease if still ours and PUBLISH, in one FINISH call.

        ``quiet``: never raise, even with ``fail_open=False`` (error and cleanup paths, where
        the caller's own exception, or none, must win).
        """
        keys = lease.keys
        try:
            mine = await self._op(
                self._finish(
                    keys=[keys.value, keys.lease, keys.result(lease.token)],
                    args=[lease.token, mode, record, px, keys.channel],
                )
            )
        except _RedisDown as down:
            # Followers find the lease gone once it expires and take over (or fall back).
            if quiet:
                self._redis_errors += 1
                log.debug("singleflight: FINISH failed: %r", down.__cause__)
            else:
                self._went_down(down)
            return
        if not mine:
            self._lost(lease)

    def _park(self, lease: _Lease) -> None:
        # Our run was cancelled. The Group re-elects a local follower, which calls run() again
        # at once: keep the lease for it (it adopts the orphan). If nobody does within the
        # grace period, release the lease and publish "abandon" so another process takes over
        # now rather than after lease_ttl.
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self._grace, self._abandon, lease)
        self._orphans[lease.keys.lease] = _Orphan(lease, handle)

    def _abandon(self, lease: _Lease) -> None:
        orphan = self._orphans.get(lease.keys.lease)
        if orphan is not None and orphan.lease is lease:
            del self._orphans[lease.keys.lease]
            self._spawn(
                self._settle(
                    lease, "result", encode_record("abandon"), self._result_ms, quiet=True
                ),
                self._cleanups,
            )

    def _refresh(
        self,
        lease: _Lease,
        produce: Callable[[], Awaitable[Any]],
        codec: Codec[Any],
        cacheable: Callable[[Any], bool] | None,
    ) -> None:
        # Stale-while-revalidate: the caller gets the stale value now; this process won the
        # fleet-wide refresh lease, so it refreshes in a task of the tier (cancelled by
        # aclose). Trade-off: this is the one piece of work that outlives its caller, which
        # SWR requires; its produce() must not depend on the caller still being there.
        self._refreshes += 1

        async def refresh() -> None:
            try:
                await self._lead(lease, produce, codec, cacheable)
            except Exception as exc:
                log.debug("singleflight: stale-while-revalidate refresh failed: %r", exc)

        self._spawn(refresh(), self._tasks)

    # -- following --------------------------------------------------------------------------

    async def _follow(self, keys: Keys, holder: str, codec: Codec[Any]) -> _Got | _Outcome:
        if self._before_subscribe is not None:
            await self._before_subscribe()
        try:
            listener = await self._subs.listen(keys.channel.encode())
        except _REDIS_ERRORS as exc:
            raise _RedisDown(exc) from exc
        try:
            interval = self._poll_min
            while True:
                # After the SUBSCRIBE ack, re-check: a PUBLISH sent between LOOKUP and the ack
                # was not delivered to us, but its result is visible here (uv #3724).
                res = await self._op(
                    self._check(keys=[keys.value, keys.lease, keys.result(holder)], args=[holder])
                )
                kind = res[0]
                if kind == b"value":
                    try:
                        return _Got(self._decode(res[1], codec))
                    except BadRecord:
                        return _ALONE
                if kind == b"result":
                    return self._outcome(res[1], codec)
                if kind == b"gone":
                    if not res[1]:
                        return _RETRY  # no lease, no result: the holder died; take over
                    holder = res[1].decode()  # someone else took over already: follow them
                    continue
                await listener.wait(interval * random.uniform(0.8, 1.2))
                interval = min(interval * 2, self._poll_max)
        finally:
            self._subs.release(listener)

    def _outcome(self, data: bytes, codec: Codec[Any]) -> _Got | _Outcome:
        try:
            record = decode_record(data)
        except BadRecord:
            return _ALONE
        if record.status == "ok":
            try:
                return _Got(codec.decode(record.payload))
            except Exception:
                return _ALONE
        if record.status == "err":
            return _ERR
        if record.status == "abandon":
            return _RETRY
        return _ALONE  # "unshared", or a status from a newer version

    @staticmethod
    def _decode(data: bytes, codec: Codec[Any]) -> Any:
        record = decode_record(data)
        if record.status != "ok":
            raise BadRecord(f"status {record.status!r} in a value")
        try:
            return codec.decode(record.payload)
        except Exception as exc:
            raise BadRecord(f"codec failed: {exc!r}") from None

    # -- Redis health -----------------------------------------------------------------------

    async def _op(self, call: Awaitable[T]) -> T:
        # asyncio.timeout directly, not deadline(): this is on every call's path (an L2 hit).
        try:
            if self._timeout is None or sys.version_info < (3, 11):
                return await call
            async with asyncio.timeout(self._timeout):
                return await call
        except _REDIS_ERRORS as exc:
            raise _RedisDown(exc) from exc

    def _went_down(self, down: _RedisDown) -> None:
        exc = down.__cause__
        if not self._fail_open and exc is not None:
            raise exc
        self._redis_errors += 1
        if not self._backoff:
            self._backoff = _RETRY_MIN
            log.warning(
                "singleflight: Redis is unavailable (%s: %s); coalescing in this process only, "
                "retrying Redis in %gs",
                type(exc).__name__,
                exc,
                self._backoff,
            )
        else:
            self._backoff = min(self._backoff * 2, _RETRY_MAX)
        self._down_until = time.monotonic() + self._backoff

    def _came_back(self) -> None:
        self._backoff = 0.0
        self._down_until = 0.0
        log.info("singleflight: Redis is reachable again; coalescing across processes")

    # -- lifecycle --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], into: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        into.add(task)
        task.add_done_callback(into.discard)
        return task

    async def aclose(self) -> None:
        """aclose stops renewals and refreshes, releases held leases and unsubscribes.

        The Redis client stays open: it belongs to the caller.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for orphan in list(self._orphans.values()):
            orphan.handle.cancel()
            self._orphans.pop(orphan.lease.keys.lease, None)
            await self._settle(
                orphan.lease, "result", encode_record("abandon"), self._result_ms, quiet=True
            )
        await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        await self._subs.aclose()

    async def __aenter__(self) -> RedisTier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
