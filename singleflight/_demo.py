"""The demo: a burst of identical calls to a slow function, with and without singleflight."""

from __future__ import annotations

import argparse
import asyncio
import time

from ._group import Group

__all__ = ("run",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m singleflight",
        description="Show concurrent identical work happening exactly once.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fire a burst of identical calls at a slow function")
    demo.add_argument("--requests", type=int, default=1000, help="calls in the burst (1000)")
    demo.add_argument("--delay", type=float, default=0.1, help="seconds the work takes (0.1)")
    return p


async def _burst(n: int, delay: float, group: Group[int] | None) -> tuple[int, float]:
    runs = 0

    async def slow() -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(delay)
        return 42

    t0 = time.perf_counter()
    if group is None:
        await asyncio.gather(*[slow() for _ in range(n)])
    else:
        await asyncio.gather(*[group.do("answer", slow) for _ in range(n)])
    return runs, time.perf_counter() - t0


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    plain = asyncio.run(_burst(args.requests, args.delay, None))
    coalesced = asyncio.run(_burst(args.requests, args.delay, Group()))
    print(f"{args.requests} concurrent calls to a function that takes {args.delay * 1000:.0f} ms")
    print(f"  plain:        {plain[0]:>5} runs in {plain[1] * 1000:7.1f} ms")
    print(f"  singleflight: {coalesced[0]:>5} runs in {coalesced[1] * 1000:7.1f} ms")
    return 0
