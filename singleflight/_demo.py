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
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ("run",)

MODES = (
    "httpx",
    "httpx + singleflight",
    "aiohttp",
    "aiohttp + singleflight",
    "httpx + singleflight + ttl",
)


@dataclass
class Result:
    """One mode's burst: what the upstream saw and what the callers waited."""

    mode: str
    requests: int
    upstream_hits: int
    wall_ms: float
    p50_ms: float
    p99_ms: float
    served: dict[str, int] = field(default_factory=dict)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds, got {value}")
    return value


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m singleflight",
        description="singleflight: make concurrent identical work happen exactly once.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="fire a burst of identical GETs through plain and coalescing clients",
        description=(
            "Start a loopback HTTP server that answers after --delay and counts hits, then fire "
            "the same burst of GETs through plain httpx, httpx + singleflight, plain aiohttp, "
            "aiohttp + singleflight, and httpx + singleflight with a TTL (a second burst is "
            "served from memory). Prints upstream hits, wall time and per-caller latency."
        ),
    )
    d.add_argument(
        "--requests", type=_positive_int, default=1000, help="GETs per burst (default 1000)"
    )
    d.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="most GETs in flight at once (default: all of them)",
    )
    d.add_argument(
        "--keys",
        type=_positive_int,
        default=1,
        help="distinct URLs the burst is spread over (default 1: all identical)",
    )
    d.add_argument(
        "--delay",
        type=_delay,
        default=0.1,
        help="seconds the embedded server takes per request (default 0.1)",
    )
    d.add_argument(
        "--url",
        type=_url,
        default=None,
        help="target this server instead of the embedded one (then hits = requests sent)",
    )
    d.add_argument("--json", action="store_true", help="print machine-readable results only")
    d.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="write a bar chart of upstream hits and p99 latency (needs matplotlib)",
    )
    return p


class _Counter:
    """Counts requests a client actually sent (for --url, where the server is not ours)."""

    def __init__(self) -> None:
        self.sent = 0


def _urls(base: str, n: int, keys: int, delay: float, embedded: bool) -> list[str]:
    query = f"?delay={delay}" if embedded else ""
    return [f"{base}/item/{i % keys}{query}" for i in range(n)]


