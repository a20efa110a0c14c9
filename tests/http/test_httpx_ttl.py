"""The TTL layer of the httpx transports: what is cached, for how long, from when."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from cachetools import TTLCache
from http_helpers import bounded, wait_until

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport


class Clock:
    """A fake monotonic clock for TTLCache: tests move time, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_builds_a_ttl_cache():
    t = AsyncSingleflightTransport(ttl=2.5, maxsize=7)
    cache = t.group.cache
    assert isinstance(cache, TTLCache) and cache.ttl == 2.5 and cache.maxsize == 7
    assert AsyncSingleflightTransport().group.cache is None


async def test_cached_until_expiry_then_a_second_hit(upstream):
    clock = Clock()
    t = AsyncSingleflightTransport(cache=TTLCache(maxsize=16, ttl=5, timer=clock))
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        first = await c.get("/ttl")
        clock.now = 4.9
        second = await c.get("/ttl", headers={"traceparent": "00-other-01"})
        assert upstream.hits("/ttl") == 1
        assert first.extensions["singleflight"] == "leader"
        assert second.extensions["singleflight"] == "cache"
        assert second.content == first.content and second.request is not first.request
        clock.now = 5.0
        third = await c.get("/ttl")
        assert third.extensions["singleflight"] == "leader" and upstream.hits("/ttl") == 2
        assert third.json()["hit"] == 2
    assert t.stats.cache_hits == 1 and t.stats.leaders == 2


async def test_ttl_counts_from_completion(upstream):
    clock = Clock()
    t = AsyncSingleflightTransport(cache=TTLCache(maxsize=16, ttl=5, timer=clock))
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        pending = asyncio.ensure_future(c.get("/done?gate=done"))
        await upstream.wait_for_hits_async(1, "/done")
        clock.now = 100.0  # the response takes "100 s" to arrive
        upstream.open_gate("done")
        await pending
        clock.now = 104.9
        assert (await c.get("/done?gate=done")).extensions["singleflight"] == "cache"
        clock.now = 105.0
        assert (await c.get("/done?gate=done")).extensions["singleflight"] == "leader"


async def test_cached_compressed_body_still_decodes_once(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        first = await c.get("/gz?encoding=gzip")
        again = await c.get("/gz?encoding=gzip")
    assert again.extensions["singleflight"] == "cache"
    assert again.json() == first.json() and again.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("status=500", {}),
        ("status=503", {}),
        ("status=201", {}),
        ("status=206", {"Range": "bytes=0-3"}),
        ("cache_control=no-store", {}),
        ("cache_control=private,max-age=60", {}),
        ("cache_control=no-cache", {}),
        ("vary=*", {}),
        ("set_cookie=a=b", {}),
        ("", {"Cache-Control": "no-store"}),
        ("", {"Cache-Control": "private"}),
        ("", {"Pragma": "no-cache"}),
    ],
)
async def test_never_cached(upstream, query, headers):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        for _ in range(2):
            r = await c.get(f"/nc?{query}", headers=headers)
            assert r.extensions["singleflight"] == "leader"
    assert upstream.hits("/nc") == 2 and len(t.group.cache) == 0


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 404, 405, 410, 414, 501])
async def test_cacheable_statuses_are_cached(upstream, status):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        await c.get(f"/ok?status={status}")
        r = await c.get(f"/ok?status={status}")
    assert r.status_code == status and r.extensions["singleflight"] == "cache"
    assert upstream.hits("/ok") == 1


async def test_maxsize_bounds_the_cache(upstream):
    t = AsyncSingleflightTransport(ttl=60, maxsize=2)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        for i in range(5):
            await c.get(f"/ms{i}")
    assert len(t.group.cache) == 2


async def test_concurrent_misses_fly_once_then_hit(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        tasks = [asyncio.ensure_future(c.get("/cm?gate=cm")) for _ in range(10)]
        await wait_until(lambda: t.stats.calls == 10)
        upstream.open_gate("cm")
        await asyncio.gather(*tasks)
        later = await asyncio.gather(*[c.get("/cm?gate=cm") for _ in range(10)])
    assert upstream.hits("/cm") == 1
    assert {r.extensions["singleflight"] for r in later} == {"cache"}


def test_sync_transport_cache_is_thread_safe(upstream):
    from concurrent.futures import ThreadPoolExecutor

    t = SingleflightTransport(ttl=60, maxsize=8)
    with httpx.Client(transport=t, base_url=upstream.url) as c:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: c.get(f"/st{i % 12}").status_code, range(400)))
    assert set(results) == {200}
    assert len(t.group.cache) <= 8


class FakeTier:
    """A Tier stand-in (no Redis): stores encoded Snapshots, serves them as "shared"."""

    def __init__(self) -> None:
        self.store: dict[object, bytes] = {}

    async def run(self, key, produce, codec, cacheable):
        if key in self.store:
            return codec.decode(self.store[key]), "shared"
        value = await produce()
        if type(value).__name__ != "Unshared" and (cacheable is None or cacheable(value)):
            self.store[key] = codec.encode(value)
        return value, "leader"


async def test_tier_stores_encoded_snapshots_and_its_roles_pass_through(upstream):
    tier = FakeTier()
    t = AsyncSingleflightTransport(tier=tier)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        first = await c.get("/tier?encoding=gzip")
        second = await c.get("/tier?encoding=gzip")
        cookie = [await c.get("/tier?set_cookie=a=b") for _ in range(2)]
    assert first.extensions["singleflight"] == "leader"
    assert second.extensions["singleflight"] == "shared"
    assert second.json() == first.json() and second.headers["content-encoding"] == "gzip"
    assert [r.extensions["singleflight"] for r in cookie] == ["leader", "leader"]
    assert upstream.hits("/tier") == 3 and len(tier.store) == 1
    (blob,) = tier.store.values()
    assert blob.startswith(b"SFSN")
