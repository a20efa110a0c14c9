"""Soak: 1,000,000 mixed calls in one process; memory, tasks and fds must stay flat.

The calls go to two Groups sharing the same keys: a plain one (``do``'s fast path) and one
with a ``cachetools.TTLCache`` (TTL hits, expiries, evictions). Most calls are asyncio tasks
on the main loop; a few threads call ``do_sync`` on the same groups and keys at the same
time, so flights cross worlds (async followers of thread leaders and the reverse). The mix:
hot and cold keys, work that fails (``Exception`` and a ``BaseException``), callers cancelled
by the driver (leaders and followers, so re-elections), callers with their own short
``asyncio.timeout``, work that answers at once or after a few loop turns or a short sleep.

The calls run in rounds; between rounds everything has returned, so each sample of the curve
is taken at rest (after ``gc.collect()``): tracemalloc current MiB, RSS MiB
(``/proc/self/statm``), asyncio tasks, open fds (``/proc/self/fd``), threads, ``in_flight``.

Verdict (exit status 1 if it fails):
  * memory flat after warm-up (the first quarter of the calls): the last quarter's highest
    tracemalloc and RSS samples stay within a few % (with a small absolute floor) of the
    level at the end of the warm-up;
  * every sample: nothing in flight (``in_flight == 0``, the map's internals empty), only the
    driver task alive; no growth of fds or threads; stats add up
    (``calls == leaders + followers + cache_hits`` == the calls made);
  * no caller saw an outcome that was not its own (a cancellation it did not get, a timeout
    it did not set, an exception the work never raises).

Run: python benchmarks/soak.py [--calls 1000000] [--samples 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import os
import random
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from singleflight import Group

#: Relative and absolute (MiB) tolerance of "flat": the last quarter's peak may exceed the
#: warm-up level by at most max(rel * level, abs).
TRACEMALLOC_TOLERANCE = (0.05, 0.125)
RSS_TOLERANCE = (0.05, 2.0)

HOT_KEYS = 16  # many callers at once: flights with followers, re-elections
COLD_KEYS = 4000  # mostly one caller: TTL misses, evictions
ROUND = 2000  # calls per round (async + threads)
THREADS = 3
THREAD_SHARE = 0.1  # of each round's calls, made by the threads
TTL = 0.02  # seconds: entries expire many times over a run
MAXSIZE = 512
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


class SoakError(Exception):
    """Raised by the work on purpose."""


class SoakBail(BaseException):
    """A BaseException raised by the work on purpose (not a cancellation)."""


@dataclass
class Sample:
    calls: int
    seconds: float
    traced_mib: float
    rss_mib: float
    tasks: int
    fds: int
    threads: int
    in_flight: int

    def row(self) -> str:
        return (
            f"{self.calls:>10,} {self.seconds:>8.1f} {self.traced_mib:>10.3f} "
            f"{self.rss_mib:>8.1f} {self.tasks:>6} {self.fds:>5} {self.threads:>8} "
            f"{self.in_flight:>9}"
        )


HEADER = (
    f"{'calls':>10} {'seconds':>8} {'traced MiB':>10} {'RSS MiB':>8} {'tasks':>6} "
    f"{'fds':>5} {'threads':>8} {'in_flight':>9}"
)


@dataclass
class Report:
    calls: int
    samples: list[Sample]
    outcomes: Counter[str]
    stats: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / MIB


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _flat(name: str, values: list[float], level: float, tol: tuple[float, float]) -> str | None:
    peak = max(values)
    allowed = level + max(tol[0] * level, tol[1])
    if peak > allowed:
        return (
            f"{name} grew after warm-up: last-quarter peak {peak:.3f} MiB > "
            f"{allowed:.3f} MiB (warm-up level {level:.3f} MiB)"
        )
    return None


class Soak:
    """The driver: rounds of mixed calls, a sample at rest every ``every`` calls."""

    def __init__(self, calls: int, samples: int, seed: int, out: Callable[[str], None]) -> None:
        self.total = calls
        self.every = max(ROUND, calls // max(1, samples) // ROUND * ROUND)
        self.rng = random.Random(seed)
        self.seed = seed
        self.out = out
        self.plain: Group[Any] = Group()
        self.cached: Group[Any] = Group(TTLCache(MAXSIZE, TTL))
        self.groups = (self.plain, self.cached)
        self.made = 0  # calls that entered a group (each is counted once by its stats)
        self.outcomes: Counter[str] = Counter()
        self.anomalies: list[str] = []
        self._lock = threading.Lock()  # guards made/outcomes/anomalies from the threads

    # -- the work ------------------------------------------------------------------------

    @staticmethod
    def _key(rng: random.Random) -> int:
        return (
            rng.randrange(HOT_KEYS) if rng.random() < 0.5 else HOT_KEYS + rng.randrange(COLD_KEYS)
        )

    @staticmethod
    async def _awork(key: int, fail: str, pause: int) -> Any:
        if pause < 0:
            await asyncio.sleep(0.0005)
        for _ in range(pause):
            await asyncio.sleep(0)
        if fail == "error":
            raise SoakError(key)
        if fail == "bail":
            raise SoakBail(key)
        return (key, bytes(200))  # a fresh value per run: a leak of values would show

    @staticmethod
    def _swork(key: int, fail: str, pause: bool) -> Any:
        if pause:
            time.sleep(0.0002)
        if fail == "error":
            raise SoakError(key)
        return (key, bytes(200))

    def _tally(self, outcome: str, anomaly: str | None = None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if anomaly is not None and len(self.anomalies) < 20:
                self.anomalies.append(anomaly)

    # -- async callers -------------------------------------------------------------------

    async def _acall(self, group: Group[Any], key: int, fail: str, pause: int, t: float | None):
        with self._lock:
            self.made += 1
        if t is None:
            return await group.do(key, self._awork, key, fail, pause)
        async with asyncio.timeout(t):
            return await group.do(key, self._awork, key, fail, pause)

    async def _round(self, n_async: int, pool: concurrent.futures.Executor) -> None:
        rng = self.rng
        loop = asyncio.get_running_loop()
        per_thread = (ROUND - n_async) // THREADS
        jobs = [
            loop.run_in_executor(pool, self._thread_job, rng.randrange(1 << 30), per_thread)
            for _ in range(THREADS)
        ]
        tasks: list[asyncio.Task[Any]] = []
        timed: set[int] = set()
        for i in range(n_async):
            r = rng.random()
            fail = "error" if r < 0.08 else "bail" if r < 0.09 else "none"
            pause = rng.choice((0, 0, 1, 2, 3, -1))
            t = None
            if rng.random() < 0.05:
                t = rng.choice((0.0002, 0.001))
                timed.add(i)
            group = self.groups[rng.random() < 0.5]
            tasks.append(asyncio.create_task(self._acall(group, self._key(rng), fail, pause, t)))
            if rng.random() < 0.01:
                await asyncio.sleep(0)  # let some flights land while others start
        await asyncio.sleep(0)  # every task has entered: leaders run, followers wait
        cancelled = set(rng.sample(range(n_async), n_async // 40))
        for i in cancelled:
            tasks[i].cancel()
        await asyncio.sleep(0)
        more = set(rng.sample(range(n_async), n_async // 100))
        for i in more:
            tasks[i].cancel()
        cancelled |= more
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, res in enumerate(results):
            self._judge_async(i, res, i in cancelled, i in timed)
        await asyncio.gather(*jobs)

    def _judge_async(self, i: int, res: Any, cancelled: bool, timed: bool) -> None:
        if isinstance(res, asyncio.CancelledError):
            self._tally("cancelled", None if cancelled else f"task {i}: a cancellation not its own")
        elif isinstance(res, TimeoutError):
            self._tally("timeout", None if timed else f"task {i}: a timeout it never set")
        elif isinstance(res, SoakError):
            self._tally("error")
        elif isinstance(res, SoakBail):
            self._tally("bail")
        elif isinstance(res, tuple):
            self._tally("value")
        else:
            self._tally("anomaly", f"task {i}: unexpected outcome {res!r}")

    # -- thread callers ------------------------------------------------------------------

    def _thread_job(self, seed: int, n: int) -> None:
        rng = random.Random(seed)
        for _ in range(n):
            group = self.groups[rng.random() < 0.5]
            key = self._key(rng)
            fail = "error" if rng.random() < 0.08 else "none"
            with self._lock:
                self.made += 1
            try:
                group.do_sync(key, self._swork, key, fail, rng.random() < 0.3)
            except SoakError:
                self._tally("error")
            except SoakBail:  # an async leader's BaseException reaches thread followers too
                self._tally("bail")
            except BaseException as exc:  # noqa: B036 - judged, never swallowed silently
                self._tally("anomaly", f"thread call: unexpected {exc!r}")
            else:
                self._tally("value")

    # -- sampling and verdict ------------------------------------------------------------

    def _sample(self, done: int, t0: float) -> Sample:
        gc.collect()
        traced, _peak = tracemalloc.get_traced_memory()
        return Sample(
            calls=done,
            seconds=time.perf_counter() - t0,
            traced_mib=traced / MIB,
            rss_mib=rss_mib(),
            tasks=len(asyncio.all_tasks()),
            fds=open_fds(),
            threads=threading.active_count(),
            in_flight=sum(g.in_flight for g in self.groups),
        )

    def _at_rest(self, s: Sample) -> list[str]:
        problems = []
        if s.in_flight:
            problems.append(f"at {s.calls:,} calls: in_flight = {s.in_flight} at rest")
        for g in self.groups:
            m = g._map
            if m._flights or m._next or m._registered:
                problems.append(
                    f"at {s.calls:,} calls: stale map state {len(m._flights)} flights, "
                    f"{len(m._next)} forget marks, {len(m._registered)} registrations"
                )
        if s.tasks != 1:
            problems.append(f"at {s.calls:,} calls: {s.tasks} asyncio tasks alive at rest")
        stats = [g.stats for g in self.groups]
        if any(st.calls != st.leaders + st.followers + st.cache_hits for st in stats):
            problems.append(f"at {s.calls:,} calls: stats do not add up: {stats}")
        if sum(st.calls for st in stats) != self.made:
            problems.append(
                f"at {s.calls:,} calls: stats count {sum(st.calls for st in stats):,} calls, "
                f"{self.made:,} were made"
            )
        return problems

    async def run(self) -> Report:
        tracemalloc.start()
        t0 = time.perf_counter()
        samples: list[Sample] = []
        failures: list[str] = []
        n_async = ROUND - THREADS * int(ROUND * THREAD_SHARE / THREADS)
        self.out(
            f"soak: {self.total:,} calls, rounds of {ROUND} ({ROUND - n_async} from "
            f"{THREADS} threads), a sample every {self.every:,} calls, seed {self.seed}"
        )
        self.out(HEADER)
        with concurrent.futures.ThreadPoolExecutor(THREADS, "soak") as pool:
            await loop_ready(pool)
            samples.append(self._sample(0, t0))
            self.out(samples[-1].row())
            done = 0
            while done < self.total:
                await self._round(n_async, pool)
                done += ROUND
                if done % self.every == 0 or done >= self.total:
                    s = self._sample(done, t0)
                    samples.append(s)
                    failures += self._at_rest(s)
                    self.out(s.row())
        tracemalloc.stop()
        failures += self._verdict(samples)
        failures += self.anomalies
        stats = {name: g.stats for name, g in (("plain", self.plain), ("ttl", self.cached))}
        return Report(done, samples, self.outcomes, stats, failures)

    def _verdict(self, samples: list[Sample]) -> list[str]:
        failures: list[str] = []
        measured = samples[1:]  # samples[0] is before the first call
        if len(measured) < 4:
            return [f"too few samples ({len(measured)}) for a verdict: use more calls"]
        quarter = self.total / 4
        warm = [s for s in measured if s.calls <= quarter] or measured[:1]
        last = [s for s in measured if s.calls > 3 * quarter]
        level = warm[-1]
        for name, get, tol in (
            ("tracemalloc", lambda s: s.traced_mib, TRACEMALLOC_TOLERANCE),
            ("RSS", lambda s: s.rss_mib, RSS_TOLERANCE),
        ):
            problem = _flat(name, [get(s) for s in last], get(level), tol)
            if problem:
                failures.append(problem)
        if max(s.fds for s in last) > level.fds:
            failures.append(f"open fds grew: {level.fds} after warm-up, then {last[-1].fds}")
        if max(s.threads for s in last) > level.threads:
            failures.append(f"threads grew: {level.threads} after warm-up, then {last[-1].threads}")
        if samples[-1].in_flight:
            failures.append(f"{samples[-1].in_flight} key(s) still in flight at the end")
        return failures


async def loop_ready(pool: concurrent.futures.Executor) -> None:
    """Start the pool's threads before the first sample, so they are not counted as growth."""
    loop = asyncio.get_running_loop()
    barrier = threading.Barrier(THREADS, timeout=10)
    await asyncio.gather(*(loop.run_in_executor(pool, barrier.wait) for _ in range(THREADS)))


