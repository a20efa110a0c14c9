"""Core benchmark: Group.do against a ~20-line hand-written baseline, in one run.

Scenarios (median of --runs runs each; GC disabled while timing):
  a) ns of overhead per uncontended ``do`` over a direct ``await fn()``
  b) 10,000 tasks on one key, the work sleeps 1 ms: wall time
  c) 100,000 calls over 1,000 keys (100 per key at once), work sleeps 1 ms: wall time, peak MiB

Run: python benchmarks/bench_core.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from singleflight import Group


class Minimal:
    """The floor: dict of key -> follower futures, leader awaits the work inline.

    Not thread-safe, not loop-safe, not cancel-safe for followers of a cancelled leader.
    """

    def __init__(self) -> None:
        self.m: dict[Any, list[asyncio.Future[Any]]] = {}

    async def do(self, key: Any, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        m = self.m
        waiters = m.get(key)
        if waiters is not None:
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        m[key] = waiters = []
        try:
            value = await fn(*args)
        except BaseException as exc:
            del m[key]
            for f in waiters:
                if not f.done():
                    f.set_exception(exc)
            raise
        del m[key]
        for f in waiters:
            if not f.done():
                f.set_result(value)
        return value


async def _instant() -> int:
    return 1


async def _sleep_1ms() -> int:
    await asyncio.sleep(0.001)
    return 1


async def scenario_a(impl: Any, n: int) -> float:
    do = impl.do
    fn = _instant
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        await do(i, fn)
    wrapped = time.perf_counter() - t0
    return (wrapped - direct) / n * 1e9


async def scenario_b(impl: Any) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*[impl.do("k", _sleep_1ms) for _ in range(10_000)])
    return (time.perf_counter() - t0) * 1e3


async def scenario_c(impl: Any) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*[impl.do(i % 1000, _sleep_1ms) for i in range(100_000)])
    return (time.perf_counter() - t0) * 1e3


def _timed(coro_fn: Callable[[], Awaitable[float]]) -> float:
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    finally:
        gc.enable()


def _peak_mib(impl_factory: Callable[[], Any]) -> float:
    gc.collect()
    tracemalloc.start()
    asyncio.run(scenario_c(impl_factory()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000, help="calls in scenario a")
    args = parser.parse_args()
    impls: dict[str, Callable[[], Any]] = {"baseline": Minimal, "singleflight": Group}
    rows: dict[str, dict[str, float]] = {name: {} for name in impls}
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):
        for name, factory in impls.items():  # interleaved, so drift hits both alike
            samples.setdefault((name, "a"), []).append(
                _timed(lambda f=factory: scenario_a(f(), args.calls))
            )
            samples.setdefault((name, "b"), []).append(_timed(lambda f=factory: scenario_b(f())))
            samples.setdefault((name, "c"), []).append(_timed(lambda f=factory: scenario_c(f())))
    for name, factory in impls.items():
        for s in "abc":
            rows[name][s] = statistics.median(samples[(name, s)])
        rows[name]["mem"] = _peak_mib(factory)
    base = rows["baseline"]
    print(f"median of {args.runs} runs (CPython, GC off while timing)\n")
    print(
        "| impl | a: ns/call overhead | b: 10k on 1 key, ms | c: 100k calls / 1k keys, ms |"
        " c: peak MiB |"
    )
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [f"{r['a']:.0f}", f"{r['b']:.1f}", f"{r['c']:.0f}", f"{r['mem']:.0f}"]
        ratios = [r[s] / base[s] for s in ("a", "b", "c", "mem")]
        joined = " | ".join(f"{c} ({x:.2f}x)" for c, x in zip(cells, ratios, strict=True))
        print(f"| {name} | {joined} |")


if __name__ == "__main__":
    main()
