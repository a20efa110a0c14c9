"""Benchmark: plain httpx.AsyncClient vs one wrapped in AsyncSingleflightTransport.

Runs a LoopbackUpstream (127.0.0.1, 50 ms handler) in a child process, so the server does not
share the client's GIL, and measures in one run:

(a) 1,000 concurrent identical GETs: upstream hits and wall time, plain vs wrapped, and the
    wrapped burst's ratio to one lone GET (target <= 1.5);
(b) 2,000 concurrent GETs over distinct URLs (nothing to coalesce): wrapped / plain wall time
    (target <= 1.05: the overhead of keys, flights and snapshots).

Each measurement is repeated (plain and wrapped interleaved) and the median is reported, as
wall time and as the client process's CPU time (steadier on a busy machine). A last row measures
httpx's own floor: the same burst through a transport that answers at once, with no network.

    python benchmarks/bench_httpx.py [--repeat 5] [--delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable

import httpx
from _common import fresh, table, timed

from singleflight.httpx import AsyncSingleflightTransport


async def upstream_hits(control: httpx.AsyncClient) -> int:
    return int((await control.get("/_upstream/hits")).json()["total"])


class Instant(httpx.AsyncBaseTransport):
    """A transport that answers at once: what httpx itself costs per request."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers=[(b"content-length", b"2")], stream=httpx.ByteStream(b"{}")
        )


async def run(repeat: int, delay: float, burst: int, distinct: int) -> list[tuple[str, ...]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "singleflight.testing"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        return await measure(url, repeat, delay, burst, distinct)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def measure(
    url: str, repeat: int, delay: float, burst: int, distinct: int
) -> list[tuple[str, ...]]:
    q = f"?delay={delay}"
    clients = {
        "plain": httpx.AsyncClient(base_url=url, timeout=60),
        "wrapped": httpx.AsyncClient(
            base_url=url, timeout=60, transport=AsyncSingleflightTransport()
        ),
    }
    clients["floor"] = httpx.AsyncClient(base_url=url, transport=Instant())
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    hits: dict[tuple[str, str], list[int]] = {}
    async with httpx.AsyncClient(base_url=url) as control:
        for c in clients.values():  # warm up: open pool connections, import paths
            await asyncio.gather(*[c.get(fresh("warm") + q) for _ in range(100)])

        async def record(case: str, name: str, fn: Callable[[], Awaitable[object]]) -> None:
            before = await upstream_hits(control)
            times.setdefault((case, name), []).append(await timed(fn))
            hits.setdefault((case, name), []).append(await upstream_hits(control) - before)

        for _ in range(repeat):
            for name, c in clients.items():
                if name == "floor":

                    async def floor(c: httpx.AsyncClient = c) -> None:
                        path = fresh("floor")
                        await asyncio.gather(*[c.get(path) for _ in range(burst)])

                    await record("floor", name, floor)
                    continue
                await record("lone", name, lambda c=c: c.get(fresh("lone") + q))

                async def same(c: httpx.AsyncClient = c) -> None:
                    path = fresh("same") + q
                    await asyncio.gather(*[c.get(path) for _ in range(burst)])

                await record("same", name, same)

                async def spread(c: httpx.AsyncClient = c) -> None:
                    await asyncio.gather(*[c.get(fresh("d") + q) for _ in range(distinct)])

                await record("distinct", name, spread)
    for c in clients.values():
        await c.aclose()

    def med(case: str, name: str, cpu: bool = False) -> float:
        return statistics.median(t[cpu] for t in times[(case, name)])

    def row(case: str, label: str, name: str, ratio: str = "") -> tuple[str, ...]:
        return (
            label,
            name,
            str(max(hits[(case, name)])),
            f"{med(case, name) * 1e3:.1f}",
            f"{med(case, name, cpu=True) * 1e3:.1f}",
            ratio,
        )

    rows = [("scenario", "client", "upstream hits", "wall ms", "client CPU ms", "ratio")]
    lone = med("lone", "wrapped")
    for name in ("plain", "wrapped"):
        rows.append(row("lone", "1 lone GET", name))
    for name in ("plain", "wrapped"):
        ratio = f"{med('same', name) / lone:.2f}x lone GET"
        if name == "wrapped":
            ratio += " (target <= 1.5)"
        rows.append(row("same", f"{burst} identical GETs", name, ratio))
    floor = med("floor", "floor")
    rows.append(
        row(
            "floor",
            f"{burst} GETs, instant transport",
            "floor",
            f"httpx alone; lone GET + floor = {(lone + floor) / lone:.2f}x lone GET",
        )
    )
    plain, wrapped = med("distinct", "plain"), med("distinct", "wrapped")
    cpu_ratio = med("distinct", "wrapped", cpu=True) / med("distinct", "plain", cpu=True)
    for name in ("plain", "wrapped"):
        ratio = f"{wrapped / plain:.3f}x plain, CPU {cpu_ratio:.3f}x (target <= 1.05)"
        rows.append(
            row("distinct", f"{distinct} distinct GETs", name, ratio if name == "wrapped" else "")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median)")
    parser.add_argument("--delay", type=float, default=0.05, help="upstream handler seconds")
    parser.add_argument("--burst", type=int, default=1000, help="identical concurrent GETs")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct concurrent GETs")
    args = parser.parse_args()
    rows = asyncio.run(run(args.repeat, args.delay, args.burst, args.distinct))
    print(
        f"httpx {httpx.__version__}, Python {sys.version.split()[0]}, upstream handler "
        f"{args.delay * 1e3:.0f} ms, median of {args.repeat}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
