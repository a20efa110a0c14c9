"""What both I/O styles of the tier share: its checked options, its counters and Redis's health."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Final, final

from redis.exceptions import (
    ClusterError,
    ConnectionError as RedisConnectionError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    TimeoutError as RedisTimeoutError,
)

from .._group import Unshared

__all__ = (
    "BUSY",
    "DOWN",
    "Core",
    "KeyTrouble",
    "RedisDown",
    "RedisTierStats",
    "Settings",
    "discard_sync",
    "discard_async",
)

log = logging.getLogger("singleflight.redis")

# "Redis is unreachable": test these first (ClusterDownError is a ResponseError too, and
# RedisClusterException, e.g. the whole cluster unreachable, is no RedisError at all).
DOWN: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)
# The pool has no free connection: back-pressure, waited out within the command's budget.
BUSY: Final = MaxConnectionsError
_RETRY_MIN: Final = 1.0  # seconds without Redis after a failure; doubles while it keeps failing
_RETRY_MAX: Final = 30.0


class RedisDown(Exception):
    """Internal: Redis is unreachable (the cause is the library's error)."""


class KeyTrouble(Exception):
    """Internal: Redis answered, but not for this key (e.g. WRONGTYPE): a miss for this key only."""


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


def _number(name: str, value: object, *, minimum: float, fix: str, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}; {fix}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum:g}, got {value!r}; {fix}")
    return float(value)


@final
@dataclass(frozen=True, slots=True)
class Settings:
    """The tier's options, checked once, with the millisecond values the scripts take."""

    namespace: str
    ttl: float | None
    stale_ttl: float
    lease_ttl: float
    poll_min: float
    poll_max: float
    timeout: float | None
    fail_open: bool
    lease_ms: str
    stale_ms: str
    value_ms: int | None
    result_ms: int

    @classmethod
    def check(
        cls,
        namespace: object,
        ttl: object,
        stale_ttl: object,
        lease_ttl: object,
        poll: object,
        timeout: object,
        fail_open: object,
    ) -> Settings:
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(
                f"namespace must be a non-empty str without braces, got {namespace!r}; "
                'braces would break the Redis Cluster hash tag, e.g. namespace="sf"'
            )
        ttl_s = None
        if ttl is not None:
            ttl_s = _number(
                "ttl", ttl, minimum=0, fix="pass ttl=None to share flights without caching"
            )
        stale = _number(
            "stale_ttl", stale_ttl, minimum=0, strict=False, fix="pass 0 to serve nothing stale"
        )
        if stale and ttl_s is None:
            raise ValueError(
                f"stale_ttl={stale_ttl!r} needs a ttl: pass ttl=<seconds> or stale_ttl=0"
            )
        lease = _number(
            "lease_ttl", lease_ttl, minimum=0.01, strict=False, fix="e.g. lease_ttl=10.0"
        )
        if not isinstance(poll, tuple) or len(poll) != 2:
            raise TypeError(f"poll must be a (first, max) tuple of seconds, got {poll!r}")
        poll_min = _number("poll[0]", poll[0], minimum=0, fix="e.g. poll=(0.05, 1.0)")
        poll_max = _number("poll[1]", poll[1], minimum=0, fix="e.g. poll=(0.05, 1.0)")
        if poll_max < poll_min:
            raise ValueError(f"poll must be (first, max) with first <= max, got {poll!r}")
        timeout_s = None
        if timeout is not None:
            timeout_s = _number(
                "timeout", timeout, minimum=0, fix="pass timeout=None to wait for Redis forever"
            )
        if not isinstance(fail_open, bool):
            raise TypeError(f"fail_open must be True or False, got {fail_open!r}")
        return cls(
            namespace=namespace,
            ttl=ttl_s,
            stale_ttl=stale,
            lease_ttl=lease,
            poll_min=poll_min,
            poll_max=poll_max,
            timeout=timeout_s,
            fail_open=fail_open,
            lease_ms=str(max(1, round(lease * 1000))),
            stale_ms=str(round(stale * 1000)),
            value_ms=None if ttl_s is None else max(1, round((ttl_s + stale) * 1000)),
            # Uncached results and bare outcomes stay long enough for a follower that polls.
            result_ms=round(max(5.0, 3 * poll_max) * 1000),
        )


