"""The Redis tier across real OS processes: a fleet of workers behind one start gate."""

from __future__ import annotations

import collections

import pytest
import redis
from conftest import RedisServer
from redis_fleet import Fleet

from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(90)


def roles(results: list[dict]) -> collections.Counter[str]:
    return collections.Counter(r["role"] for w in results for r in w["results"])


def bodies(results: list[dict]) -> set[str]:
    return {r["body"] for w in results for r in w["results"]}


def assert_clean(client: redis.Redis, *secrets: str) -> None:
    """No lease left, nobody subscribed, and no URL or credential in any key name."""
    names = [k.decode() for k in client.scan_iter(match="*", count=1000)]
    assert not [k for k in names if k.endswith(":lease")], names
    assert client.pubsub_channels() == []
    for name in names:
        for secret in secrets:
            assert secret not in name, (secret, name)


@pytest.mark.parametrize("mode", ["httpx", "group"])
def test_six_processes_one_upstream_call(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream, mode: str
) -> None:
    url = f"{upstream.url}/fleet?delay=0.3"
    fleet = Fleet(redis_server.url, 6, "--url", url, "--requests", "20", "--mode", mode)
    results = fleet.run()
    assert upstream.hits("/fleet") == 1
    assert len(bodies(results)) == 1
    counts = roles(results)
    assert sum(counts.values()) == 120
    assert counts["leader"] == 1, counts
    assert counts["follower"] + counts["remote"] + counts["shared"] == 119, counts
    assert sum(w["stats"]["fleet_leads"] for w in results) == 1
    assert_clean(redis_sync, "fleet", "127.0.0.1")
