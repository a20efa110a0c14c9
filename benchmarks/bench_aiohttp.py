"""Benchmark: plain aiohttp.ClientSession vs one with SingleflightMiddleware.

Runs a LoopbackUpstream (127.0.0.1, 50 ms handler) in a child process, so the server does not
share the client's GIL, and measures in one run (the same scenarios as bench_httpx.py):

(a) 1,000 concurrent identical GETs: upstream hits and wall time, plain vs wrapped, and the
    wrapped burst's ratio to one lone GET (target <= 1.5);
(b) 2,000 concurrent GETs over distinct URLs (nothing to coalesce): wrapped / plain wall time
    (target <= 1.05: the overhead of keys, flights and snapshots).

Both sessions use a 100-connection pool (aiohttp's default). Every caller reads its body. Each
measurement is repeated (plain and wrapped interleaved) and the median is reported.

A third row, "floor", is aiohttp's own cost for the burst: 1,000 GETs on a session whose
middleware makes no request at all, holds every caller until ``delay`` has passed and then
hands each a ready response. No coalescing layer in aiohttp can beat it, so the wrapped burst is
also shown against it. Likewise the distinct GETs run a third time on a session with a
middleware that only calls the next handler: the share of the overhead that is aiohttp's own
middleware machinery, which any middleware pays.

    python benchmarks/bench_aiohttp.py [--repeat 5] [--delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable

import aiohttp
from _common import fresh, table, timed

from singleflight._http import Snapshot
from singleflight.aiohttp import SingleflightMiddleware, _respond


async def upstream_hits(control: aiohttp.ClientSession, url: str) -> int:
    async with control.get(url + "/_upstream/hits") as resp:
        return int((await resp.json())["total"])


async def get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        return await resp.read()


async def pass_through(
    req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    return await handler(req)


class Floor:
    """A middleware that answers without any network once ``delay`` has passed."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.ready: asyncio.Future[None] | None = None
        self.body = b'{"hit": 1}'
        self.snap = Snapshot.build(
            200,
            "OK",
            "HTTP/1.1",
            [("Content-Type", "application/json"), ("Content-Length", str(len(self.body)))],
            self.body,
        )

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready = ready = loop.create_future()
        loop.call_later(self.delay, ready.set_result, None)

    async def __call__(
        self, req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        assert self.ready is not None
        await self.ready
        return _respond(req, self.snap)


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
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {
        "plain": aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100), timeout=timeout),
        "wrapped": aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=timeout,
            middlewares=(SingleflightMiddleware(),),
        ),
    }
    floor = Floor(delay)
    floor_session = aiohttp.ClientSession(timeout=timeout, middlewares=(floor,))
    pass_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100), timeout=timeout, middlewares=(pass_through,)
    )
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    hits: dict[tuple[str, str], list[int]] = {}
    async with aiohttp.ClientSession() as control:
        for s in (*sessions.values(), pass_session):  # warm up: pool connections, imports
            await asyncio.gather(*[get(s, url + fresh("warm") + q) for _ in range(100)])

        async def record(case: str, name: str, fn: Callable[[], Awaitable[object]]) -> None:
            before = await upstream_hits(control, url)
            times.setdefault((case, name), []).append(await timed(fn))
            hits.setdefault((case, name), []).append(await upstream_hits(control, url) - before)

        for _ in range(repeat):
            for name, s in sessions.items():
                await record("lone", name, lambda s=s: get(s, url + fresh("lone") + q))

                async def same(s: aiohttp.ClientSession = s) -> None:
                    target = url + fresh("same") + q
                    await asyncio.gather(*[get(s, target) for _ in range(burst)])

                await record("same", name, same)

                async def spread(s: aiohttp.ClientSession = s) -> None:
                    await asyncio.gather(*[get(s, url + fresh("d") + q) for _ in range(distinct)])

                await record("distinct", name, spread)

            async def held() -> None:
                floor.arm()
                target = url + fresh("floor") + q
                await asyncio.gather(*[get(floor_session, target) for _ in range(burst)])

            await record("same", "floor", held)

            async def spread_pass() -> None:
                await asyncio.gather(
                    *[get(pass_session, url + fresh("d") + q) for _ in range(distinct)]
                )

            await record("distinct", "pass-through", spread_pass)
    for s in (*sessions.values(), floor_session, pass_session):
        await s.close()

    def med(case: str, name: str, cpu: bool = False) -> float:
        return statistics.median(t[cpu] for t in times[(case, name)])

    rows: list[tuple[str, ...]] = [
        ("scenario", "session", "upstream hits", "wall ms", "client CPU ms", "ratio")
    ]

    def row(scenario: str, case: str, name: str, ratio: str = "") -> None:
        rows.append(
            (
                scenario,
                name,
                str(max(hits[(case, name)])),
                f"{med(case, name) * 1e3:.1f}",
                f"{med(case, name, cpu=True) * 1e3:.1f}",
                ratio,
            )
        )

    lone = med("lone", "wrapped")
    for name in sessions:
        row("1 lone GET", "lone", name)
    row(f"{burst} identical GETs", "same", "plain", f"{med('same', 'plain') / lone:.2f}x lone GET")
    row(
        f"{burst} identical GETs",
        "same",
        "wrapped",
        f"{med('same', 'wrapped') / lone:.2f}x lone GET (target <= 1.5), "
        f"{med('same', 'wrapped') / med('same', 'floor'):.2f}x floor",
    )
    row(
        f"{burst} GETs, no network",
        "same",
        "floor",
        f"aiohttp alone: {med('same', 'floor') / lone:.2f}x lone GET",
    )
    plain, wrapped = med("distinct", "plain"), med("distinct", "wrapped")
    passing = med("distinct", "pass-through")
    cpu = med("distinct", "wrapped", cpu=True) / med("distinct", "plain", cpu=True)
    row(f"{distinct} distinct GETs", "distinct", "plain")
    row(
        f"{distinct} distinct GETs",
        "distinct",
        "wrapped",
        f"{wrapped / plain:.3f}x plain, CPU {cpu:.3f}x (target <= 1.05); "
        f"{wrapped / passing:.3f}x pass-through",
    )
    row(f"{distinct} distinct GETs", "distinct", "pass-through", f"{passing / plain:.3f}x plain")
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
        f"aiohttp {aiohttp.__version__}, Python {sys.version.split()[0]}, upstream handler "
        f"{args.delay * 1e3:.0f} ms, median of {args.repeat}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