class Core:
    """Core holds a tier's settings, counters and Redis's health, for either I/O style.

    Counters are plain ``+=`` under the GIL, like the Group's. Health: after a Redis failure
    the tier skips Redis for a back-off (1 s, doubling up to 30 s); one success ends it.
    """

    def __init__(self, settings: Settings, cluster: bool) -> None:
        self.settings = settings
        self.cluster = cluster
        # On a cluster: sharded pub/sub (the channel lives on its key's shard only).
        self.publish = "SPUBLISH" if cluster else "PUBLISH"
        self.down_until = 0.0  # monotonic time before which Redis is skipped
        self.backoff = 0.0  # > 0 while Redis counts as down
        self.shared_hits = self.stale_served = self.refreshes = 0
        self.fleet_leads = self.remote_follows = self.takeovers = 0
        self.lease_lost = self.redis_errors = self.fallbacks = 0

    def stats(self) -> RedisTierStats:
        return RedisTierStats(
            shared_hits=self.shared_hits,
            stale_served=self.stale_served,
            refreshes=self.refreshes,
            fleet_leads=self.fleet_leads,
            remote_follows=self.remote_follows,
            takeovers=self.takeovers,
            lease_lost=self.lease_lost,
            redis_errors=self.redis_errors,
            fallbacks=self.fallbacks,
        )

    def skipping(self) -> bool:
        """True while Redis is in its back-off: serve locally without asking it."""
        if self.down_until and time.monotonic() < self.down_until:
            self.fallbacks += 1
            return True
        return False

    def answered(self) -> None:
        """A Redis call succeeded: if Redis counted as down, it is back."""
        if self.backoff:
            self.backoff = 0.0
            self.down_until = 0.0
            log.info("singleflight: Redis is reachable again; coalescing across processes")

    def went_down(self, down: RedisDown) -> None:
        """Redis failed: raise its error (fail_open=False) or start/extend the back-off."""
        exc = down.__cause__
        if not self.settings.fail_open and exc is not None:
            raise exc
        self.redis_errors += 1
        if not self.backoff:
            self.backoff = _RETRY_MIN
            log.warning(
                "singleflight: Redis is unavailable (%s: %s); coalescing in this process only, "
                "retrying Redis in %gs",
                type(exc).__name__,
                exc,
                self.backoff,
            )
        else:
            self.backoff = min(self.backoff * 2, _RETRY_MAX)
        self.down_until = time.monotonic() + self.backoff

    def key_trouble(self, trouble: KeyTrouble) -> None:
        """Redis refused one key (e.g. a foreign value type): raise it, or serve this call alone."""
        exc = trouble.__cause__
        if not self.settings.fail_open and exc is not None:
            raise exc
        self.redis_errors += 1
        log.warning(
            "singleflight: Redis refused this key (%s: %s); serving it without the tier. "
            "Is another program writing under namespace %r?",
            type(exc).__name__,
            exc,
            self.settings.namespace,
        )

    def lost(self, lease: Any) -> None:
        if not lease.lost:
            lease.lost = True
            self.lease_lost += 1
            log.warning(
                "singleflight: a lease expired before its flight finished; another process may "
                "call upstream too. Raise lease_ttl (now %gs) above the slowest call",
                self.settings.lease_ttl,
            )


def classify(exc: BaseException) -> Exception | None:
    """The tier's view of a Redis call's error: RedisDown, KeyTrouble, or None (not Redis's)."""
    if isinstance(exc, DOWN):
        return RedisDown(exc)
    if isinstance(exc, RedisError):
        return KeyTrouble(exc)
    return None


def discard_sync(value: Any) -> None:
    """Close the live response inside an ``Unshared`` value nobody will receive."""
    if type(value) is Unshared:
        close = getattr(value.value, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # closing a response we drop: nothing left to tell
                log.debug("singleflight: closing a dropped response failed: %r", exc)


async def discard_async(value: Any) -> None:
    """Close (``aclose``, else ``close``) the live response inside a dropped ``Unshared``."""
    if type(value) is Unshared:
        inner = value.value
        aclose = getattr(inner, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
            else:
                close = getattr(inner, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            log.debug("singleflight: closing a dropped response failed: %r", exc)
