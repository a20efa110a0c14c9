"""The TTL layer: completed cacheable responses are served from memory until they expire."""

from __future__ import annotations

import asyncio

import cachetools
import pytest
from _aiohttp_support import bounded

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


class Clock:
    """A fake monotonic clock for cachetools, moved by hand: no sleeping in tests."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_ttl_serves_from_cache_until_expiry(upstream, make_session):
    clock = Clock()
    mw = SingleflightMiddleware(cache=cachetools.TTLCache(maxsize=16, ttl=5.0, timer=clock))
    session = make_session(mw)
    url = upstream.url + "/ttl"

    async def get():
        async with session.get(url, headers={"X-Request-Id": str(clock.now)}) as resp:
            return served(resp), (await resp.json())["hit"], resp.request_info

    assert (await get())[:2] == ("leader", 1)
    clock.now = 4.9
    role, hit, info = await get()
    assert (role, hit) == ("cache", 1)
    assert info.headers["X-Request-Id"] == "4.9"  # a cache hit is bound to its own request
    clock.now = 5.0  # TTL counts from completion
    assert (await get())[:2] == ("leader", 2)
    assert upstream.hits("/ttl") == 2
    assert mw.stats.cache_hits == 1


async def test_ttl_option_builds_a_ttl_cache(upstream, make_session):
    mw = SingleflightMiddleware(ttl=30.0, maxsize=7)
    cache = mw.group.cache
    assert isinstance(cache, cachetools.TTLCache) and cache.ttl == 30.0 and cache.maxsize == 7
    session = make_session(mw)
    responses = []
    for _ in range(3):
        async with session.get(upstream.url + "/opt-ttl") as resp:
            responses.append((served(resp), await resp.read()))
    assert [r for r, _ in responses] == ["leader", "cache", "cache"]
    assert len({body for _, body in responses}) == 1
    assert upstream.hits("/opt-ttl") == 1


@pytest.mark.parametrize(
    "query",
    [
        "status=503",
        "status=206",
        "cache_control=no-store",
        "cache_control=private",
        "set_cookie=a%3Db",
        "vary=*",
    ],
)
async def test_uncacheable_responses_are_not_cached(upstream, make_session, query):
    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    for _ in range(2):
        async with session.get(f"{upstream.url}/nc?{query}") as resp:
            await resp.read()
            assert served(resp) == "leader"
    assert upstream.hits("/nc") == 2


async def test_request_no_store_is_not_cached(upstream, make_session):
    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    for _ in range(2):
        async with session.get(upstream.url + "/rns", headers={"Cache-Control": "no-store"}) as r:
            assert served(r) == "leader"
    assert upstream.hits("/rns") == 2


async def test_cache_hits_and_followers_in_one_burst(upstream, make_session):
    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    first = await bounded(asyncio.gather(*(session.get(upstream.url + "/warm") for _ in range(5))))
    second = await bounded(asyncio.gather(*(session.get(upstream.url + "/warm") for _ in range(5))))
    assert {served(r) for r in first} <= {"leader", "follower"}
    assert {served(r) for r in second} == {"cache"}
    for r in second:
        assert (await r.json())["hit"] == 1 and r.connection is None
    assert upstream.hits("/warm") == 1
