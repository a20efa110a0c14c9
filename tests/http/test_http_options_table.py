"""Every HTTP option x bad value x message: bad input fails at construction, naming the fix.

One table for every entry point that takes the shared HTTP options (``_http/options.py``): the
httpx transports, the aiohttp middleware and ``http_group``. Each row says which option, the bad
value, the exception type and what the message must say (the parameter, the value, the fix).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cachetools
import httpx
import pytest
import redis.asyncio as aioredis

from singleflight import Group
from singleflight.aiohttp import SingleflightMiddleware
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport, http_group
from singleflight.redis import RedisTier

ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "AsyncSingleflightTransport": AsyncSingleflightTransport,
    "SingleflightTransport": SingleflightTransport,
    "SingleflightMiddleware": SingleflightMiddleware,
    "http_group": http_group,
}
GROUP_OPTIONS = {"ttl", "maxsize", "cache", "tier"}  # what http_group takes
NO_TIER: set[str] = set()  # every entry point takes tier= (a sync one: issue 14)


def a_tier() -> RedisTier:
    return RedisTier(aioredis.Redis(port=1))  # never connects: construction only


# (option, bad kwargs, exception, what the message says)
TABLE: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("methods", {"methods": "GET"}, TypeError, r"methods must be .*'GET'.*pass e\.g\. methods="),
    ("methods", {"methods": ("GET", "NOT A METHOD")}, ValueError, r"'NOT A METHOD'.*methods=\("),
    ("methods", {"methods": [1]}, ValueError, r"methods must hold .*got 1"),
    ("methods", {"methods": 5}, TypeError, r"methods must be .*got 5"),
    ("ttl", {"ttl": "5"}, TypeError, r"ttl must be a number.*'5'.*pass e\.g\. ttl=5\.0"),
    ("ttl", {"ttl": True}, TypeError, r"ttl must be a number.*True"),
    ("ttl", {"ttl": 0}, ValueError, r"ttl must be > 0 and finite, got 0; pass ttl=None"),
    ("ttl", {"ttl": -1.5}, ValueError, r"got -1\.5; pass ttl=None"),
    ("ttl", {"ttl": math.inf}, ValueError, r"got inf; pass ttl=None .*cache=cachetools"),
    ("ttl", {"ttl": math.nan}, ValueError, r"got nan; pass ttl=None"),
    ("maxsize", {"maxsize": 0, "ttl": 1.0}, ValueError, r"maxsize must be >= 1, got 0"),
    ("stale_ttl", {"stale_ttl": 5.0}, ValueError, r"stale_ttl"),
    ("stale_ttl", {"stale_ttl": "5", "ttl": 1.0}, TypeError, r"stale_ttl"),
    ("stale_ttl", {"stale_ttl": -1.0, "ttl": 1.0}, ValueError, r"stale_ttl"),
    ("max_ttl", {"max_ttl": 60.0, "ttl": 1.0}, ValueError, r'max_ttl=.*needs ttl="headers"'),
    ("max_ttl", {"max_ttl": "x", "ttl": "headers"}, TypeError, r"max_ttl must be a number"),
    ("maxsize", {"maxsize": "9"}, TypeError, r"maxsize must be an int, got '9'.*maxsize=1024"),
    ("maxsize", {"maxsize": 1.5}, TypeError, r"maxsize must be an int, got 1\.5"),
    ("maxsize", {"maxsize": True}, TypeError, r"maxsize must be an int, got True"),
    ("cache", {"cache": []}, TypeError, r"cache must be a MutableMapping.*\[\].*TTLCache"),
    ("cache", {"cache": {}, "ttl": 5.0}, ValueError, r"either cache= or ttl="),
    ("key", {"key": "url"}, TypeError, r"key must be a callable.*'url'.*key=lambda"),
    ("ignore_headers", {"ignore_headers": "traceparent"}, TypeError, r"ignore_headers must be"),
    ("ignore_headers", {"ignore_headers": {"authorization"}}, ValueError, r"authorization.*key="),
    ("ignore_headers", {"ignore_headers": {"Cookie"}}, ValueError, r"cookie"),
    ("ignore_headers", {"ignore_headers": {""}}, ValueError, r"header names.*got ''"),
    ("ignore_headers", {"ignore_headers": {"*"}}, ValueError, r"header names.*got '\*'"),
    ("ignore_headers", {"ignore_headers": [7]}, ValueError, r"header names.*got 7"),
    ("max_body_size", {"max_body_size": -1}, ValueError, r"max_body_size must be >= 0, got -1"),
    ("max_body_size", {"max_body_size": 1.5}, TypeError, r"max_body_size must be an int.*1\.5"),
    ("max_body_size", {"max_body_size": "1"}, TypeError, r"max_body_size must be an int.*'1'"),
    ("group", {"group": object()}, TypeError, r"group must be a singleflight\.Group.*http_group"),
    ("group", {"group": Group()}, ValueError, r"built for HTTP.*http_group\(ttl="),
    (
        "group",
        {"group": Group(cachetools.TTLCache(8, 60))},
        ValueError,
        r"would cache 5xx and no-store.*http_group",
    ),
    ("group", {"group": http_group(), "ttl": 5.0}, ValueError, r"group= brings its own cache"),
    ("tier", {"tier": object()}, TypeError, r"tier must be a shared tier.*object.*tier=RedisTier"),
    ("tier", {"tier": 42}, TypeError, r"tier must be .*got 42 \(int\)"),
    ("tier", {"tier": "redis://x"}, TypeError, r"tier must be .*'redis://x'"),
]


def rows() -> list[Any]:
    out = []
    for entry in ENTRY_POINTS:
        for option, kwargs, error, message in TABLE:
            if entry == "http_group" and not set(kwargs) <= GROUP_OPTIONS:
                continue
            if entry in NO_TIER and option == "tier":
                continue
            out.append(pytest.param(entry, kwargs, error, message, id=f"{entry}-{option}"))
    return out


@pytest.mark.parametrize(("entry", "kwargs", "error", "message"), rows())
def test_bad_option_fails_at_construction_naming_the_fix(entry, kwargs, error, message):
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**kwargs)


def test_the_table_covers_every_option_of_every_entry_point():
    import inspect

    covered = {option for option, *_ in TABLE}
    for name, entry in ENTRY_POINTS.items():
        init = entry.__init__ if isinstance(entry, type) else entry  # type: ignore[misc]
        params = set(inspect.signature(init).parameters) - {"inner", "self"}
        assert params <= covered, (name, params - covered)


def test_the_sync_transport_refuses_a_group_with_a_tier():
    group = http_group(tier=a_tier())
    # An async tier cannot serve sync work: the error names the client to pass (issue 14).
    with pytest.raises(TypeError, match=r"runs sync work.*async client.*redis\.Redis\(\.\.\.\)"):
        SingleflightTransport(group=group)
    assert AsyncSingleflightTransport(group=group).group is group  # fine where it can run


@pytest.mark.parametrize(
    ("entry", "inner"),
    [(AsyncSingleflightTransport, httpx.HTTPTransport()), (SingleflightTransport, object())],
)
def test_bad_inner_transport(entry, inner):
    with pytest.raises(TypeError, match=r"inner must be an httpx\..*BaseTransport.*pass e\.g\."):
        entry(inner)


def test_good_values_pass():
    for entry in ENTRY_POINTS.values():
        entry(ttl=1e9, maxsize=1, cache=None, tier=None) if entry is http_group else None
    AsyncSingleflightTransport(tier=a_tier(), ttl=None, max_body_size=0, methods=["get"])
    SingleflightMiddleware(tier=a_tier())
    SingleflightTransport(group=http_group(ttl=5), ignore_headers={"x-b3-*"})
