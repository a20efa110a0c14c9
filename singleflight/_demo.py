"""The demo: one burst of identical GETs through plain and coalescing HTTP clients."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("run",)

PLAIN = ("httpx", "aiohttp")
MODES = (
    "httpx",
    "httpx + singleflight",
    "aiohttp",
    "aiohttp + singleflight",
    "httpx + singleflight + ttl",
)
STALE_MODE = "httpx + singleflight + stale"
# The same two bursts across an expiry, without stale_ttl: the second one waits upstream.
EXPIRED_MODE = "httpx + singleflight + ttl, no stale"
DEFAULT_CONCURRENCY = 20


@dataclass
class Result:
    """One mode's burst: what the upstream saw and what the callers waited."""

    mode: str
    requests: int
    upstream_hits: int = 0
    wall_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    served: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # callers whose GET raised
    error: str | None = None  # the first failure (a caller's, or the whole mode's)
    gave_up: int = 0  # callers that reached --timeout before their answer came
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    expiry_p99_ms: float | None = None  # --stale rows: the p99 of the burst after the expiry

    def public(self) -> dict[str, Any]:
        """The JSON face: everything but the raw per-caller and per-call samples."""
        return {
            "mode": self.mode,
            "requests": self.requests,
            "upstream_hits": self.upstream_hits,
            "wall_ms": self.wall_ms,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "served": self.served,
            "failed": self.failed,
            "error": self.error,
            "gave_up": self.gave_up,
            "expiry_p99_ms": self.expiry_p99_ms,
        }


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _requests(text: str) -> int:
    value = _positive_int(text)
    if value > 100_000:
        raise argparse.ArgumentTypeError(f"at most 100,000 per burst, got {value:,}")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds, got {value}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 3600 seconds, got {value}")
    return value


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="python -m singleflight",
        description="singleflight: make concurrent identical work happen exactly once.",
    )
    p.add_argument("--version", action="version", version=f"singleflight-http {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="fire a burst of identical GETs through plain and coalescing clients",
        description=(
            "Start a loopback HTTP server that answers after --delay and counts hits, then fire "
            "the same burst of GETs (every caller at once) through plain httpx, httpx + "
            "singleflight, plain aiohttp, aiohttp + singleflight, and httpx + singleflight with "
            "a TTL (a second burst is served from memory). Prints upstream calls, wall time and "
            "per-caller latency, counted from the moment each caller asked. A mode that fails "
            "is shown as a row with its error; the other modes still run."
        ),
    )
    d.add_argument(
        "--requests",
        type=_requests,
        default=1000,
        help="GETs per burst, up to 100,000 (default 1000)",
    )
    d.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=(
            "connections per client (default %(default)s). The plain clients' callers queue for "
            "one of them, so a plain burst takes about requests / concurrency x delay, plus the "
            "client's own time per request: the default run takes a few seconds. httpx's pool "
            "gets slower per request past a few dozen connections"
        ),
    )
    d.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        help=(
            "seconds a plain client's caller waits, in line and for its answer, before it gives "
            "up as a caller with a deadline would (default %(default)g). It bounds the plain "
            "baselines: with 100,000 requests most plain callers give up and the row says how "
            "many. The coalescing clients make one call per key and need no bound"
        ),
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
        default=0.05,
        help="seconds the embedded server takes per request (default 0.05)",
    )
    d.add_argument(
        "--url",
        type=_url,
        default=None,
        help=(
            "target this server instead of the embedded one (checked with one GET first; "
            "then upstream calls = requests the clients sent)"
        ),
    )
    d.add_argument(
        "--stale",
        action="store_true",
        help="add a stale-while-revalidate row (needs transports that accept stale_ttl=)",
    )
    d.add_argument("--json", action="store_true", help="print machine-readable results only")
    d.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="write a chart of upstream calls and per-caller latency (needs matplotlib)",
    )
    return p


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


def _one_line(exc: BaseException, width: int = 72) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 1] + "…"


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


def _stale_supported() -> bool:
    from .httpx import AsyncSingleflightTransport

    return "stale_ttl" in inspect.signature(AsyncSingleflightTransport).parameters


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


