"""RedisTier on a real 6-node Redis Cluster (3 masters, 3 replicas), in one process.

Fleet behaviour with real OS processes, and a master killed mid-run, is in
test_redis_cluster_fleet.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisCluster

from singleflight import Group
from singleflight._redis._format import Keys, key_digest
from singleflight.redis import RedisTier

pytestmark = pytest.mark.timeout(60)


def spread_keys(cluster: RedisCluster, n_per_master: int = 2) -> list[str]:
    """Keys whose names land on every master of the cluster, ``n_per_master`` each."""
    client = cluster.sync_client()
    try:
        per_node: dict[str, list[str]] = {}
        i = 0
        while (
            min((len(v) for v in per_node.values()), default=0) < n_per_master or len(per_node) < 3
        ):
            key = f"key-{i}"
            i += 1
            node = client.get_node_from_key(Keys.of("sf", key_digest(key)).value)
            per_node.setdefault(node.name, []).append(key)
        return [k for keys in per_node.values() for k in keys[:n_per_master]]
    finally:
        client.close()


async def shard_channels(cluster: RedisCluster, n: int) -> int:
    """How many sharded channels the masters have, once ``n`` (or after 10 s); no plain ones."""
    deadline = time.monotonic() + 10
    while True:
        found, plain = 0, 0
        for node in cluster.masters():
            client = node.sync_client()
            try:
                found += len(client.execute_command("PUBSUB", "SHARDCHANNELS"))
                plain += len(client.pubsub_channels())
            finally:
                client.close()
        assert plain == 0
        if found >= n or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)


@pytest.fixture
def sync_tiers(cluster: RedisCluster) -> Iterator[Callable[..., RedisTier]]:
    made: list[tuple[RedisTier, redis.RedisCluster]] = []

    def make(**options: Any) -> RedisTier:
        client = cluster.sync_client(socket_timeout=5)
        tier = RedisTier(client, **options)
        made.append((tier, client))
        return tier

    yield make
    for tier, client in made:
        tier.close()
        client.close()


def test_every_name_of_a_key_shares_one_slot(cluster: RedisCluster) -> None:
    client = cluster.sync_client()
    try:
        for key in spread_keys(cluster):
            keys = Keys.of("sf", key_digest(key))
            names = [keys.value, keys.lease, keys.channel, keys.result("t" * 32)]
            slots = {client.cluster_keyslot(name) for name in names}
            assert len(slots) == 1, (key, slots)
    finally:
        client.close()


def test_async_tiers_on_a_cluster_share_flights_on_every_master(cluster: RedisCluster) -> None:
    keys = spread_keys(cluster)

    async def main() -> None:
        ca = aioredis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        cb = aioredis.RedisCluster(host="127.0.0.1", port=cluster.ports[1])
        a, b = RedisTier(ca), RedisTier(cb)
        calls: list[str] = []
        gate = asyncio.Event()
        try:

            async def work(key: str) -> str:
                calls.append(key)
                await gate.wait()
                return f"v-{key}"

            leads = [asyncio.ensure_future(Group(tier=a).do_with_role(k, work, k)) for k in keys]
            while len(calls) < len(keys):
                await asyncio.sleep(0.005)
            follows = [asyncio.ensure_future(Group(tier=b).do_with_role(k, work, k)) for k in keys]
            deadline = time.monotonic() + 10
            while b.stats.remote_follows < len(keys):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            # The followers wait on sharded channels (SSUBSCRIBE), never on plain ones.
            assert await shard_channels(cluster, len(keys)) == len(keys)
            gate.set()
            assert [await f for f in leads] == [(f"v-{k}", "leader") for k in keys]
            assert [await f for f in follows] == [(f"v-{k}", "remote") for k in keys]
            assert sorted(calls) == sorted(keys)
            # L2 on every master
            for k in keys:
                assert await Group(tier=b).do_with_role(k, work, k) == (f"v-{k}", "shared")
        finally:
            await a.aclose()
            await b.aclose()
            await ca.aclose()
            await cb.aclose()

    asyncio.run(main())


def test_sync_tiers_on_a_cluster_share_flights_on_every_master(
    sync_tiers: Callable[..., RedisTier], cluster: RedisCluster
) -> None:
    keys = spread_keys(cluster)
    a, b = sync_tiers(), sync_tiers()
    gate = threading.Event()
    started: list[str] = []

    def work(key: str) -> str:
        started.append(key)
        assert gate.wait(20)
        return f"v-{key}"

    with ThreadPoolExecutor(2 * len(keys)) as pool:
        leads = [pool.submit(Group(tier=a).do_sync_with_role, k, work, k) for k in keys]
        deadline = time.monotonic() + 10
        while len(started) < len(keys):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        follows = [pool.submit(Group(tier=b).do_sync_with_role, k, work, k) for k in keys]
        while b.stats.remote_follows < len(keys):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert len([t for t in threading.enumerate() if t.name == "sf-redis-sub"]) >= 1
        gate.set()
        assert [f.result(10) for f in leads] == [(f"v-{k}", "leader") for k in keys]
        assert [f.result(10) for f in follows] == [(f"v-{k}", "remote") for k in keys]
    assert sorted(started) == sorted(keys)
    for k in keys:
        assert Group(tier=b).do_sync_with_role(k, work, k) == (f"v-{k}", "shared")


def test_scripts_reload_on_the_keys_node_after_script_flush(
    sync_tiers: Callable[..., RedisTier], cluster: RedisCluster
) -> None:
    tier = sync_tiers()
    keys = spread_keys(cluster, 1)
    for k in keys:
        Group(tier=tier).do_sync(k, lambda: "x")
    for node in cluster.masters():
        client = node.sync_client()
        client.script_flush()
        client.close()
    for k in keys:  # NOSCRIPT on every master: loaded again where the key lives
        assert Group(tier=tier).do_sync_with_role(k, lambda: "y") == ("x", "shared")
    assert tier.stats.redis_errors == 0
