"""A fleet worker: ``python -m tests.redis.worker ...`` (one OS process of the fleet tests).

It builds an httpx client with ``AsyncSingleflightTransport(tier=RedisTier(...))`` (``--mode
httpx``), an aiohttp session with ``SingleflightMiddleware(tier=...)`` (``--mode aiohttp``) or a
``Group(tier=...)`` around a plain httpx GET (``--mode group``), tells the test it
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
from typing import Any

import aiohttp
import httpx
import redis.asyncio as aioredis

from singleflight import Group
from singleflight.aiohttp import SingleflightMiddleware, served
from singleflight.httpx import AsyncSingleflightTransport
from singleflight.redis import RedisTier


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--auth", default=None)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--mode", choices=("httpx", "aiohttp", "group"), default="httpx")
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


async def main(args: argparse.Namespace) -> dict[str, Any]:
    client = aioredis.Redis.from_url(args.redis, socket_timeout=5, socket_connect_timeout=2)
    ttl = None if args.ttl == "none" else float(args.ttl)
    tier = None
    if not args.no_tier:
        tier = RedisTier(
            client,
            namespace=args.namespace,
            ttl=ttl,
            stale_ttl=args.stale_ttl,
            lease_ttl=args.lease_ttl,
            poll=(0.05, args.poll_max),
        )
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

    async def request() -> dict[str, Any]:
        if session is not None:
            async with session.get(args.url, headers=headers) as resp:
                return {"role": served(resp), "status": resp.status, "body": await resp.text()}
        if group is None:
            response = await http.get(args.url, headers=headers)
            role = response.extensions.get("singleflight")
            return {"role": role, "status": response.status_code, "body": response.text}

        async def fetch() -> dict[str, Any]:
            r = await http.get(args.url, headers=headers)
            return {"status": r.status_code, "body": r.text}

        value, role = await group.do_with_role((args.url, args.auth), fetch)
        return {"role": role, **value}

    async def one() -> dict[str, Any]:
        try:
            result = await request()
        except Exception as exc:  # reported, not raised: the test checks every caller
            result = {"role": None, "status": None, "body": None, "error": type(exc).__name__}
        return {**result, "t_end": time.time()}

    try:
        if args.ready:
            await client.rpush(args.ready, os.getpid())
        if args.gate == "-":
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        elif args.gate:
            if await client.blpop([args.gate], timeout=30) is None:
                raise SystemExit("start gate never opened")
        t0 = time.time()
        results = await asyncio.gather(*(one() for _ in range(args.requests)))
        wall = time.time() - t0
        if args.linger and tier is not None:
            await asyncio.gather(*list(tier._io.tasks), return_exceptions=True)
        return {
            "pid": os.getpid(),
            "t_start": t0,
            "wall": wall,
            "results": results,
            "stats": dataclasses.asdict(tier.stats) if tier is not None else {},
        }
    finally:
        await http.aclose()
        if session is not None:
            await session.close()
        if tier is not None:
            await tier.aclose()
        await client.aclose()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse(sys.argv[1:])))), flush=True)
