"""The sync RedisTier (a redis.Redis client) against a real redis-server: threads, one process.

Two tiers with their own clients stand for two processes, as in test_redis_tier.py; a sync
tier and an async tier on one Redis share one flight and one value.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer, free_port

from singleflight import Group, singleflight
from singleflight._redis._format import Keys, key_digest
from singleflight.aiohttp import SingleflightMiddleware
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport
from singleflight.redis import RedisTier
from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(30)


class SyncWork:
    """A thread-safe upstream stand-in: counts calls; calls can be held until ``release()``."""

    def __init__(self, value: Any = "v", *, hold: bool = False) -> None:
        self.value = value
        self.calls = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
        self.started.set()
        assert self.gate.wait(20), "never released"
        return self.value

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def make_sync(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> Iterator[Callable[..., RedisTier]]:
    made: list[tuple[RedisTier, redis.Redis]] = []

    def make(**options: Any) -> RedisTier:
        client = redis.Redis(port=redis_server.port, socket_timeout=5)  # one per "process"
        tier = RedisTier(client, **options)
        made.append((tier, client))
        return tier

    yield make
    for tier, client in made:
        tier.close()
        client.close()


def sub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sf-redis-sub"]


def test_threads_of_two_processes_make_one_call(
    make_sync: Callable[..., RedisTier], redis_sync: redis.Redis
) -> None:
    a, b = make_sync(), make_sync()
    ga, gb = Group(tier=a), Group(tier=b)
    work = SyncWork({"n": 1}, hold=True)
    with ThreadPoolExecutor(20) as pool:
        futs = [pool.submit(ga.do_sync_with_role, "k", work) for _ in range(10)]
        assert work.started.wait(10)
        futs += [pool.submit(gb.do_sync_with_role, "k", work) for _ in range(10)]
        deadline = time.monotonic() + 10
        while b.stats.remote_follows == 0:  # b's local leader reached the remote flight
            assert time.monotonic() < deadline
            time.sleep(0.005)
        work.release()
        results = [f.result(10) for f in futs]
    assert work.calls == 1
    assert {v["n"] for v, _ in results} == {1}
    roles = sorted(r for _, r in results)
    assert roles.count("leader") == 1 and roles.count("remote") == 1, roles
    assert roles.count("follower") == 18
    assert len(sub_threads()) <= 1  # b's one subscriber thread, not one per caller
    # The value is now in Redis: a third "process" hits it.
    c = make_sync()
    assert Group(tier=c).do_sync_with_role("k", work) == ({"n": 1}, "shared")
    assert not list(redis_sync.scan_iter(match="*:lease"))


def test_one_subscriber_thread_for_many_waiting_keys(make_sync: Callable[..., RedisTier]) -> None:
    a, b = make_sync(), make_sync()
    works = [SyncWork(i, hold=True) for i in range(8)]
    before = len(sub_threads())
    with ThreadPoolExecutor(16) as pool:
        leads = [pool.submit(Group(tier=a).do_sync, ("k", i), w) for i, w in enumerate(works)]
        for w in works:
            assert w.started.wait(10)
        follows = [pool.submit(Group(tier=b).do_sync, ("k", i), w) for i, w in enumerate(works)]
        deadline = time.monotonic() + 10
        while b.stats.remote_follows < 8:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert len(sub_threads()) - before == 1
        for w in works:
            w.release()
        assert [f.result(10) for f in follows] == list(range(8))
        assert [f.result(10) for f in leads] == list(range(8))
    assert all(w.calls == 1 for w in works)


def test_sync_and_async_processes_share_one_flight_and_one_value(
    redis_server: RedisServer, make_sync: Callable[..., RedisTier]
) -> None:
    sync_tier = make_sync()
    work = SyncWork({"from": "sync"}, hold=True)
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(Group(tier=sync_tier).do_sync_with_role, "shared-key", work)
        assert work.started.wait(10)

        async def follow() -> tuple[Any, str]:
            client = aioredis.Redis(port=redis_server.port)
            tier = RedisTier(client)
            try:
                loop = asyncio.get_running_loop()
                loop.call_later(0.2, work.release)

                async def never() -> Any:
                    raise AssertionError("the async process must not call upstream")

                got = await Group(tier=tier).do_with_role("shared-key", never)
                hit = await Group(tier=tier).do_with_role("shared-key", never)
                assert hit == ({"from": "sync"}, "shared")
                return got
            finally:
                await tier.aclose()
                await client.aclose()

        assert asyncio.run(follow()) == ({"from": "sync"}, "remote")
        assert lead.result(10) == ({"from": "sync"}, "leader")
    assert work.calls == 1

    # And the other way round: an async leader's value is a sync process's L2 hit.
    async def lead_async() -> None:
        client = aioredis.Redis(port=redis_server.port)
        tier = RedisTier(client)
        try:

            async def produce() -> str:
                return "from async"

            assert await Group(tier=tier).do_with_role("other", produce) == ("from async", "leader")
        finally:
            await tier.aclose()
            await client.aclose()

    asyncio.run(lead_async())
    assert Group(tier=make_sync()).do_sync_with_role("other", SyncWork()) == (
        "from async",
        "shared",
    )


def test_dead_leader_is_taken_over_within_lease_ttl(
    make_sync: Callable[..., RedisTier], redis_sync: redis.Redis
) -> None:
    tier = make_sync(lease_ttl=0.5, poll=(0.05, 0.1))
    keys = Keys.of("sf", key_digest("dead"))
    redis_sync.set(keys.lease, "somebody-who-died", px=500)  # a leader that never finishes
    t0 = time.monotonic()
    value, role = Group(tier=tier).do_sync_with_role("dead", SyncWork("mine"))
    assert (value, role) == ("mine", "leader")
    assert 0.3 < time.monotonic() - t0 < 2.0
    assert tier.stats.takeovers == 1


def test_renewal_keeps_a_slow_sync_leader_alone(make_sync: Callable[..., RedisTier]) -> None:
    a, b = make_sync(lease_ttl=0.3, poll=(0.05, 0.1)), make_sync(lease_ttl=0.3, poll=(0.05, 0.1))
    work = SyncWork("slow", hold=True)
    with ThreadPoolExecutor(2) as pool:
        lead = pool.submit(Group(tier=a).do_sync, "slow", work)
        assert work.started.wait(10)
        follow = pool.submit(Group(tier=b).do_sync_with_role, "slow", work)
        time.sleep(1.0)  # three lease periods pass while the leader works (what is tested)
        work.release()
        assert lead.result(10) == "slow"
        assert follow.result(10) == ("slow", "remote")
    assert work.calls == 1
    assert a.stats.lease_lost == 0 and b.stats.takeovers == 0


def test_stale_value_served_while_one_sync_refresh_runs(
    make_sync: Callable[..., RedisTier], redis_sync: redis.Redis
) -> None:
    tier = make_sync(ttl=0.2, stale_ttl=30)
    Group(tier=tier).do_sync("swr", SyncWork("old"))
    [name] = list(redis_sync.scan_iter(match="sf:*:v"))
    time.sleep(max(redis_sync.pttl(name) - 30_000, 0) / 1000 + 0.01)  # fresh part is over
    new = SyncWork("new", hold=True)
    other = make_sync(ttl=0.2, stale_ttl=30)
    assert Group(tier=tier).do_sync_with_role("swr", new) == ("old", "stale")
    assert Group(tier=other).do_sync_with_role("swr", new) == ("old", "stale")
    assert new.started.wait(10)
    new.release()
    tier._io.join_refreshes(10)  # type: ignore[union-attr]
    assert new.calls == 1 and tier.stats.refreshes == 1
    assert Group(tier=other).do_sync_with_role("swr", SyncWork()) == ("new", "shared")


def test_sync_tier_falls_back_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    tier = RedisTier(client)
    group = Group(tier=tier)
    assert group.do_sync_with_role("k", SyncWork("local")) == ("local", "leader")
    assert group.do_sync_with_role("k2", SyncWork("local")) == ("local", "leader")
    assert tier.stats.redis_errors == 1 and tier.stats.fallbacks == 2
    assert "coalescing in this process only" in caplog.text
    strict = RedisTier(client, fail_open=False)
    with pytest.raises(redis.ConnectionError):
        Group(tier=strict).do_sync("k", SyncWork())
    tier.close()
    client.close()


def test_sync_decorator_with_a_tier(make_sync: Callable[..., RedisTier]) -> None:
    a, b = make_sync(), make_sync()
    calls = []

    def load(name: str) -> dict[str, str]:
        calls.append(name)
        return {"name": name}

    fa = singleflight(tier=a)(load)
    fb = singleflight(tier=b)(load)
    assert fa("x") == {"name": "x"}
    assert fb("x") == {"name": "x"}  # another process: an L2 hit
    assert calls == ["x"] and b.stats.shared_hits == 1


def test_sync_transport_with_a_tier(
    make_sync: Callable[..., RedisTier], upstream: LoopbackUpstream
) -> None:
    a, b = make_sync(), make_sync()
    url = f"{upstream.url}/sync?delay=0.3"
    with (
        httpx.Client(transport=SingleflightTransport(tier=a)) as ca,
        httpx.Client(transport=SingleflightTransport(tier=b)) as cb,
        ThreadPoolExecutor(20) as pool,
    ):
        futs = [pool.submit((ca if i % 2 else cb).get, url) for i in range(20)]
        responses = [f.result(10) for f in futs]
        later = cb.get(url)
    assert upstream.hits("/sync") == 1
    assert len({r.text for r in responses}) == 1
    roles = sorted(r.extensions["singleflight"] for r in responses)
    assert roles.count("leader") == 1, roles
    assert later.extensions["singleflight"] == "shared" and later.text == responses[0].text


def test_mismatched_tier_raises_at_construction(
    redis_server: RedisServer, make_sync: Callable[..., RedisTier]
) -> None:
    sync_tier = make_sync()
    async_tier = RedisTier(aioredis.Redis(port=redis_server.port))

    async def af() -> None: ...

    def sf() -> None: ...

    for build in (
        lambda: AsyncSingleflightTransport(tier=sync_tier),
        lambda: SingleflightMiddleware(tier=sync_tier),
        lambda: singleflight(tier=sync_tier)(af),
    ):
        with pytest.raises(TypeError, match=r"sync client .*redis\.asyncio\.Redis\(\.\.\.\)"):
            build()
    for build in (
        lambda: SingleflightTransport(tier=async_tier),
        lambda: singleflight(tier=async_tier)(sf),
    ):
        with pytest.raises(TypeError, match=r"async client .*redis\.Redis\(\.\.\.\)"):
            build()
    with pytest.raises(TypeError, match=r"redis\.Redis\(\.\.\.\)"):
        Group(tier=async_tier).do_sync("k", sf)
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis\(\.\.\.\)"):
        asyncio.run(Group(tier=sync_tier).do("k", af))