def _saved(r: Result) -> str:
    """Calls saved against one upstream call per request; never rounds a saving up to 100 %."""
    if r.mode in PLAIN:
        return "—"
    if r.error and r.failed == r.requests or r.gave_up == r.requests:
        return "—"  # nobody was served: nothing was saved
    saved = r.requests - r.upstream_hits
    pct = math.floor(1000 * saved / r.requests) / 10 if r.requests else 0.0
    return f"{saved:,} ({pct:.1f} %)"


def _spread(args: argparse.Namespace) -> str:
    distinct = min(args.keys, args.requests)
    n = f"{args.requests:,} GET{'s' if args.requests != 1 else ''}"
    return f"{n} of one URL" if distinct == 1 else f"{n} spread over {distinct:,} URLs"


def _calls(n: int) -> str:
    return f"{n:,} upstream call{'' if n == 1 else 's'}"


def headline(results: list[Result]) -> str:
    """headline says what coalescing did, e.g. "1,000 requests -> 1 upstream call"."""
    ok = [r for r in results if "singleflight" in r.mode and not r.error and not r.gave_up]
    row = next((r for r in ok if r.mode == "httpx + singleflight"), ok[0] if ok else None)
    if row is None:
        return "singleflight demo"
    return f"{row.requests:,} requests → {_calls(row.upstream_hits)}"


def _not_served(r: Result, timeout: float) -> str:
    parts = []
    if r.gave_up:
        parts.append(f"{r.gave_up:,} gave up at {timeout:g} s")
    if r.error:
        parts.append(f"{r.failed:,} failed: {r.error}")
    return "; ".join(parts)


def _table(results: list[Result], args: argparse.Namespace, target: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{headline(results)}  ({_spread(args)}, all at once, at {target})",
        caption=(
            "upstream calls: requests the server saw; latency: what each caller waited, from "
            f"asking to its answer; plain clients queue for {args.concurrency} connections, and "
            f"their callers give up after {args.timeout:g} s"
        ),
    )
    columns = ["mode", "callers", "upstream calls", "calls saved", "wall ms", "p50 ms", "p99 ms"]
    expiry = any(r.expiry_p99_ms is not None for r in results)  # --stale
    if expiry:
        columns.append("p99 ms after expiry")
    failures = any(r.error or r.gave_up for r in results)
    if failures:
        columns.append("not served")
    for col in columns:
        table.add_column(col, justify="left" if col in ("mode", "not served") else "right")
    for r in results:
        if r.error and r.failed == r.requests:
            row = [r.mode, f"{r.requests:,}", f"{r.upstream_hits:,}", "—", "—", "—", "—"]
        else:
            row = [
                r.mode,
                f"{r.requests:,}",
                f"{r.upstream_hits:,}",
                _saved(r),
                f"{r.wall_ms:,.0f}",
                f"{r.p50_ms:,.1f}",
                f"{r.p99_ms:,.1f}",
            ]
        if expiry:
            row.append("—" if r.expiry_p99_ms is None else f"{r.expiry_p99_ms:,.1f}")
        if failures:
            row.append(_not_served(r, args.timeout))
        table.add_row(*row, style="red" if r.error else None)
    console = Console()
    console.width = max(console.width, 150 if failures else 120)
    console.print(table)


def _color(mode: str) -> str:
    if mode in PLAIN:
        return "#9a9a9a"
    if mode.endswith(("ttl", "stale")):
        return "#2e9e5b"
    return "#2f6fd0"


def _label(r: Result) -> str:
    if r.mode.endswith("ttl"):
        return f"{r.mode}\n(two bursts, the 2nd from memory)"
    if r.mode == STALE_MODE:
        return f"{r.mode}\n(two bursts, the 2nd served stale)"
    if r.mode == EXPIRED_MODE:
        return f"{r.mode}\n(two bursts, the 2nd after expiry)"
    return r.mode


