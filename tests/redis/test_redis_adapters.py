"""The Redis tier through the public adapters: httpx transport, aiohttp middleware, decorator.

Two clients with their own tier (and their own Redis connection) stand for two processes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer, timeout

from singleflight import singleflight
from singleflight.aiohttp import SingleflightMiddleware, served
from singleflight.httpx import AsyncSingleflightTransport
from singleflight.redis import RedisTier
from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def make_tier(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> AsyncIterator[Callable[..., RedisTier]]:
    made: list[tuple[RedisTier, aioredis.Redis]] = []

    def make(**options: Any) -> RedisTier:
        client = aioredis.Redis(port=redis_server.port)
        made.append((RedisTier(client, **options), client))
        return made[-1][0]

    yield make
    for tier, client in made:
        await tier.aclose()
        await client.aclose()


async def test_httpx_transport_across_two_processes(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream, redis_sync: redis.Redis
) -> None:
    clients = [
        httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=make_tier())) for _ in range(3)
    ]
    url = f"{upstream.url}/x?gate=x"
    try:
        first = [asyncio.create_task(clients[0].get(url)) for _ in range(5)]
        await upstream.wait_for_hits_async(1, "/x")
        second = [asyncio.create_task(clients[1].get(url)) for _ in range(5)]
        async with timeout(5):
            while not redis_sync.pubsub_channels():  # the second process follows remotely
                await asyncio.sleep(0.005)
        upstream.open_gate("x")
        async with timeout(10):
            r1 = await asyncio.gather(*first)
            r2 = await asyncio.gather(*second)
        assert Counter(r.extensions["singleflight"] for r in r1) == {"leader": 1, "follower": 4}
        assert Counter(r.extensions["singleflight"] for r in r2) == {"remote": 1, "follower": 4}
        third = await clients[2].get(url)
        assert third.extensions["singleflight"] == "shared"
        assert {r.content for r in [*r1, *r2, third]} == {r1[0].content}
        assert upstream.hits("/x") == 1
    finally:
        for client in clients:
            await client.aclose()


async def test_httpx_set_cookie_response_is_never_stored(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream, redis_sync: redis.Redis
) -> None:
    url = f"{upstream.url}/cookie?set_cookie=session%3Dabc"
    async with httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=make_tier())) as a:
        r = await a.get(url)
        assert r.headers["set-cookie"] == "session=abc"
    async with httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=make_tier())) as b:
        r = await b.get(url)
        assert r.extensions["singleflight"] == "leader"
    assert upstream.hits("/cookie") == 2
    for name in redis_sync.scan_iter(match="*"):
        assert b"session=abc" not in (redis_sync.get(name) or b"")


async def test_httpx_uncacheable_status_is_shared_not_stored(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream, redis_sync: redis.Redis
) -> None:
    url = f"{upstream.url}/err?status=503"
    async with httpx.AsyncClient(transport=AsyncSingleflightTransport(tier=make_tier())) as a:
        assert (await a.get(url)).status_code == 503
        assert (await a.get(url)).extensions["singleflight"] == "leader"
    assert upstream.hits("/err") == 2
    assert not list(redis_sync.scan_iter(match="*:v"))


async def test_aiohttp_middleware_across_two_processes(
    make_tier: Callable[..., RedisTier], upstream: LoopbackUpstream
) -> None:
    url = f"{upstream.url}/a?delay=0.3"
    sessions = [
        aiohttp.ClientSession(middlewares=(SingleflightMiddleware(tier=make_tier()),))
        for _ in range(2)
    ]

    async def get(session: aiohttp.ClientSession) -> tuple[str | None, bytes]:
        async with session.get(url) as response:
            return served(response), await response.read()

    try:
        async with timeout(10):
            results = await asyncio.gather(*(get(s) for s in sessions for _ in range(5)))
            later = await get(sessions[1])
        assert upstream.hits("/a") == 1
        assert len({body for _, body in [*results, later]}) == 1
        roles = Counter(role for role, _ in results)
        assert roles["leader"] == 1 and roles["follower"] == 8
        assert roles["remote"] + roles["shared"] == 1
        assert later[0] == "shared"
    finally:
        for session in sessions:
            await session.close()


async def test_decorator_with_a_tier(make_tier: Callable[..., RedisTier]) -> None:
    calls = 0

    def define(tier: RedisTier) -> Any:
        @singleflight(tier=tier)
        async def get_user(user_id: int) -> dict[str, Any]:
            nonlocal calls
            calls += 1
            return {"id": user_id, "name": "ada"}

        return get_user

    one, two = define(make_tier()), define(make_tier())
    assert await one(1) == {"id": 1, "name": "ada"}
    assert await two(1) == {"id": 1, "name": "ada"}  # another "process": from Redis
    assert calls == 1


async def test_decorated_functions_do_not_share_entries(
    make_tier: Callable[..., RedisTier],
) -> None:
    tier = make_tier()

    @singleflight(tier=tier)
    async def get_user(i: int) -> str:
        return f"user {i}"

    @singleflight(tier=tier)
    async def get_post(i: int) -> str:
        return f"post {i}"

    assert await get_user(1) == "user 1"
    assert await get_post(1) == "post 1"
