"""The demo: one burst of identical GETs through plain and coalescing HTTP clients."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ._demo_cli import _one_line, parser, preflight
from ._demo_report import (
    EXPIRED_MODE,
    MODES,
    PLAIN,
    STALE_MODE,
    Result,
    _table,
    headline,
    plot,
)

__all__ = ("run",)


class _Counter:
    """Counts the requests a client actually sent past singleflight (for --url)."""

    def __init__(self) -> None:
        self.sent = 0

    def hit(self) -> None:
        self.sent += 1


def _urls(base: str, n: int, keys: int, delay: float, embedded: bool) -> list[str]:
    query = f"?delay={delay}" if embedded else ""
    return [f"{base}/item/{i % keys}{query}" for i in range(n)]


@dataclass
class _Burst:
    wall_ms: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    error: str | None = None
    gave_up: int = 0
    after_ms: list[float] = field(default_factory=list)  # the second burst's latencies

    def add(self, other: _Burst) -> None:
        self.wall_ms += other.wall_ms
        self.latencies_ms += other.latencies_ms
        for k, v in other.served.items():
            self.served[k] = self.served.get(k, 0) + v
        self.failed += other.failed
        self.error = self.error or other.error
        self.gave_up += other.gave_up
        self.after_ms = other.latencies_ms


async def _fire(
    urls: list[str],
    get: Callable[[str], Awaitable[str | None]],
    queue: int | None,
    advance: Callable[[], None],
    deadline: float,
) -> _Burst:
    """Every caller asks at once; each waits from then until its answer or error.

    With ``queue=n`` (the plain clients) the callers wait in line for n connections: n workers
    take them in order, and a caller still in line at the deadline gives up there (no
    per-caller timer, no cancelled waiter to dig out of a queue: linear in the callers).
    Without it (the coalescing clients) every caller is its own task from the start and waits
    for its key's one upstream call; the clients' own timeouts bound a hung upstream.
    """
    burst = _Burst()
    t0 = time.perf_counter()
    end = t0 + deadline

    def gave_up(n: int = 1) -> None:
        burst.gave_up += n
        burst.latencies_ms.extend([deadline * 1000] * n)
        for _ in range(n):
            advance()

    async def one(url: str, timeout: float | None) -> None:
        try:
            if timeout is None:
                how = await get(url)
            else:
                how = await asyncio.wait_for(get(url), timeout)
        except Exception as exc:  # one row per mode: failures are counted, not raised
            if isinstance(exc, asyncio.TimeoutError) and time.perf_counter() >= end:
                gave_up()  # this caller's deadline, not a failure of the client
                return
            burst.failed += 1
            burst.error = burst.error or _one_line(exc)
        else:
            if how is not None:
                burst.served[how] = burst.served.get(how, 0) + 1
        burst.latencies_ms.append((time.perf_counter() - t0) * 1000)
        advance()

    if queue is not None:
        line = iter(urls)

        async def worker() -> None:
            for url in line:
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    gave_up()
                else:
                    await one(url, remaining)

        await asyncio.gather(*[worker() for _ in range(min(queue, len(urls)))])
    else:
        await asyncio.gather(*[one(url, None) for url in urls])
    burst.wall_ms = (time.perf_counter() - t0) * 1000
    return burst


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _refreshed(transport: Any, timeout: float = 30.0) -> None:
    """Wait (bounded) until the transport's background refreshes (stale_ttl) have landed."""
    tasks = getattr(transport.group._front, "tasks", None)
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout)