async def _fire(
    urls: list[str],
    get: Callable[[str], Awaitable[str | None]],
    concurrency: int,
    advance: Callable[[], None],
) -> tuple[float, list[float], dict[str, int]]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    served: dict[str, int] = {}

    async def one(url: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            how = await get(url)
            latencies.append((time.perf_counter() - t0) * 1000)
            if how is not None:
                served[how] = served.get(how, 0) + 1
            advance()

    t0 = time.perf_counter()
    await asyncio.gather(*[one(u) for u in urls])
    return (time.perf_counter() - t0) * 1000, latencies, served


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _burst(
    mode: str,
    urls: list[str],
    concurrency: int,
    advance: Callable[[], None],
    counter: _Counter,
) -> tuple[float, list[float], dict[str, int], int]:
    """Run one mode; returns wall ms, latencies, how callers were served, bursts fired."""
    import aiohttp
    import httpx

    from .aiohttp import SingleflightMiddleware, served
    from .httpx import AsyncSingleflightTransport

    class CountingTransport(httpx.AsyncBaseTransport):
        """Counts the requests that get past singleflight (what the upstream sees)."""

        def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
            self.inner = inner

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            counter.sent += 1
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    if mode.startswith("httpx"):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        counting = CountingTransport(httpx.AsyncHTTPTransport(limits=limits))
        transport: httpx.AsyncBaseTransport = counting
        if "singleflight" in mode:
            ttl = 60.0 if mode.endswith("ttl") else None
            transport = AsyncSingleflightTransport(counting, ttl=ttl)
        async with httpx.AsyncClient(transport=transport, timeout=60) as client:

            async def get(url: str) -> str | None:
                r = await client.get(url)
                r.raise_for_status()
                return r.extensions.get("singleflight")

            wall, lat, how = await _fire(urls, get, concurrency, advance)
            if mode.endswith("ttl"):  # the second burst: served from memory
                wall2, lat2, how2 = await _fire(urls, get, concurrency, advance)
                for k, v in how2.items():
                    how[k] = how.get(k, 0) + v
                return wall + wall2, lat + lat2, how, 2
            return wall, lat, how, 1

    async def count_middleware(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        counter.sent += 1
        return await handler(req)

    middlewares: tuple[Any, ...] = (count_middleware,)
    if "singleflight" in mode:
        middlewares = (SingleflightMiddleware(), count_middleware)
    connector = aiohttp.TCPConnector(limit=100)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, middlewares=middlewares, timeout=timeout
    ) as session:

        async def aget(url: str) -> str | None:
            async with session.get(url) as r:
                r.raise_for_status()
                await r.read()
                return served(r)

        wall, lat, how = await _fire(urls, aget, concurrency, advance)
        return wall, lat, how, 1


def _embedded_server(args: argparse.Namespace) -> AbstractContextManager[Any]:
    if args.url is not None:
        return nullcontext(None)
    from .testing import LoopbackUpstream

    return LoopbackUpstream()


async def _all_modes(
    args: argparse.Namespace, base: str, upstream: Any, progress: Any
) -> list[Result]:
    concurrency = args.concurrency or args.requests
    urls = _urls(base, args.requests, args.keys, args.delay, upstream is not None)
    results = []
    for mode in MODES:
        bursts = 2 if mode.endswith("ttl") else 1
        task = progress.add_task(mode, total=args.requests * bursts) if progress else None

        def advance(task: Any = task) -> None:
            if progress is not None:
                progress.advance(task)

        counter = _Counter()
        if upstream is not None:
            upstream.reset()
        wall, lat, how, fired = await _burst(mode, urls, concurrency, advance, counter)
        hits = upstream.hits() if upstream is not None else counter.sent
        results.append(
            Result(
                mode=mode,
                requests=args.requests * fired,
                upstream_hits=hits,
                wall_ms=round(wall, 1),
                p50_ms=round(statistics.median(lat), 1),
                p99_ms=round(_percentile(lat, 0.99), 1),
                served=how,
            )
        )
    return results


def _table(results: list[Result], args: argparse.Namespace, target: str) -> None:
    from rich.console import Console
    from rich.table import Table

    plain_hits = {r.mode: r.upstream_hits for r in results if "singleflight" not in r.mode}
    table = Table(
        title=f"{args.requests} GETs over {args.keys} URL(s) at {target}",
        caption="hits: requests the upstream saw; latency: what each caller waited",
    )
    for col in ("mode", "requests", "upstream hits", "wall ms", "p50 ms", "p99 ms", "calls saved"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in results:
        plain = plain_hits.get(r.mode.split(" ")[0], r.upstream_hits)
        per_burst = r.requests // max(1, r.requests // args.requests)
        baseline = plain * (r.requests // per_burst)
        saved = 1 - r.upstream_hits / baseline if baseline else 0.0
        savings = "—" if "singleflight" not in r.mode else f"{saved:.1%}"
        table.add_row(
            r.mode,
            str(r.requests),
            str(r.upstream_hits),
            f"{r.wall_ms:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            savings,
        )
    console = Console()
    console.width = max(console.width, 110)
    console.print(table)


def _plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'singleflight-http[plot]'") from None
    names = [r.mode.replace(" + ", "\n+ ") for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(names, [r.upstream_hits for r in results], color="#3b7dd8")
    ax1.set_title("upstream hits (lower is better)")
    ax1.set_yscale("symlog")
    ax2.bar(names, [r.p99_ms for r in results], color="#d8873b")
    ax2.set_title("p99 latency per caller, ms")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        import aiohttp  # noqa: F401
        import httpx  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        print(f"the demo needs {exc.name}: pip install 'singleflight-http[demo]'", file=sys.stderr)
        return 2
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
    target = "the embedded loopback server" if args.url is None else args.url
    if args.json:
        config = {
            "requests": args.requests,
            "concurrency": args.concurrency or args.requests,
            "keys": args.keys,
            "delay_s": args.delay if args.url is None else None,
            "target": target,
        }
        print(json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2))
    else:
        _table(results, args, target)
    if args.plot:
        _plot(results, args.plot)
        if not args.json:
            print(f"chart written to {args.plot}")
    return 0
