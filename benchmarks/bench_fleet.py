"""Fleet benchmark for the Redis tier: upstream hits and wall time with and without it.

    python benchmarks/bench_fleet.py [--runs 5] [--processes 6] [--requests 20] [--delay 0.2]

Needs ``redis-server`` on PATH (started here on a free loopback port, stopped by PID). Each
run starts a fresh fleet of worker processes (``tests/redis/worker.py``) behind one start
gate and fires ``--requests`` identical GETs from each at a loopback upstream that answers
after ``--delay`` seconds. Then, in this process, it times an L2 hit through the tier against
a plain ``GET`` of the same bytes. Prints medians and ratios as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from singleflight._redis._format import DEFAULT_CODEC, encode_record  # noqa: E402
from singleflight.redis import RedisTier  # noqa: E402
from singleflight.testing import LoopbackUpstream  # noqa: E402
from tests.redis.redis_fleet import Fleet  # noqa: E402


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian/Ubuntu: apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.02)
    client.close()
    return proc, port


def fleet_run(
    redis_url: str, up: LoopbackUpstream, args: argparse.Namespace, tier: bool
) -> tuple[int, float]:
    path = f"/bench-{uuid.uuid4().hex[:8]}"  # fresh key: nothing cached from an earlier run
    extra = [] if tier else ["--no-tier"]
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


async def l2_overhead(port: int, n: int, rounds: int) -> tuple[float, float]:
    client = aioredis.Redis(port=port)
    tier = RedisTier(client, namespace="bench")

    async def produce() -> bytes:
        return b"x" * 1024

    await tier.run("hot", produce, None, None)  # now an L2 hit
    await client.set("plain", b"x" * 1024)
    tier_us, get_us = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            value, role = await tier.run("hot", produce, None, None)
        tier_us.append((time.perf_counter() - t0) / n * 1e6)
        assert role == "shared"
        t0 = time.perf_counter()
        for _ in range(n):
            await client.get("plain")
        get_us.append((time.perf_counter() - t0) / n * 1e6)
    await tier.aclose()
    await client.aclose()
    return statistics.median(tier_us), statistics.median(get_us)


async def own_cpu(n: int) -> float:
    """The tier's own work per L2 hit (key digest, record decode, timeout), without I/O."""
    client = aioredis.Redis()  # never connects: replaced below
    tier = RedisTier(client, namespace="bench")
    record = encode_record("ok", DEFAULT_CODEC.encode(b"x" * 1024))

    class NoIO:
        async def get(self, name: str) -> bytes:
            return record

    tier._client = NoIO()  # type: ignore[assignment]

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--l2-ops", type=int, default=2000)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp, LoopbackUpstream() as up:
        server, port = start_redis(tmp)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            rows: dict[str, list[tuple[int, float]]] = {"without tier": [], "with RedisTier": []}
            for _ in range(args.runs):
                rows["without tier"].append(fleet_run(url, up, args, tier=False))
                rows["with RedisTier"].append(fleet_run(url, up, args, tier=True))
            tier_us, get_us = asyncio.run(l2_overhead(port, args.l2_ops, 5))
            cpu_us = asyncio.run(own_cpu(args.l2_ops * 5))
        finally:
            server.terminate()
            server.wait(timeout=10)

    total = args.processes * args.requests
    print(
        f"\n{args.processes} processes x {args.requests} identical requests "
        f"({total} in all), upstream {args.delay * 1000:.0f} ms, median of {args.runs} runs\n"
    )
    print(f"| {'':16} | {'upstream hits':>13} | {'wall time (ms)':>14} |")
    print(f"|{'-' * 18}|{'-' * 15}|{'-' * 16}|")
    med: dict[str, tuple[float, float]] = {}
    for name, runs in rows.items():
        hits = statistics.median(h for h, _ in runs)
        wall = statistics.median(w for _, w in runs) * 1000
        med[name] = (hits, wall)
        print(f"| {name:16} | {hits:>13g} | {wall:>14.0f} |")
    (h0, w0), (h1, w1) = med["without tier"], med["with RedisTier"]
    print(f"| {'ratio':16} | {h1 / h0:>13.2f} | {w1 / w0:>14.2f} |")
    print(f"\nL2 hit, 1 KiB value, median of 5 x {args.l2_ops} sequential calls on one loop:\n")
    print(f"| {'':28} | {'per call (us)':>13} |")
    print(f"|{'-' * 30}|{'-' * 15}|")
    print(f"| {'RedisTier.run (L2 hit)':28} | {tier_us:>13.0f} |")
    print(f"| {'plain GET (redis-py)':28} | {get_us:>13.0f} |")
    print(f"| {'overhead ratio':28} | {tier_us / get_us:>13.2f} |")
    print(f"| {'tier CPU alone (no I/O)':28} | {cpu_us:>13.1f} |")
    runs_detail: Any = {k: [(h, round(w * 1000)) for h, w in v] for k, v in rows.items()}
    print(f"\nall runs (hits, ms): {runs_detail}")


if __name__ == "__main__":
    main()
