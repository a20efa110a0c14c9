"""The tier on a real Redis Cluster across real OS processes, async and sync, and a failover.

Each test prints what it measured (``pytest -s``); the failover numbers go to docs/redis.md.
"""

from __future__ import annotations

import collections
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisCluster
from redis_fleet import Fleet

from singleflight.testing import LoopbackUpstream

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _reap_fleets() -> Iterator[None]:
    yield
    while Fleet.live:  # a failed test may leave workers running: end them by PID
        Fleet.live[0].kill()


def fleets(*groups: Fleet) -> list[list[dict[str, Any]]]:
    """Start several fleets behind their gates at once; the results of each."""
    for fleet in groups:
        fleet.wait_ready()
    for fleet in groups:
        fleet.go()
    return [fleet.results(timeout=90) for fleet in groups]


def calls(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for w in results for r in w["results"]]


def values_per_master(cluster: RedisCluster) -> list[int]:
    out = []
    for node in cluster.masters():
        client = node.sync_client()
        try:
            out.append(len(list(client.scan_iter(match="sf:*:v", count=1000))))
        finally:
            client.close()
    return out


def test_cluster_fleet_async_and_sync_one_call_per_key(
    cluster: RedisCluster, upstream: LoopbackUpstream
) -> None:
    keys = 12
    url = f"{upstream.url}/ck?delay=0.3"
    args = ("--cluster", "--url", url, "--requests", "20", "--keys", str(keys))
    a, s = fleets(
        Fleet(cluster.url, 3, *args, "--mode", "httpx"),
        Fleet(cluster.url, 3, *args, "--mode", "sync"),
    )
    done = calls(a + s)
    assert len(done) == 120 and not [r for r in done if r.get("error")]
    for i in range(keys):
        assert upstream.hits(f"/ck/{i}") == 1, (i, upstream.hits(f"/ck/{i}"))
    for r in done:  # every caller got the body of its own URL
        assert json.loads(r["body"])["path"] == r["url"].split("?")[0].removeprefix(upstream.url)
    assert sum(w["stats"]["fleet_leads"] for w in a + s) == keys
    assert sum(w["stats"]["remote_follows"] for w in s) > 0  # sync processes followed too
    per_master = values_per_master(cluster)
    assert len(per_master) == 3 and all(per_master), per_master  # keys on every master
    # L2 across processes: new processes (one of each kind) make no upstream call.
    a2, s2 = fleets(
        Fleet(cluster.url, 1, *args, "--mode", "httpx"),
        Fleet(cluster.url, 1, *args, "--mode", "sync"),
    )
    roles = collections.Counter(r["role"] for r in calls(a2 + s2))
    assert upstream.hits() == keys
    assert set(roles) <= {"shared", "follower"} and roles["shared"] >= 2 * keys, roles


def test_cluster_leader_sigkill_is_taken_over(
    cluster: RedisCluster, upstream: LoopbackUpstream
) -> None:
    lease_ttl, poll_max, delay = 2.0, 0.5, 2.0
    url = f"{upstream.url}/crash?delay={delay}"
    # Sync processes: the async ones are SIGKILLed in test_redis_fleet.py.
    fleet = Fleet(
        cluster.url, 4, "--cluster", "--url", url, "--requests", "10", "--mode", "sync",
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
    assert len(results) == 3
    assert upstream.hits("/crash") <= 2
    slowest = max(r["t_end"] for r in calls(results)) - killed_at
    assert slowest < lease_ttl + poll_max * 1.2 + delay + 2.0, slowest
    assert sum(w["stats"]["takeovers"] for w in results) == 1
    assert len({r["body"] for r in calls(results)}) == 1


def test_cluster_master_killed_mid_run(
    tmp_path: Path, upstream: LoopbackUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = RedisCluster(tmp_path).start()
    try:
        _failover(cluster, upstream, capsys)
    finally:
        cluster.stop()


def _failover(
    cluster: RedisCluster, upstream: LoopbackUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    # Long enough for promotion (~4 s) plus the tier's back-off (1, 2, 4 s) even under load.
    keys, duration = 6, 15.0
    url = f"{upstream.url}/fo?delay=0.1"
    args = ("--cluster", "--url", url, "--requests", "12", "--keys", str(keys))
    args += ("--duration", str(duration), "--lease-ttl", "2", "--poll-max", "0.3")
    groups = [
        Fleet(cluster.url, 2, *args, "--mode", "httpx"),
        Fleet(cluster.url, 2, *args, "--mode", "sync"),
    ]
    for fleet in groups:
        fleet.wait_ready()
    for fleet in groups:
        fleet.go()
    upstream.wait_for_hits(3 * keys, timeout=20)  # a few rounds with every master
    victim = cluster.masters()[0]
    victim.kill()
    killed_at = time.time()
    results = [w for fleet in groups for w in fleet.results(timeout=90)]
    cluster.wait_ok()  # the replica was promoted (bounded)

    done = calls(results)
    assert not [r for r in done if r.get("error")], [r for r in done if r.get("error")][:3]
    for r in done:  # never a wrong or partial body
        path = r["url"].split("?")[0].removeprefix(upstream.url)
        assert json.loads(r["body"])["path"] == path
    # Each (round, key) URL: one upstream call with the fleet; while Redis was unusable,
    # at most one per process (local coalescing).
    hits = collections.Counter(q.path for q in upstream.requests())
    assert max(hits.values()) <= len(results), hits.most_common(3)
    extra = sum(hits.values()) - len(hits)
    rounds = [r for w in results for r in w["rounds"]]
    fallen = [r for r in rounds if r["fallbacks"]]
    assert fallen, "the kill never made a caller fall back"
    window = max(r["t1"] for r in fallen) - min(r["t0"] for r in fallen)
    # After promotion the same tiers coalesce across the fleet again, without a restart.
    last = [w["rounds"][-1] for w in results]
    assert all(r["fallbacks"] == 0 for r in last), last
    assert all(r["t0"] > killed_at for r in last)
    late = [r for w in results for r in w["rounds"] if r["t0"] > max(x["t1"] for x in fallen)]
    assert late and sum(r["fleet_leads"] + r["shared_hits"] + r["remote_follows"] for r in late)
    with capsys.disabled():
        print(
            f"\nfailover: {len(hits)} (round, key) URLs, {sum(hits.values())} upstream calls, "
            f"{extra} extra; fleet coalescing lost for {window:.1f}s "
            f"(from {min(r['t0'] for r in fallen) - killed_at:+.1f}s after the kill)"
        )
