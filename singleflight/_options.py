"""Checks of the core's options at construction: one rule and one message (with the fix) each."""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = (
    "check_cache",
    "check_cache_if",
    "check_codec",
    "check_maxsize",
    "check_reelect_on",
    "check_tier",
    "check_timeout",
    "check_ttl",
    "check_ttl_options",
    "fail_type",
)


def fail_type(name: str, expected: str, value: object, fix: str) -> TypeError:
    """A TypeError that names the option, what it takes, the bad value and the fix."""
    return TypeError(
        f"{name} must be {expected}, got {value!r:.80} ({type(value).__name__}); {fix}"
    )


def check_ttl(ttl: object, name: str = "ttl") -> float | None:
    """A time to live: None, or a finite number of seconds > 0 (the HTTP adapters' rule too)."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise fail_type(name, "a number of seconds or None", ttl, f"pass e.g. {name}=5.0")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(
            f"{name} must be > 0 and finite, got {ttl!r}; pass {name}=None for no cache, or "
            "cache=cachetools.LRUCache(1024) to keep values without expiry"
        )
    return float(ttl)


def check_maxsize(maxsize: object) -> int:
    """How many results a ttl cache keeps: an int >= 1."""
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise fail_type("maxsize", "an int", maxsize, "pass e.g. maxsize=1024")
    if maxsize < 1:
        raise ValueError(
            f"maxsize must be >= 1 (the most results the ttl cache keeps), got {maxsize}; "
            "to keep no results, drop ttl= (and maxsize=)"
        )
    return maxsize


def check_cache(cache: object) -> MutableMapping[Any, Any] | None:
    if cache is not None and not isinstance(cache, MutableMapping):
        raise fail_type(
            "cache",
            "a MutableMapping such as cachetools.TTLCache",
            cache,
            "or None for no cache",
        )
    return cache


def check_cache_if(cache_if: object) -> Callable[[Any], bool] | None:
    if cache_if is not None and not callable(cache_if):
        raise fail_type(
            "cache_if",
            "a callable value -> bool",
            cache_if,
            "pass e.g. cache_if=lambda value: value is not None, or None to keep every value",
        )
    return cache_if


def check_reelect_on(reelect_on: object) -> tuple[type[BaseException], ...]:
    if not isinstance(reelect_on, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in reelect_on
    ):
        raise fail_type(
            "reelect_on",
            "a tuple of exception types",
            reelect_on,
            "pass e.g. reelect_on=(TimeoutError,)",
        )
    return reelect_on


def check_tier(tier: object) -> Any:
    """A shared tier has the tier protocol: an async ``run(key, produce, codec, cacheable)``."""
    if tier is not None and not callable(getattr(tier, "run", None)):
        raise fail_type(
            "tier",
            "a shared tier with a run() method (the tier protocol)",
            tier,
            "pass e.g. tier=singleflight.redis.RedisTier(redis.asyncio.Redis(...)), or None",
        )
    return tier


def check_codec(codec: object) -> Any:
    """A codec has ``encode(value) -> bytes`` and ``decode(bytes) -> value``."""
    if codec is not None and not (
        callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
    ):
        raise fail_type(
            "codec",
            "an object with encode(value) -> bytes and decode(data) -> value",
            codec,
            "or None to let the tier choose",
        )
    return codec


def check_timeout(timeout: object) -> None:
    """A follower's bound: None (wait as long as the flight runs) or seconds >= 0."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise fail_type("timeout", "a number of seconds or None", timeout, "pass e.g. 5.0")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")


def check_ttl_options(
    ttl: object, stale_ttl: object, maxsize: object, ttl_of: object, cache: object
) -> tuple[float, float, int] | None:
    """A Group's own ttl cache: ``(ttl, stale_ttl, maxsize)``, or None without ``ttl=``."""
    ttl = check_ttl(ttl)
    if stale_ttl is not None:
        if isinstance(stale_ttl, bool) or not isinstance(stale_ttl, (int, float)):
            raise fail_type(
                "stale_ttl", "a number of seconds or None", stale_ttl, "pass e.g. stale_ttl=30.0"
            )
        if not (stale_ttl >= 0 and math.isfinite(stale_ttl)):
            raise ValueError(
                f"stale_ttl must be >= 0 and finite, got {stale_ttl!r}; "
                "pass stale_ttl=None to serve nothing stale"
            )
    if maxsize is not None:
        maxsize = check_maxsize(maxsize)
    if ttl_of is not None and not callable(ttl_of):
        raise fail_type(
            "ttl_of",
            "a callable value -> (ttl, stale_ttl) or None",
            ttl_of,
            "or None to give every value ttl= and stale_ttl=",
        )
    given = [
        name
        for name, v in (("stale_ttl", stale_ttl), ("maxsize", maxsize), ("ttl_of", ttl_of))
        if v is not None
    ]
    if ttl is None:
        if given:
            raise ValueError(
                f"{given[0]}= needs ttl= (how long a value is fresh); pass ttl= too, "
                f"e.g. ttl=60, {given[0]}=..."
            )
        return None
    if cache is not None:
        raise ValueError("pass either cache= or ttl= (with stale_ttl=/maxsize=), not both")
    return ttl, float(stale_ttl or 0.0), int(maxsize or 1024)
