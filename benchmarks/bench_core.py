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
import sys
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

    async def do(
        self, key: Any, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        # The same calling convention as Group.do (positional and keyword arguments for fn).
        m = self.m
        waiters = m.get(key)
        if waiters is not None:
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        m[key] = waiters = []
        try:
            value = await fn(*args, **kwargs)
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


Clock = Callable[[], float]


async def scenario_a(impl: Any, n: int, clock: Clock) -> float:
    """ns of overhead per uncontended call, over a direct await of the same work."""
    do = impl.do
    fn = _instant
    t0 = clock()
    for _ in range(n):
        await fn()
    direct = clock() - t0
    t0 = clock()
    for i in range(n):
        await do(i, fn)
    wrapped = clock() - t0
    return (wrapped - direct) / n * 1e9


async def scenario_b(impl: Any, clock: Clock) -> float:
    t0 = clock()
    await asyncio.gather(*[impl.do("k", _sleep_1ms) for _ in range(10_000)])
    return (clock() - t0) * 1e3


async def scenario_c(impl: Any, clock: Clock) -> float:
    t0 = clock()
    await asyncio.gather(*[impl.do(i % 1000, _sleep_1ms) for i in range(100_000)])
    return (clock() - t0) * 1e3


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
    asyncio.run(scenario_c(impl_factory(), time.perf_counter))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000, help="calls in scenario a")
    args = parser.parse_args()
    impls: dict[str, Callable[[], Any]] = {"baseline": Minimal, "singleflight": Group}
    samples: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.runs):
        for clock_name, clock in CLOCKS.items():
            for name, factory in impls.items():  # interleaved, so drift hits both alike
                runs = {
                    "a": lambda f=factory, k=clock: scenario_a(f(), args.calls, k),
                    "b": lambda f=factory, k=clock: scenario_b(f(), k),
                    "c": lambda f=factory, k=clock: scenario_c(f(), k),
                }
                for s, run in runs.items():
                    samples.setdefault((clock_name, name, s), []).append(_timed(run))
    mem = {name: _peak_mib(factory) for name, factory in impls.items()}
    print(f"median of {args.runs} runs, CPython {sys.version.split()[0]}, GC off while timing")
    for clock_name in CLOCKS:
        what = "wall time" if clock_name == "wall" else "CPU time of this process"
        print(f"\n{what}:\n")
        print(
            "| impl | a: ns/call overhead | b: 10k on 1 key, ms | c: 100k calls / 1k keys, ms |"
            " c: peak MiB |"
        )
        print("|---|---|---|---|---|")
        med = {
            (name, s): statistics.median(samples[(clock_name, name, s)])
            for name in impls
            for s in "abc"
        }
        for name in impls:
            cells = [
                f"{med[(name, 'a')]:.0f} ({med[(name, 'a')] / med[('baseline', 'a')]:.2f}x)",
                f"{med[(name, 'b')]:.1f} ({med[(name, 'b')] / med[('baseline', 'b')]:.2f}x)",
                f"{med[(name, 'c')]:.0f} ({med[(name, 'c')] / med[('baseline', 'c')]:.2f}x)",
                f"{mem[name]:.0f} ({mem[name] / mem['baseline']:.2f}x)",
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
