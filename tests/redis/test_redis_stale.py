"""Local (L1) staleness over the Redis tier (L2), through the httpx transport (issue 13).

Each transport has its own tier and Redis connection: two of them stand for two processes.
The L1 clock is the test's; the tier's times are Redis's own (real seconds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer, timeout

from singleflight._stale import StaleFront
from singleflight.httpx import AsyncSingleflightTransport
from singleflight.redis import RedisTier
from tests.stale_upstream import Answer, ScriptedUpstream, scripted_upstream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def up() -> Iterator[ScriptedUpstream]:
    yield from scripted_upstream()


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


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def clocked(transport: AsyncSingleflightTransport) -> tuple[Clock, StaleFront]:
    front = transport.group._front
    assert isinstance(front, StaleFront)
    clock = Clock()
    front._timer = clock
    return clock, front


async def until(predicate: Callable[[], bool]) -> None:
    async with timeout(10):
        while not predicate():
            await asyncio.sleep(0.002)


async def test_a_stale_l1_value_is_served_while_its_refresh_goes_through_the_tier(
    make_tier: Callable[..., RedisTier], up: ScriptedUpstream
) -> None:
    a = AsyncSingleflightTransport(ttl=10, stale_ttl=20, tier=make_tier(ttl=2, stale_ttl=60))
    b = AsyncSingleflightTransport(ttl=10, stale_ttl=20, tier=make_tier(ttl=2, stale_ttl=60))
    clock_a, front_a = clocked(a)
    async with httpx.AsyncClient(transport=a) as ca, httpx.AsyncClient(transport=b) as cb:
        r = await ca.get(up.url)
        assert (r.text, r.extensions["singleflight"]) == ("v1", "leader")
        r = await cb.get(up.url)  # the other process: from L2
        assert (r.text, r.extensions["singleflight"]) == ("v1", "shared")
        # L1 stale, L2 fresh: the stale answer at once, the refresh answered by L2.
        clock_a.now = 15
        gate = up.gate()
        up.answer = Answer(gate=gate)
        async with timeout(5):  # the upstream is held: nothing here waits for it
            r = await ca.get(up.url)
        assert (r.text, r.extensions["singleflight"]) == ("v1", "stale")
        await until(lambda: not front_a.tasks)
        r = await ca.get(up.url)
        assert (r.text, r.extensions["singleflight"]) == ("v1", "cache")  # L1 fresh again
        assert up.hits == 1
        # L1 and L2 both stale: still answered at once; one upstream refresh in all.
        time.sleep(2.1)  # Redis's own clock: past the tier's ttl (no event to wait for)
        clock_a.now = 30
        async with timeout(5):
            burst = await asyncio.gather(*[ca.get(up.url) for _ in range(20)])
        assert {(r.text, r.extensions["singleflight"]) for r in burst} == {("v1", "stale")}
        await until(lambda: up.hits == 2)
        gate.set()
        await until(lambda: not front_a.tasks)
        async with timeout(10):  # L1 refreshes again until L2 holds the new value
            while (r := await ca.get(up.url)).text != "v2":
                await until(lambda: not front_a.tasks)
        assert up.hits == 2
        assert a.group.in_flight == 0 and b.group.in_flight == 0
