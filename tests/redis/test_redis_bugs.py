"""Regression tests for the tier bugs of issue 14 (section 3); each failed before its fix.

1. A caller's own read timeout bounds its wait on another process's flight (httpx, aiohttp).
2. A response the tier does not hand to a caller is closed (an unshareable SWR refresh, and a
   leader cancelled while the tier settles): with max_connections=1 no PoolTimeout follows.
3. A foreign value type under one key (WRONGTYPE) is a miss for that key only.
4. Pool exhaustion is back-pressure (wait for a connection), not "Redis is down".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer, timeout

from singleflight import Group
from singleflight._redis._format import Keys, key_digest
from singleflight._redis._protocol import Eval
from singleflight.aiohttp import SingleflightMiddleware
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport
from singleflight.redis import RedisTier
from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def make_tier(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> AsyncIterator[Callable[..., RedisTier]]:
    made: list[tuple[RedisTier, aioredis.Redis]] = []

    def make(client_options: dict[str, Any] | None = None, **options: Any) -> RedisTier:
        client = aioredis.Redis(port=redis_server.port, **(client_options or {}))
        made.append((RedisTier(client, **options), client))
        return made[-1][0]

    yield make
    for tier, client in made:
        await tier.aclose()
        await client.aclose()


# -- 1. the caller's own read timeout --------------------------------------------------------


async def test_httpx_read_timeout_bounds_the_wait_on_another_process(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream
) -> None:
    url = f"{upstream.url}/held?gate=held"
    a = httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=make_tier()), timeout=30)
    b = httpx.AsyncClient(
        transport=AsyncSingleflightTransport(tier=make_tier()),
        timeout=httpx.Timeout(30, read=0.5),
    )
    try:
        lead = asyncio.create_task(a.get(url))
        await upstream.wait_for_hits_async(1, "/held")
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match="read timeout"):
            async with timeout(5):
                await b.get(url)
        assert time.monotonic() - t0 < 2.0
        upstream.open_gate("held")
        assert (await lead).status_code == 200
        assert upstream.hits("/held") == 1  # the impatient caller made no call of its own
    finally:
        await a.aclose()
        await b.aclose()


async def test_aiohttp_sock_read_bounds_the_wait_on_another_process(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream
) -> None:
    url = f"{upstream.url}/held?gate=held2"
    a = aiohttp.ClientSession(middlewares=(SingleflightMiddleware(tier=make_tier()),))
    b = aiohttp.ClientSession(
        middlewares=(SingleflightMiddleware(tier=make_tier()),),
        timeout=aiohttp.ClientTimeout(total=30, sock_read=0.5),
    )

    async def get(session: aiohttp.ClientSession) -> int:
        async with session.get(url) as response:
            await response.read()
            return response.status

    try:
        lead = asyncio.create_task(get(a))
        await upstream.wait_for_hits_async(1, "/held")
        t0 = time.monotonic()
        with pytest.raises(aiohttp.ServerTimeoutError, match="sock_read"):
            async with timeout(5):
                await get(b)
        assert time.monotonic() - t0 < 2.0
        upstream.open_gate("held2")
        assert await lead == 200
        assert upstream.hits("/held") == 1
    finally:
        await a.close()
        await b.close()


# -- 2. responses nobody receives are closed -------------------------------------------------


def one_connection_client(tier: RedisTier) -> httpx.AsyncClient:
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    transport = AsyncSingleflightTransport(
        inner, tier=tier, key=lambda r: r.url.path, max_body_size=100_000
    )
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10, pool=1.0))


@pytest.mark.parametrize("unshareable", ["set_cookie=s%3D1", "size=200000"])
async def test_unshareable_stale_refresh_is_closed(
    make_tier: Callable[..., RedisTier],
    upstream: LoopbackUpstream,
    redis_sync: redis.Redis,
    unshareable: str,
) -> None:
    tier = make_tier(ttl=0.2, stale_ttl=30)
    async with one_connection_client(tier) as client:
        assert (await client.get(f"{upstream.url}/swr")).extensions["singleflight"] == "leader"
        [name] = list(redis_sync.scan_iter(match="sf:*:v"))
        await asyncio.sleep(max(redis_sync.pttl(name) - 30_000, 0) / 1000 + 0.01)  # now stale
        # The same key (key= is the path); the refresh's response is not shareable.
        stale = await client.get(f"{upstream.url}/swr?{unshareable}")
        assert stale.extensions["singleflight"] == "stale"
        async with timeout(10):
            await asyncio.gather(*list(tier._io.tasks))  # type: ignore[union-attr]
        assert upstream.hits("/swr") == 2
        # The refresh's response was closed, so the one connection is free again.
        assert (await client.get(f"{upstream.url}/other")).status_code == 200


async def test_leader_cancelled_while_the_tier_settles_closes_its_response(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream
) -> None:
    tier = make_tier()
    io: Any = tier._io
    settling, hold = asyncio.Event(), asyncio.Event()
    op = io._op

    async def slow_finish(call: Any) -> Any:
        if isinstance(call, Eval) and call.script == "finish" and not hold.is_set():
            settling.set()
            await hold.wait()
        return await op(call)

    io._op = slow_finish
    async with one_connection_client(tier) as client:
        task = asyncio.create_task(client.get(f"{upstream.url}/c?set_cookie=s%3D1"))
        async with timeout(5):
            await settling.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hold.set()
        assert (await client.get(f"{upstream.url}/other")).status_code == 200


# -- 3. a foreign value under one key --------------------------------------------------------


async def test_wrongtype_is_a_miss_for_that_key_only(
    make_tier: Callable[..., RedisTier],
    redis_sync: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_sync.rpush(Keys.of("sf", key_digest("bad")).value, "not ours")
    tier = make_tier()
    group = Group(tier=tier)

    async def work() -> str:
        return "fresh"

    with caplog.at_level(logging.WARNING, logger="singleflight.redis"):
        assert await group.do_with_role("bad", work) == ("fresh", "leader")
        assert await group.do_with_role("good", work) == ("fresh", "leader")
    assert redis_sync.exists(Keys.of("sf", key_digest("good")).value)  # Redis still in use
    assert tier.stats.redis_errors == 1 and tier.stats.fallbacks == 1
    assert "Redis is unavailable" not in caplog.text
    assert "WRONGTYPE" in caplog.text
    strict = make_tier(fail_open=False)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await Group(tier=strict).do("bad", work)


def test_wrongtype_is_a_miss_for_that_key_only_sync(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> None:
    redis_sync.rpush(Keys.of("sf", key_digest("bad")).value, "not ours")
    client = redis_server.sync_client()
    tier = RedisTier(client, stale_ttl=5)  # LOOKUP (a script) meets the list this time
    try:
        group = Group(tier=tier)
        assert group.do_sync_with_role("bad", lambda: "fresh") == ("fresh", "leader")
        assert group.do_sync_with_role("good", lambda: "fresh") == ("fresh", "leader")
        assert redis_sync.exists(Keys.of("sf", key_digest("good")).value)
        assert tier.stats.redis_errors == 1
    finally:
        tier.close()
        client.close()


# -- 4. pool exhaustion is back-pressure -----------------------------------------------------


async def test_pool_exhaustion_waits_for_a_connection(
    make_tier: Callable[..., RedisTier],
    redis_sync: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tier = make_tier({"max_connections": 3})
    group = Group(tier=tier)

    async def work() -> str:
        await asyncio.sleep(0.01)
        return "v"

    with caplog.at_level(logging.WARNING, logger="singleflight.redis"):
        async with timeout(10):
            got = await asyncio.gather(*(group.do(("k", i), work) for i in range(20)))
    assert got == ["v"] * 20
    assert "Redis is unavailable" not in caplog.text
    assert tier.stats.redis_errors == 0 and tier.stats.fallbacks == 0
    assert len(list(redis_sync.scan_iter(match="sf:*:v"))) == 20


def test_pool_exhaustion_waits_for_a_connection_sync(
    redis_server: RedisServer, redis_sync: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis(port=redis_server.port, max_connections=3, socket_timeout=5)
    tier = RedisTier(client)
    group = Group(tier=tier)
    barrier = threading.Barrier(20, timeout=10)

    def call(i: int) -> str:
        barrier.wait()
        return group.do_sync(("k", i), lambda: "v")

    try:
        with caplog.at_level(logging.WARNING, logger="singleflight.redis"):
            with ThreadPoolExecutor(20) as pool:
                assert list(pool.map(call, range(20))) == ["v"] * 20
        assert "Redis is unavailable" not in caplog.text
        assert tier.stats.redis_errors == 0 and tier.stats.fallbacks == 0
        assert len(list(redis_sync.scan_iter(match="sf:*:v"))) == 20
    finally:
        tier.close()
        client.close()


def test_sync_read_timeout_bounds_the_wait_on_another_process(
    redis_server: RedisServer, upstream: LoopbackUpstream
) -> None:
    # The sync transport: the thread that waits for another process's flight gives up after
    # its own read timeout; a local follower with a longer one is re-elected and keeps waiting.
    url = f"{upstream.url}/held?gate=held3"
    clients = [redis_server.sync_client() for _ in range(2)]
    tiers = [RedisTier(c) for c in clients]
    a = httpx.Client(transport=SingleflightTransport(tier=tiers[0]), timeout=30)
    b = httpx.Client(transport=SingleflightTransport(tier=tiers[1]))
    try:
        with ThreadPoolExecutor(3) as pool:
            lead = pool.submit(a.get, url)
            upstream.wait_for_hits(1, "/held")
            t0 = time.monotonic()
            short = pool.submit(b.get, url, timeout=httpx.Timeout(30, read=0.5))
            deadline = time.monotonic() + 5
            while tiers[1].stats.remote_follows == 0:  # b's local leader follows a's flight
                assert time.monotonic() < deadline
                time.sleep(0.005)
            patient = pool.submit(b.get, url, timeout=30)
            with pytest.raises(httpx.ReadTimeout):
                short.result(10)
            assert time.monotonic() - t0 < 2.5
            upstream.open_gate("held3")
            assert lead.result(10).status_code == 200
            got = patient.result(10)
            # It followed a's flight ("remote"), or, re-elected just after a's value landed,
            # read it from L2 ("shared"): either way no second upstream call (below).
            assert got.status_code == 200
            assert got.extensions["singleflight"] in ("remote", "shared")
        assert upstream.hits("/held") == 1
    finally:
        a.close()
        b.close()
        for tier, client in zip(tiers, clients, strict=True):
            tier.close()
            client.close()
