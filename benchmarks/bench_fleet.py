"""Fleet benchmark for the Redis tier: single Redis and Redis Cluster, async and sync clients.

    python benchmarks/bench_fleet.py [--runs 5] [--processes 6] [--requests 20] [--delay 0.2]

Needs ``redis-server`` and ``redis-cli`` on PATH: it starts one server and one 6-node cluster
(3 masters, 3 replicas) on free loopback ports, and stops them by PID. Each run starts a fresh
fleet of worker processes (``tests/redis/worker.py``: httpx ``AsyncSingleflightTransport`` for
async, threads sharing an ``httpx.Client`` with ``SingleflightTransport`` for sync) behind one
start gate, each firing ``--requests`` identical GETs at a loopback upstream that answers after
``--delay`` seconds. Then, in this process, it times an L2 hit through the tier against a plain
redis-py ``GET`` of the same bytes with the same client. Prints medians and ratios as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from _common import table  # noqa: E402

from singleflight._redis._format import DEFAULT_CODEC, encode_record  # noqa: E402
from singleflight.redis import RedisTier  # noqa: E402
from singleflight.testing import LoopbackUpstream  # noqa: E402
from tests.redis.conftest import RedisCluster, RedisServer  # noqa: E402
from tests.redis.redis_fleet import Fleet  # noqa: E402


def fleet_run(
    redis_url: str, up: LoopbackUpstream, args: argparse.Namespace, *extra: str
) -> tuple[int, float]:
    path = f"/bench-{uuid.uuid4().hex[:8]}"  # fresh key: nothing cached from an earlier run
    fleet = Fleet(
        redis_url, args.processes,
        "--url", f"{up.url}{path}?delay={args.delay}", "--requests", str(args.requests), *extra,
    )  # fmt: skip
    try:
        results = fleet.run(timeout=120)
    finally:
        fleet.kill()
    start = min(w["t_start"] for w in results)
    end = max(r["t_end"] for w in results for r in w["results"])
    return up.hits(path), end - start


def _value() -> bytes:
    return b"x" * 1024


async def l2_async(client: Any, n: int, rounds: int) -> tuple[float, float]:
    """Median microseconds of an L2 hit through the tier, and of a plain GET (same client)."""
    tier = RedisTier(client, namespace="bench")

    async def produce() -> bytes:
        return _value()

    await tier.run("hot", produce, None, None)  # now an L2 hit
    await client.set("plain{x}", _value())
    tier_us, get_us = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            value, role = await tier.run("hot", produce, None, None)
        tier_us.append((time.perf_counter() - t0) / n * 1e6)
        assert role == "shared"
        t0 = time.perf_counter()
        for _ in range(n):
            await client.get("plain{x}")
        get_us.append((time.perf_counter() - t0) / n * 1e6)
    await tier.aclose()
    await client.aclose()
    return statistics.median(tier_us), statistics.median(get_us)


def l2_sync(client: Any, n: int, rounds: int) -> tuple[float, float]:
    """l2_async for a sync client (one thread)."""
    tier = RedisTier(client, namespace="bench")
    tier.run_sync("hot", _value, None, None)
    client.set("plain{x}", _value())
    tier_us, get_us = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            value, role = tier.run_sync("hot", _value, None, None)
        tier_us.append((time.perf_counter() - t0) / n * 1e6)
        assert role == "shared"
        t0 = time.perf_counter()
        for _ in range(n):
            client.get("plain{x}")
        get_us.append((time.perf_counter() - t0) / n * 1e6)
    tier.close()
    client.close()
    return statistics.median(tier_us), statistics.median(get_us)


class _NoIO:
    """A client stand-in that answers every GET with one stored record, without I/O."""

    record = encode_record("ok", DEFAULT_CODEC.encode(_value()))

    async def aget(self, name: str) -> bytes:
        return self.record


async def own_cpu(n: int) -> float:
    """The tier's own work per L2 hit (key digest, steps, record decode, timeout), no I/O."""
    client = aioredis.Redis()  # never connects: its GET is replaced below
    tier = RedisTier(client, namespace="bench")
    tier._io._client = type("C", (), {"get": _NoIO().aget})()  # type: ignore[union-attr]

    async def produce() -> bytes:
        raise AssertionError("an L2 hit never produces")

    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            await tier.run("hot", produce, None, None)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    await client.aclose()
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--l2-ops", type=int, default=2000)
    args = p.parse_args()

    configs = [  # (backend, client, worker arguments)
        ("-", "async, no tier", ["--no-tier"]),
        ("-", "sync, no tier", ["--no-tier", "--mode", "sync"]),
        ("single", "async", []),
        ("single", "sync", ["--mode", "sync"]),
        ("cluster", "async", ["--cluster"]),
        ("cluster", "sync", ["--cluster", "--mode", "sync"]),
    ]
    runs: dict[tuple[str, str], list[tuple[int, float]]] = {(b, c): [] for b, c, _ in configs}
    l2: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, LoopbackUpstream() as up:
        server = RedisServer(Path(tmp) / "single")
        server.tmp.mkdir()
        server.start()
        cluster = RedisCluster(Path(tmp) / "cluster").start()
        urls = {"-": server.url, "single": server.url, "cluster": cluster.url}
        try:
            for _ in range(args.runs):
                for backend, kind, extra in configs:
                    runs[backend, kind].append(fleet_run(urls[backend], up, args, *extra))
            host, cport = "127.0.0.1", cluster.ports[0]
            l2["single", "async"] = asyncio.run(
                l2_async(aioredis.Redis(port=server.port), args.l2_ops, 5)
            )
            l2["single", "sync"] = l2_sync(redis.Redis(port=server.port), args.l2_ops, 5)
            l2["cluster", "async"] = asyncio.run(
                l2_async(aioredis.RedisCluster(host=host, port=cport), args.l2_ops, 5)
            )
            l2["cluster", "sync"] = l2_sync(
                redis.RedisCluster(host=host, port=cport), args.l2_ops, 5
            )
            cpu_us = asyncio.run(own_cpu(args.l2_ops * 5))
        finally:
            cluster.stop()
            server.stop()

    total = args.processes * args.requests
    print(
        f"\n{args.processes} processes x {args.requests} identical requests "
        f"({total} in all), upstream {args.delay * 1000:.0f} ms, median of {args.runs} runs; "
        f"L2 hit: 1 KiB value, median of 5 x {args.l2_ops} sequential calls\n"
    )
    rows = [
        (
            "Redis", "client", "upstream hits", "wall (ms)", "wall vs no tier",
            "L2 hit (us)", "plain GET (us)", "L2 hit / GET",
        )
    ]  # fmt: skip
    for backend, kind, _ in configs:
        hits = statistics.median(h for h, _ in runs[backend, kind])
        wall = statistics.median(w for _, w in runs[backend, kind]) * 1000
        base_kind = "sync, no tier" if kind.startswith("sync") else "async, no tier"
        base = statistics.median(w for _, w in runs["-", base_kind]) * 1000
        cost = l2.get((backend, kind))
        rows.append(
            (
                backend, kind, f"{hits:g}", f"{wall:.0f}", f"{wall / base:.2f}",
                f"{cost[0]:.0f}" if cost else "", f"{cost[1]:.0f}" if cost else "",
                f"{cost[0] / cost[1]:.2f}" if cost else "",
            )
        )  # fmt: skip
    print(table(rows))
    print(f"\ntier CPU per L2 hit without I/O (async): {cpu_us:.1f} us")
    detail = {f"{b}/{k}": [(h, round(w * 1000)) for h, w in v] for (b, k), v in runs.items()}
    print(f"all runs (hits, ms): {detail}")


if __name__ == "__main__":
    main()
