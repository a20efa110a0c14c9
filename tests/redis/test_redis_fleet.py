"""The Redis tier across real OS processes: a fleet of workers behind one start gate."""

from __future__ import annotations

import collections
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from redis_fleet import Fleet

from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _reap_fleets() -> Iterator[None]:
    yield
    while Fleet.live:  # a failed test may leave workers running: end them by PID
        Fleet.live[0].kill()


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
        # Digests are hex and may contain e.g. "500" by chance: look outside them only.
        readable = re.sub(r"[0-9a-f]{16,}", "<digest>", name)
        for secret in secrets:
            assert secret not in readable, (secret, name)


@pytest.mark.parametrize("mode", ["httpx", "aiohttp", "group"])
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


def test_errors_and_error_statuses_across_the_fleet(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    # A 500 is a response like any other: one call, shared with the fleet, never cached.
    url = f"{upstream.url}/500?status=500&delay=0.3"
    results = Fleet(redis_server.url, 4, "--url", url, "--requests", "5").run()
    assert upstream.hits("/500") == 1
    assert {r["status"] for w in results for r in w["results"]} == {500}
    assert not list(redis_sync.scan_iter(match="*:v"))
    # A connection reset is an exception: it does not travel between processes. Remote
    # followers try one more flight, then make their own call, so every caller gets its own
    # error and upstream sees at most one call per process plus the retry.
    url = f"{upstream.url}/reset?reset=10&delay=0.3"
    results = Fleet(redis_server.url, 4, "--url", url, "--requests", "5").run()
    errors = {r.get("error") for w in results for r in w["results"]}
    assert errors == {"RemoteProtocolError"}, errors
    assert 1 <= upstream.hits("/reset") <= 4 + 1
    assert_clean(redis_sync, "reset", "500")


def test_different_credentials_one_call_each(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    url = f"{upstream.url}/private?delay=0.3"
    tokens = ["Bearer alice-s3cr3t", "Bearer bob-s3cr3t"]
    fleets = [
        Fleet(redis_server.url, 3, "--url", url, "--auth", token, "--requests", "10")
        for token in tokens
    ]
    for fleet in fleets:
        fleet.wait_ready()
    for fleet in fleets:
        fleet.go()
    results = [fleet.results() for fleet in fleets]
    assert upstream.hits("/private") == 2
    for token, fleet_results in zip(tokens, results, strict=True):
        for body in bodies(fleet_results):
            assert json.loads(body)["who"]["authorization"] == token  # nobody got another's
    assert_clean(redis_sync, "private", "s3cr3t", "alice", "Bearer")


def test_fresh_process_hits_l2_until_ttl(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    url = f"{upstream.url}/l2"
    args = ("--url", url, "--requests", "20", "--ttl", "5")
    first = Fleet(redis_server.url, 2, *args).run()
    assert upstream.hits("/l2") == 1
    [fresh] = Fleet(redis_server.url, 1, *args).run()
    assert upstream.hits("/l2") == 1
    assert roles([fresh]) == {"shared": 1, "follower": 19}
    assert bodies([fresh]) == bodies(first)
    # After the TTL (measured on Redis's clock) the next process calls upstream again.
    [name] = [k for k in redis_sync.scan_iter(match="sf:*:v")]
    time.sleep(max(redis_sync.pttl(name), 0) / 1000 + 0.01)
    assert not redis_sync.exists(name)
    [later] = Fleet(redis_server.url, 1, *args).run()
    assert upstream.hits("/l2") == 2
    assert roles([later]) == {"leader": 1, "follower": 19}
    assert_clean(redis_sync, "/l2", "127.0.0.1")


def test_sigkill_of_the_fleet_leader_is_taken_over(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    lease_ttl, poll_max, delay = 2.0, 0.5, 2.0  # lease_ttl: above loaded-CI loop stalls
    url = f"{upstream.url}/crash?delay={delay}"
    fleet = Fleet(
        redis_server.url, 6, "--url", url, "--requests", "20",
        "--lease-ttl", str(lease_ttl), "--poll-max", str(poll_max),
    )  # fmt: skip
    fleet.wait_ready()
    fleet.go()
    upstream.wait_for_hits(1, "/crash", timeout=20)
    leader_pid = int(upstream.requests("/crash")[0].header("x-request-id") or 0)
    [leader] = [p for p in fleet.procs if p.pid == leader_pid]
    leader.send_signal(signal.SIGKILL)
    killed_at = time.time()
    results = fleet.results(allow_killed=True)
    assert len(results) == 5
    assert upstream.hits("/crash") <= 2
    bound = lease_ttl + poll_max * 1.2 + delay
    slowest = max(r["t_end"] for w in results for r in w["results"]) - killed_at
    assert slowest < bound + 2.0, (slowest, bound)  # + slack for a loaded CI machine
    assert sum(w["stats"]["takeovers"] for w in results) == 1
    assert len(bodies(results)) == 1
    assert_clean(redis_sync, "crash")


def test_renewal_keeps_one_call_on_a_slow_upstream(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    # Upstream takes 4 lease periods: without renewal the lease would expire after 1 s and a
    # follower would call upstream again. (lease_ttl stays well above the scheduling delays
    # of a loaded CI machine: a renewal that runs 0.7 s late is a lost lease.)
    url = f"{upstream.url}/slow?delay=4"
    fleet = Fleet(
        redis_server.url, 4, "--url", url, "--requests", "5", "--lease-ttl", "1",
        "--poll-max", "0.2",
    )  # fmt: skip
    results = fleet.run()
    assert upstream.hits("/slow") == 1
    assert sum(w["stats"]["lease_lost"] for w in results) == 0
    assert sum(w["stats"]["takeovers"] for w in results) == 0
    assert_clean(redis_sync, "slow")


def test_killed_pubsub_connections_still_finish(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    poll_max, delay = 0.5, 1.5
    url = f"{upstream.url}/pubsub?delay={delay}"
    fleet = Fleet(redis_server.url, 6, "--url", url, "--requests", "5", "--poll-max", str(poll_max))
    fleet.wait_ready()
    fleet.go()
    upstream.wait_for_hits(1, "/pubsub", timeout=20)
    deadline = time.monotonic() + 10
    while True:  # until the five followers have subscribed (bounded)
        channels = redis_sync.pubsub_channels("sf:*")
        if channels and redis_sync.pubsub_numsub(*channels)[0][1] == 5:
            break
        assert time.monotonic() < deadline, "followers never subscribed"
        time.sleep(0.01)
    killed = redis_sync.client_kill_filter(_type="pubsub")
    killed_at = time.time()
    assert killed == 5
    results = fleet.results()
    assert upstream.hits("/pubsub") == 1
    slowest = max(r["t_end"] for w in results for r in w["results"]) - killed_at
    assert slowest < delay + poll_max * 1.2 + 2.0  # + slack for a loaded CI machine
    assert_clean(redis_sync, "pubsub")


def test_stale_while_revalidate_across_the_fleet(
    redis_server: RedisServer, redis_sync: redis.Redis, upstream: LoopbackUpstream
) -> None:
    delay = 1.0
    url = f"{upstream.url}/swr?delay={delay}"
    args = ("--url", url, "--ttl", "0.5", "--stale-ttl", "30", "--requests", "20", "--linger")
    [first] = Fleet(redis_server.url, 1, *args).run()
    assert upstream.hits("/swr") == 1
    [name] = list(redis_sync.scan_iter(match="sf:*:v"))
    time.sleep(max(redis_sync.pttl(name) - 30_000, 0) / 1000 + 0.01)  # fresh part is over
    results = Fleet(redis_server.url, 6, *args).run()
    assert roles(results) == {"stale": 6, "follower": 114}
    assert all(w["wall"] < delay for w in results), [w["wall"] for w in results]
    assert bodies(results) == bodies([first])
    assert upstream.hits("/swr") == 2  # exactly one refresh (each worker let it finish)
    assert sum(w["stats"]["refreshes"] for w in results) == 1
    [after] = Fleet(redis_server.url, 1, *args).run()
    assert json.loads(bodies([after]).pop())["hit"] == 2  # the refreshed body
    # ("stale" again if this process started later than the new value's 0.5 s of freshness)
    assert set(roles([after])) in ({"shared", "follower"}, {"stale", "follower"})
    assert_clean(redis_sync, "swr")


def test_redis_stopped_requests_still_succeed(tmp_path: Path, upstream: LoopbackUpstream) -> None:
    server = RedisServer(tmp_path).start()
    url_of_redis = server.url
    server.stop()  # the fleet starts against a Redis that is down
    url = f"{upstream.url}/down?delay=0.3"
    fleet = Fleet(url_of_redis, 3, "--url", url, "--requests", "20", stdin_gate=True)
    fleet.go()
    results = fleet.results()
    assert upstream.hits("/down") == 3  # coalesced in each process
    for w in results:
        assert roles([w]) == {"leader": 1, "follower": 19}
        assert w["stats"]["redis_errors"] == 1 and w["stats"]["fallbacks"] >= 1
    for err in fleet.stderr.values():
        assert err.count("coalescing in this process only") == 1, err
