"""A fleet worker: ``python -m tests.redis.worker ...`` (one OS process of the fleet tests).

It builds an httpx client with ``AsyncSingleflightTransport(tier=RedisTier(...))`` (``--mode
httpx``), an aiohttp session with ``SingleflightMiddleware(tier=...)`` (``--mode aiohttp``) or a
``Group(tier=...)`` around a plain httpx GET (``--mode group``), or threads sharing an
``httpx.Client`` with ``SingleflightTransport(tier=RedisTier(redis.Redis))`` (``--mode sync``);
``--cluster`` uses the RedisCluster clients, ``--keys N`` spreads the requests over N URLs
(``<url>/<i>``). It tells the test it
is ready (RPUSH ``--ready``), waits on the start gate (BLPOP ``--gate``, or a line on stdin with
``--gate -``: no sleeps), fires ``--requests`` concurrent GETs and prints one JSON line: how each
request was served, its body, when it ended, and the tier's stats.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import redis
import redis.asyncio as aioredis

from singleflight import Group
from singleflight.aiohttp import SingleflightMiddleware, served
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport
from singleflight.redis import RedisTier


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--auth", default=None)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--mode", choices=("httpx", "aiohttp", "group", "sync"), default="httpx")
    p.add_argument("--cluster", action="store_true", help="RedisCluster clients")
    p.add_argument("--keys", type=int, default=0, help="spread requests over N URLs")
    p.add_argument("--duration", type=float, default=0, help="rounds of requests for N s")
    p.add_argument("--namespace", default="sf")
    p.add_argument("--ttl", default="30")
    p.add_argument("--stale-ttl", type=float, default=0.0)
    p.add_argument("--lease-ttl", type=float, default=10.0)
    p.add_argument("--poll-max", type=float, default=1.0)
    p.add_argument("--ready", default=None)
    p.add_argument("--gate", default=None)
    p.add_argument("--linger", action="store_true", help="let background refreshes finish")
    p.add_argument("--no-tier", action="store_true", help="local coalescing only (benchmarks)")
    return p.parse_args(argv)


def make_tier(args: argparse.Namespace, client: Any) -> RedisTier | None:
    if args.no_tier:
        return None
    return RedisTier(
        client,
        namespace=args.namespace,
        ttl=None if args.ttl == "none" else float(args.ttl),
        stale_ttl=args.stale_ttl,
        lease_ttl=args.lease_ttl,
        poll=(0.05, args.poll_max),
    )


def url_of(args: argparse.Namespace, i: int, n: int = 0) -> str:
    """The URL of request ``i`` in round ``n``: ``<path>[/r<n>][/<i % keys>]?<query>``."""
    path, _, query = args.url.partition("?")
    if args.duration:
        path += f"/r{n}"
    if args.keys:
        path += f"/{i % args.keys}"
    return f"{path}?{query}" if query else path


def rounds(args: argparse.Namespace, tier: Any, run_round: Any) -> tuple[list[Any], list[Any]]:
    """Run rounds of ``--requests`` calls (one round, or rounds for ``--duration`` seconds)."""
    results: list[Any] = []
    log: list[dict[str, Any]] = []
    t0 = time.time()
    n = 0
    while True:
        before = dataclasses.asdict(tier.stats) if tier is not None else {}
        start = time.time()
        results += run_round(n)
        after = dataclasses.asdict(tier.stats) if tier is not None else {}
        delta = {k: after[k] - before[k] for k in after}
        log.append({"round": n, "t0": start, "t1": time.time(), **delta})
        n += 1
        if time.time() - t0 >= args.duration:
            return results, log


def report(
    t0: float, wall: float, results: list[dict[str, Any]], tier: Any, log: list[Any]
) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "t_start": t0,
        "wall": wall,
        "results": results,
        "rounds": log,
        "stats": dataclasses.asdict(tier.stats) if tier is not None else {},
    }


def main_sync(args: argparse.Namespace) -> dict[str, Any]:
    """--mode sync: threads, httpx.Client and a sync tier (redis.Redis / redis.RedisCluster)."""
    opts: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
    if args.cluster:
        client: Any = redis.RedisCluster.from_url(args.redis, **opts)
    else:
        client = redis.Redis.from_url(args.redis, **opts)
    tier = make_tier(args, client)
    headers = {"x-request-id": str(os.getpid())}
    http = httpx.Client(transport=SingleflightTransport(tier=tier), timeout=30)

    def one(n: int, i: int) -> dict[str, Any]:
        url = url_of(args, i, n)
        try:
            r = http.get(url, headers=headers)
            result = {"role": r.extensions.get("singleflight"), "status": r.status_code}
            result["body"] = r.text
        except Exception as exc:  # reported, not raised: the test checks every caller
            result = {"role": None, "status": None, "body": None, "error": type(exc).__name__}
        return {**result, "t_end": time.time(), "url": url}

    try:
        if args.ready:
            client.rpush(args.ready, os.getpid())
        if args.gate == "-":
            sys.stdin.readline()
        elif args.gate and client.blpop([args.gate], timeout=30) is None:
            raise SystemExit("start gate never opened")
        t0 = time.time()
        with ThreadPoolExecutor(args.requests) as pool:

            def run_round(n: int) -> list[Any]:
                return list(pool.map(lambda i: one(n, i), range(args.requests)))

            results, log = rounds(args, tier, run_round)
        wall = time.time() - t0
        if args.linger and tier is not None:
            tier._io.join_refreshes(30)  # type: ignore[union-attr]
        return report(t0, wall, results, tier, log)
    finally:
        http.close()
        if tier is not None:
            tier.close()
        client.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
    if args.cluster:
        client: Any = aioredis.RedisCluster.from_url(args.redis, **opts)
    else:
        client = aioredis.Redis.from_url(args.redis, **opts)
    tier = make_tier(args, client)
    headers = {"x-request-id": str(os.getpid())}  # a tracing header: not part of the key
    if args.auth:
        headers["authorization"] = args.auth
    group: Group[Any] | None = None
    session: aiohttp.ClientSession | None = None
    if args.mode == "httpx":
        transport = AsyncSingleflightTransport(tier=tier)
        http = httpx.AsyncClient(transport=transport, timeout=30)
    else:
        http = httpx.AsyncClient(timeout=30)
        if args.mode == "group":
            group = Group(tier=tier)
        else:
            session = aiohttp.ClientSession(middlewares=(SingleflightMiddleware(tier=tier),))

    async def request(url: str) -> dict[str, Any]:
        if session is not None:
            async with session.get(url, headers=headers) as resp:
                return {"role": served(resp), "status": resp.status, "body": await resp.text()}
        if group is None:
            response = await http.get(url, headers=headers)
            role = response.extensions.get("singleflight")
            return {"role": role, "status": response.status_code, "body": response.text}

        async def fetch() -> dict[str, Any]:
            r = await http.get(url, headers=headers)
            return {"status": r.status_code, "body": r.text}

        value, role = await group.do_with_role((url, args.auth), fetch)
        return {"role": role, **value}

    async def one(n: int, i: int) -> dict[str, Any]:
        url = url_of(args, i, n)
        try:
            result = await request(url)
        except Exception as exc:  # reported, not raised: the test checks every caller
            result = {"role": None, "status": None, "body": None, "error": type(exc).__name__}
        return {**result, "t_end": time.time(), "url": url}

    try:
        if args.ready:
            await client.rpush(args.ready, os.getpid())
        if args.gate == "-":
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        elif args.gate:
            if await client.blpop([args.gate], timeout=30) is None:
                raise SystemExit("start gate never opened")
        t0 = time.time()
        results: list[Any] = []
        log: list[Any] = []
        while True:  # rounds (see rounds(); written out here: each round awaits)
            before = dataclasses.asdict(tier.stats) if tier is not None else {}
            start = time.time()
            n = len(log)
            results += await asyncio.gather(*(one(n, i) for i in range(args.requests)))
            after = dataclasses.asdict(tier.stats) if tier is not None else {}
            delta = {k: after[k] - before[k] for k in after}
            log.append({"round": n, "t0": start, "t1": time.time(), **delta})
            if time.time() - t0 >= args.duration:
                break
        wall = time.time() - t0
        if args.linger and tier is not None:
            await asyncio.gather(*list(tier._io.tasks), return_exceptions=True)  # type: ignore[union-attr]
        return report(t0, wall, results, tier, log)
    finally:
        await http.aclose()
        if session is not None:
            await session.close()
        if tier is not None:
            await tier.aclose()
        await client.aclose()


if __name__ == "__main__":
    _args = parse(sys.argv[1:])
    _out = main_sync(_args) if _args.mode == "sync" else asyncio.run(main(_args))
    print(json.dumps(_out), flush=True)