def plot(results: list[Result], args: argparse.Namespace, target: str, path: str) -> None:
    """plot writes the chart: upstream calls per mode and what each caller waited."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain_number = FuncFormatter(lambda x, _pos: f"{x:,.10g}")
    shown = list(reversed(results))  # barh draws bottom-up: keep the table's order top-down
    names = [_label(r) for r in shown]
    colors = [_color(r.mode) for r in shown]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13.5, 1.6 + 0.75 * len(shown)), sharey=True)
    fig.suptitle(headline(results), fontsize=18, fontweight="bold", y=0.985)
    fig.text(
        0.5,
        0.895,
        f"{_spread(args)}, all at once, at {target}; plain clients get {args.concurrency} "
        "connections",
        ha="center",
        fontsize=10,
        color="#444444",
    )

    ys = range(len(shown))
    xmax = max([r.upstream_hits for r in shown] + [1]) * 4
    ax1.barh(ys, [max(r.upstream_hits, 0.8) for r in shown], color=colors, height=0.6)
    ax1.set_xscale("log")
    ax1.set_xlim(0.7, xmax)
    ax1.xaxis.set_major_formatter(plain_number)
    ax1.set_title("upstream calls (log scale; fewer is better)", fontsize=11)
    for y, r in zip(ys, shown, strict=True):
        label = f"{r.upstream_hits:,} for {r.requests:,} callers"
        unserved = r.failed + r.gave_up
        if unserved:
            label += f" ({unserved:,} not served)"
        hits = max(r.upstream_hits, 0.8)
        if math.log(hits / 0.7) > 0.55 * math.log(xmax / 0.7):  # a long bar: label inside it
            ax1.text(hits / 1.25, y, label, va="center", ha="right", color="white")
        else:
            ax1.text(hits * 1.25, y, label, va="center", color="#b00000" if unserved else "black")

    data = [r.latencies_ms or [float("nan")] for r in shown]
    ax2.boxplot(
        data,
        positions=list(ys),
        vert=False,
        whis=(1, 99),
        showfliers=False,
        widths=0.6,
        patch_artist=True,
        medianprops={"color": "black"},
    )
    for patch, color in zip(ax2.patches, colors, strict=False):
        patch.set_facecolor(color)
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(plain_number)
    ax2.set_title(
        "what each caller waited, ms (log scale; box p25–p75, whiskers p1–p99)", fontsize=10
    )
    top = max((r.p99_ms for r in shown), default=1.0)
    ax2.set_xlim(right=max(top, 1.0) * 12)
    for y, r in zip(ys, shown, strict=True):
        if r.latencies_ms:
            text = f"p50 {r.p50_ms:,.0f} · p99 {r.p99_ms:,.0f}"
            if r.gave_up:
                text += f"\n{r.gave_up:,} gave up at {args.timeout:g} s"
            ax2.text(r.p99_ms * 1.3, y, text, va="center", fontsize=10)
        else:
            ax2.text(1, y, r.error or "no caller finished", va="center", fontsize=9, color="red")
    ax2.grid(axis="x", which="major", alpha=0.3)
    ax1.set_yticks(list(ys), names)  # after boxplot, which resets the shared ticks
    ax1.set_ylim(-0.6, len(shown) - 0.4)
    ax1.tick_params(axis="y", length=0, labelsize=10)
    ax2.tick_params(axis="y", length=0, labelleft=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_plot_path(path: str) -> str | None:
    """An error for a --plot path we cannot write, checked before any burst runs."""
    target = Path(path)
    if target.is_dir():
        return f"--plot {path}: is a directory; give a file name such as demo.png"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"--plot {path}: directory {parent} does not exist"
    if target.exists() and not os.access(target, os.W_OK):
        return f"--plot {path}: not writable"
    if not target.exists() and not os.access(parent, os.W_OK):
        return f"--plot {path}: cannot create a file in {parent}"
    return None


def _check_url(url: str) -> str | None:
    """An error for a --url that does not answer, checked with one GET before the bursts."""
    import httpx

    try:
        httpx.get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        return f"--url {url} is not reachable: {_one_line(exc)}"
    return None


def preflight(args: argparse.Namespace) -> tuple[int, str] | None:
    """Everything that can be known before the run: (exit status, one-line message) or None."""
    try:
        import aiohttp  # noqa: F401
        import httpx  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        return 2, f'the demo needs {exc.name}: pip install "singleflight-http[demo]"'
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return 2, '--plot needs matplotlib: pip install "singleflight-http[plot]"'
        problem = _check_plot_path(args.plot)
        if problem:
            return 2, problem
    if args.stale and not _stale_supported():
        return 2, (
            "--stale needs stale_ttl support in AsyncSingleflightTransport, which this version "
            "does not have yet; run without --stale"
        )
    if args.url is not None:
        problem = _check_url(args.url)
        if problem:
            return 1, problem
    return None


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