def soak(
    calls: int = 1_000_000, *, samples: int = 20, seed: int = 0, out: Callable[[str], None] = print
) -> Report:
    """Run the soak and return its report (``report.ok``, ``report.failures``)."""
    calls = max(ROUND, calls // ROUND * ROUND)
    report = asyncio.run(Soak(calls, samples, seed, out).run())
    first, last = report.samples[1], report.samples[-1]
    rate = last.calls / last.seconds if last.seconds else 0.0
    out(
        f"outcomes: {dict(sorted(report.outcomes.items()))}; "
        + "; ".join(f"{k}: {v}" for k, v in report.stats.items())
    )
    out(
        f"{last.calls:,} calls in {last.seconds:.1f} s ({rate:,.0f} calls/s); tracemalloc "
        f"{first.traced_mib:.3f} -> {last.traced_mib:.3f} MiB, RSS {first.rss_mib:.1f} -> "
        f"{last.rss_mib:.1f} MiB, tasks {last.tasks}, fds {last.fds}, in_flight {last.in_flight}"
    )
    if report.ok:
        out("verdict: PASS (memory flat after warm-up, nothing in flight, no task/fd growth)")
    else:
        out("verdict: FAIL")
        for f in report.failures:
            out(f"  - {f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000, help="total calls (default 1M)")
    parser.add_argument("--samples", type=int, default=20, help="points on the curve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = soak(args.calls, samples=args.samples, seed=args.seed)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