async def _burst(
    mode: str,
    urls: list[str],
    args: argparse.Namespace,
    advance: Callable[[], None],
    counter: _Counter,
) -> _Burst:
    """Run one mode (two bursts for ttl and stale) and return what its callers saw."""
    import aiohttp
    import httpx

    from .aiohttp import SingleflightMiddleware, served
    from .httpx import AsyncSingleflightTransport

    n = args.concurrency
    # Plain clients: callers queue here for one of n connections (httpx's own pool queue costs
    # time quadratic in its waiters). Coalescing clients need no queue: one request per key.
    queue = n if mode in PLAIN else None
    # A plain caller's own deadline (--timeout) comes before its client's timeout. A coalesced
    # caller waits for the one call and for this process to hand every caller its answer:
    # allow 1 ms of CPU per caller on top (100,000 callers in one process take that long).
    per_request = args.timeout + 5.0 + (0 if mode in PLAIN else len(urls) / 1000)

    class CountingTransport(httpx.AsyncBaseTransport):
        """Counts the requests that get past singleflight (what the upstream sees)."""

        def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
            self.inner = inner

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            counter.hit()
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    if mode.startswith("httpx"):
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        counting = CountingTransport(httpx.AsyncHTTPTransport(limits=limits))
        transport: httpx.AsyncBaseTransport = counting
        pause = 0.0
        if mode.endswith("ttl"):
            # Long enough to outlast the first burst even with 100,000 callers to serve.
            transport = AsyncSingleflightTransport(counting, ttl=3600.0)
        elif mode in (STALE_MODE, EXPIRED_MODE):
            # Fresh for a moment, then (with stale_ttl) stale for a minute: the second burst,
            # after the fresh window, is answered from memory at once while one refresh goes
            # upstream; without stale_ttl it waits for the upstream again.
            fresh = max(0.05, args.delay)
            options: dict[str, Any] = {"ttl": fresh}
            if mode == STALE_MODE:
                options["stale_ttl"] = 60.0
            transport = AsyncSingleflightTransport(counting, **options)
            pause = fresh * 1.5
        elif "singleflight" in mode:
            transport = AsyncSingleflightTransport(counting)
        async with httpx.AsyncClient(transport=transport, timeout=per_request) as client:

            async def get(url: str) -> str | None:
                r = await client.get(url)
                r.raise_for_status()
                return r.extensions.get("singleflight")

            result = await _fire(urls, get, queue, advance, args.timeout)
            if mode.endswith("ttl") or mode in (STALE_MODE, EXPIRED_MODE):  # the second burst
                await asyncio.sleep(pause)
                result.add(await _fire(urls, get, queue, advance, args.timeout))
            if isinstance(transport, AsyncSingleflightTransport):
                await _refreshed(transport)  # count the stale row's refresh upstream too
            return result

    async def count_middleware(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        counter.hit()
        return await handler(req)

    middlewares: tuple[Any, ...] = (count_middleware,)
    if "singleflight" in mode:
        middlewares = (SingleflightMiddleware(), count_middleware)
    connector = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=per_request)
    async with aiohttp.ClientSession(
        connector=connector, middlewares=middlewares, timeout=timeout
    ) as session:

        async def aget(url: str) -> str | None:
            async with session.get(url) as r:
                r.raise_for_status()
                await r.read()
                return served(r)

        return await _fire(urls, aget, queue, advance, args.timeout)


def _embedded_server(args: argparse.Namespace) -> AbstractContextManager[Any]:
    if args.url is not None:
        return nullcontext(None)
    from .testing import LoopbackUpstream

    return LoopbackUpstream()


def _modes(args: argparse.Namespace) -> tuple[str, ...]:
    return (*MODES, EXPIRED_MODE, STALE_MODE) if args.stale else MODES


def _bursts(mode: str) -> int:
    return 2 if mode.endswith(("ttl", "stale")) else 1


async def _all_modes(
    args: argparse.Namespace, base: str, upstream: Any, progress: Any
) -> list[Result]:
    urls = _urls(base, args.requests, args.keys, args.delay, upstream is not None)
    results = []
    for mode in _modes(args):
        bursts = _bursts(mode)
        task = progress.add_task(mode, total=args.requests * bursts) if progress else None

        def advance(task: Any = task) -> None:
            if progress is not None:
                progress.advance(task)

        counter = _Counter()
        if upstream is not None:
            upstream.reset()
        result = Result(mode=mode, requests=args.requests * bursts)
        try:
            burst = await _burst(mode, urls, args, advance, counter)
        except Exception as exc:  # a mode that cannot even start is one row, not a traceback
            result.error = _one_line(exc)
            result.failed = result.requests
        else:
            lat = burst.latencies_ms
            result.wall_ms = round(burst.wall_ms, 1)
            result.p50_ms = round(statistics.median(lat), 1) if lat else 0.0
            result.p99_ms = round(_percentile(lat, 0.99), 1) if lat else 0.0
            result.served = burst.served
            result.failed = burst.failed
            result.error = burst.error
            result.gave_up = burst.gave_up
            result.latencies_ms = lat
            if mode in (STALE_MODE, EXPIRED_MODE) and burst.after_ms:
                result.expiry_p99_ms = round(_percentile(burst.after_ms, 0.99), 1)
        result.upstream_hits = upstream.hits() if upstream is not None else counter.sent
        results.append(result)
    return results


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    problem = preflight(args)
    if problem is not None:
        status, message = problem
        print(f"singleflight demo: {message}", file=sys.stderr)
        return status
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with _embedded_server(args) as upstream:
        base = args.url if upstream is None else upstream.url
        if args.json:
            results = asyncio.run(_all_modes(args, base, upstream, None))
        else:
            progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            with progress:
                results = asyncio.run(_all_modes(args, base, upstream, progress))
    if args.url is None:
        target = f"a loopback server answering in {args.delay:g} s"
    else:
        target = args.url
    if args.json:
        config = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "timeout_s": args.timeout,
            "keys": args.keys,
            "delay_s": args.delay if args.url is None else None,
            "target": target,
            "headline": headline(results),
        }
        out = {"config": config, "results": [r.public() for r in results]}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _table(results, args, target)
    if args.plot:
        plot(results, args, target, args.plot)
        if not args.json:
            print(f"chart written to {args.plot}")
    return 1 if any(r.error for r in results) else 0
