"""Instructions per call of singleflight and of its floor, counted by valgrind's callgrind.

Wall time on a shared 2-core machine moves by 20-50 % from run to run; instruction counts do not
(same interpreter, same inputs, same count). Each variant of a scenario runs in its own
interpreter under callgrind at two sizes; the difference divided by the extra calls is the cost
of one call, free of interpreter start-up and imports. Every floor is measured in the same run.

Rows (``--only`` takes their ids):
  a        uncontended ``Group.do``, overhead above a plain ``await fn()``, vs the 20-line floor
  a-deco   ``@singleflight`` on an async function (a trampoline ``f(key, fn)``, as in issue 15)
  b        2,000-4,000 tasks on one key, per task
  c        many keys, 100 tasks per key, per task
  c-mem    peak tracemalloc bytes per task in (c), not under valgrind
  s        uncontended ``do_sync``, overhead above a plain ``fn()``, vs a 20-line locked floor
  t        threads fan-out: 50-100 threads on one key, per thread (thread start included)
  d-sync   ``@singleflight`` on a sync function, overhead above a plain call
  d-meth   ``@singleflight`` on an async method, overhead above a plain ``await obj.m(i)``
  d-ttl    ``@singleflight(ttl=...)`` cache hits vs a hand-written TTLCache lookup
  h-dist   httpx: distinct GETs through ``AsyncClient``, inner transport answers at once
  h-same   httpx: 500-1,000 identical concurrent GETs (plain: each answered at once)
  h-ttl    httpx: ``ttl=`` cache hits vs the plain client answered at once
  x-dist   aiohttp: distinct GETs, SingleflightMiddleware vs a pass-through middleware, both
           ending in a middleware that answers at once (no connector, no network)
  x-same   aiohttp: identical concurrent GETs vs the answer-at-once middleware alone

    python benchmarks/bench_icount.py [--only a,b] [--json OUT] [--jobs 2]

Needs valgrind (``apt-get install valgrind``). The child interpreter is this one
(``sys.executable``); ``singleflight`` is imported from the repository this file is in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from _common import table

__all__ = ("ROWS", "Row", "instructions", "main")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = (5000, 10000)
HTTP = (500, 1000)


@dataclass(frozen=True)
class Row:
    """One line of the table: ours against the floor in one scenario."""

    id: str
    label: str
    scen: str  # the child's scenario
    floor: str  # the child's variant that is the floor
    ours: str
    sizes: tuple[int, int]
    target: str
    direct: str | None = None  # subtract this variant from both: "overhead above a plain call"
    extra: tuple[str, ...] = ()  # more variants measured and reported in the JSON


ROWS: tuple[Row, ...] = (
    Row(
        "a",
        "a: uncontended `Group.do`, overhead above a plain await",
        "a",
        "minimal",
        "group",
        CORE,
        "≤ 1.20×",
        direct="direct",
    ),
    Row(
        "a-deco",
        "a: `@singleflight` on an async function, overhead above a plain await",
        "a",
        "minimal",
        "deco",
        CORE,
        "≤ 2.0×",
        direct="direct",
    ),
    Row(
        "b",
        "b: 2,000–4,000 tasks on one key, per task",
        "b",
        "minimal",
        "group",
        (2000, 4000),
        "≤ 1.04×",
    ),
    Row(
        "c",
        "c: many keys (100 tasks per key), per task",
        "c",
        "minimal",
        "group",
        (4000, 8000),
        "≤ 1.04×",
    ),
    Row(
        "s",
        "`do_sync` uncontended, overhead above a plain call",
        "s",
        "minimal",
        "group",
        CORE,
        "≤ 1.20× (proposed)",
        direct="direct",
    ),
    Row(
        "t",
        "threads fan-out: 50–100 threads on one key, per thread",
        "t",
        "minimal",
        "group",
        (50, 100),
        "≤ 1.04× (proposed)",
    ),
    Row(
        "d-sync",
        "`@singleflight` on a sync function, overhead above a plain call",
        "ds",
        "minimal",
        "deco",
        CORE,
        "≤ 2.0× (proposed)",
        direct="direct",
    ),
    Row(
        "d-meth",
        "`@singleflight` on an async method, overhead above a plain await",
        "dm",
        "minimal",
        "deco",
        CORE,
        "≤ 2.0× (proposed)",
        direct="direct",
    ),
    Row(
        "d-ttl",
        "`@singleflight(ttl=…)` cache hit (async), whole call",
        "dt",
        "minimal",
        "deco",
        CORE,
        "≤ 1.5× (proposed)",
    ),
    Row(
        "h-dist",
        "httpx: distinct GET through `AsyncClient`, inner answers at once",
        "ha",
        "plain",
        "wrapped",
        HTTP,
        "≤ 1.08×",
    ),
    Row(
        "h-same",
        "httpx: 500–1,000 identical concurrent GETs, per request",
        "hb",
        "plain",
        "wrapped",
        HTTP,
        "≤ 1.08×",
    ),
    Row(
        "h-ttl",
        "httpx: `ttl=` cache hit vs plain client answered at once",
        "hc",
        "plain",
        "wrapped",
        HTTP,
        "≤ 1.00× (proposed)",
    ),
    Row(
        "x-dist",
        "aiohttp: distinct GET vs a pass-through middleware, handler answers at once",
        "xa",
        "pass",
        "wrapped",
        HTTP,
        "≤ 1.05×",
        extra=("plain",),
    ),
    Row(
        "x-same",
        "aiohttp: 500–1,000 identical concurrent GETs vs answer-at-once middleware",
        "xb",
        "plain",
        "wrapped",
        HTTP,
        "≤ 1.15×",
    ),
)
ROWS += (
    Row(
        "c-mem",
        "c: peak traced bytes per task (tracemalloc, not callgrind)",
        "c-mem",
        "minimal",
        "group",
        (20000, 40000),
        "≤ 1.10×",
    ),
)
IDS = tuple(r.id for r in ROWS)


def instructions(scen: str, variant: str, n: int) -> int:
    """Instructions callgrind counts for one child run (start-up and imports included)."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            scen,
            variant,
            str(n),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=_child_env(),
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or not m:
        raise SystemExit(f"{scen}/{variant}/{n} failed:\n{out.stderr[-3000:]}")
    return int(m.group(1))


def peak_bytes(scen: str, variant: str, n: int) -> int:
    """Peak tracemalloc bytes of one child run (tracing starts after the imports)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", scen, variant, str(n), "--mode=mem"],
        capture_output=True,
        text=True,
        check=False,
        env=_child_env(),
    )
    if out.returncode != 0:
        raise SystemExit(f"{scen}/{variant}/{n} --mem failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.split()[-1])


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": ROOT if not path else ROOT + os.pathsep + path,
    }


def measure(
    rows: Iterable[Row], jobs: int, log: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Per-call cost of every variant the rows need: {row id: {variant: per call}}."""
    runs: dict[tuple[str, str, int], int] = {}
    wanted: list[tuple[str, str, int]] = []
    plan: list[tuple[Row, list[str]]] = []
    for row in rows:
        variants = [row.floor, row.ours, *row.extra]
        if row.direct:
            variants.append(row.direct)
        plan.append((row, variants))
        for v in variants:
            for n in row.sizes:
                if (row.scen, v, n) not in wanted:
                    wanted.append((row.scen, v, n))
    # The slow (HTTP) runs first, so the two workers finish together.
    wanted.sort(key=lambda w: w[0][0] not in "hx")

    def one(w: tuple[str, str, int]) -> int:
        return (peak_bytes if w[0].endswith("-mem") else instructions)(*w)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for w, count in zip(wanted, pool.map(one, wanted), strict=True):
            runs[w] = count
            log(f"{w[0]:3s} {w[1]:8s} n={w[2]:<6d} {count:>14,d}")
    out: dict[str, dict[str, float]] = {}
    for row, variants in plan:
        lo, hi = row.sizes
        out[row.id] = {
            v: (runs[(row.scen, v, hi)] - runs[(row.scen, v, lo)]) / (hi - lo) for v in variants
        }
    return out


def _child_json(scen: str, variant: str, n: int, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            scen,
            variant,
            str(n),
            "--mode=" + mode,
        ],
        capture_output=True,
        text=True,
        check=False,
        env=_child_env(),
    )
    if out.returncode != 0:
        raise SystemExit(f"{scen}/{variant}/{n} --mode={mode} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.splitlines()[-1]))


def _c_costs(scen: str, variant: str, n: int) -> dict[str, int]:
    """Instructions by C function (self cost), from callgrind_annotate."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                scen,
                variant,
                str(n),
            ],
            capture_output=True,
            check=True,
            env=_child_env(),
        )
        text = subprocess.run(
            ["callgrind_annotate", "--threshold=99.9", out],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([\d. %]+\)\s+)?(\S+:\S+)", line)
        if m:
            name = m.group(2).split(":", 1)[1].split(" [")[0]
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def profile(row: Row, with_c: bool) -> None:
    """Per call, floor vs ours: calls per function, bytecodes per function, C instructions."""
    lo, hi = row.sizes
    lo, hi = max(lo // 5, 20), max(hi // 5, 40)
    variants = [row.floor, row.ours] + ([row.direct] if row.direct else [])
    kinds = [("calls", "calls per call (cProfile; C = builtins)"), ("ops", "bytecodes per call")]
    for mode, title in kinds:
        per = {}
        for v in variants:
            a, b = _child_json(row.scen, v, lo, mode), _child_json(row.scen, v, hi, mode)
            per[v] = {k: (b.get(k, 0) - a.get(k, 0)) / (hi - lo) for k in b}
        _print_costs(f"{row.id}: {title}", per, variants, 0.5)
    if with_c:
        per = {}
        for v in variants:
            a, b = _c_costs(row.scen, v, lo), _c_costs(row.scen, v, hi)
            per[v] = {k: (b.get(k, 0) - a.get(k, 0)) / (hi - lo) for k in b}
        _print_costs(f"{row.id}: machine instructions per call by C function", per, variants, 20)


def _print_costs(
    title: str, per: dict[str, dict[str, float]], variants: list[str], least: float
) -> None:
    """The functions where ours and the floor differ most (variants[0] floor, [1] ours)."""
    floor, ours = per[variants[0]], per[variants[1]]

    def delta(k: str) -> float:
        return ours.get(k, 0) - floor.get(k, 0)

    names = sorted((k for k in {*floor, *ours} if abs(delta(k)) >= least), key=lambda k: -delta(k))
    print(f"\n### {title}\n")
    rows: list[tuple[str, ...]] = [("function", *variants, "ours − floor")]
    for k in names[:30]:
        rows.append(
            (f"`{k}`", *(f"{per[v].get(k, 0):,.1f}" for v in variants), f"{delta(k):+,.1f}")
        )
    totals = [sum(per[v].values()) for v in variants]
    rows.append(("total", *(f"{t:,.0f}" for t in totals), f"{totals[1] - totals[0]:+,.0f}"))
    print(table(rows))


def ratio(row: Row, per: dict[str, float]) -> tuple[float, float, float]:
    """(floor, ours, ours / floor), overheads above ``direct`` where the row says so."""
    floor, ours = per[row.floor], per[row.ours]
    if row.direct:
        floor -= per[row.direct]
        ours -= per[row.direct]
    return floor, ours, ours / floor


def render(rows: Iterable[Row], res: dict[str, dict[str, float]]) -> str:
    """The Markdown table: scenario | floor | ours | ratio | target."""
    lines: list[tuple[str, ...]] = [("scenario", "floor", "ours", "ratio", "target")]
    for row in rows:
        if row.id not in res:
            continue
        floor, ours, r = ratio(row, res[row.id])
        lines.append(
            (f"{row.label} `[{row.id}]`", f"{floor:,.0f}", f"{ours:,.0f}", f"{r:.2f}×", row.target)
        )
    return table(lines)


# --------------------------------------------------------------------------------------------
# The child: one scenario, one variant, n calls (runs under callgrind, or with --mem under
# tracemalloc). Everything below is imported lazily so both sizes pay the same start-up.


class Minimal:
    """The async floor: dict of key -> follower futures, leader awaits inline, not cancel-safe."""

    __slots__ = ("_m",)

    def __init__(self) -> None:
        self._m: dict[Any, list[Any]] = {}

    async def do(self, key: Any, fn: Callable[[], Any]) -> Any:
        # Issue 15's floor, line for line (no *args: the work is a closure).
        m = self._m
        waiters = m.get(key)
        if waiters is not None:
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        waiters = m[key] = []
        try:
            res = await fn()
        except BaseException as e:
            del m[key]
            cancelled = isinstance(e, asyncio.CancelledError)
            for fut in waiters:
                if not fut.done():
                    fut.cancel() if cancelled else fut.set_exception(e)
            raise
        del m[key]
        for fut in waiters:
            if not fut.done():
                fut.set_result(res)
        return res

    async def call(self, key: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``do`` with the work's arguments: what a hand-written wrapper passes on."""
        m = self._m
        waiters = m.get(key)
        if waiters is not None:
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        waiters = m[key] = []
        try:
            res = await fn(*args)
        except BaseException as e:
            del m[key]
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(e)
            raise
        del m[key]
        for fut in waiters:
            if not fut.done():
                fut.set_result(res)
        return res


class MinimalSync:
    """The threads floor: one lock around a dict of key -> follower locks, Go's shape."""

    __slots__ = ("_lock", "_m")

    def __init__(self) -> None:
        import threading

        self._m: dict[Any, list[list[Any]]] = {}
        self._lock = threading.Lock()

    def do(self, key: Any, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            waiters = self._m.get(key)
            if waiters is None:
                waiters = self._m[key] = []
                box = None
            else:
                box = [threading.Lock(), None, None]
                box[0].acquire()
                waiters.append(box)
        if box is not None:
            box[0].acquire()
            if box[2] is not None:
                raise box[2]
            return box[1]
        value = err = None
        try:
            value = fn(*args)
        except BaseException as e:
            err = e
        with self._lock:
            del self._m[key]
        for w in waiters:
            w[1], w[2] = value, err
            w[0].release()
        if err is not None:
            raise err
        return value


def child(scen: str, variant: str, n: int, mode: str) -> None:
    """Run scenario ``scen`` of ``variant`` with ``n`` calls, GC off.

    ``mode``: "" (count, under callgrind), "mem" (print the peak traced bytes), "calls" (print
    cProfile's call counts per function as JSON), "ops" (print bytecodes run per function).
    """
    import asyncio
    import gc

    if scen in ("s", "t", "ds"):
        main = _sync_scenario(scen, variant, n)
    else:
        main = _async_scenario(scen, variant, n)
    gc.disable()
    if mode == "mem":
        import tracemalloc

        tracemalloc.start()
    counts: dict[str, int] = {}
    prof: Any = None
    if mode == "calls":
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    elif mode == "ops":
        _trace_opcodes(counts)
    if asyncio.iscoroutine(main):
        asyncio.run(main)
    else:
        main()
    sys.settrace(None)
    if mode == "mem":
        print(tracemalloc.get_traced_memory()[1])
    elif mode == "calls":
        import pstats

        prof.disable()
        st: Any = pstats.Stats(prof).stats
        for (path, line, name), (_, ncalls, *_) in st.items():
            counts[f"{_where(path, line)}:{name}"] = ncalls
        print(json.dumps(counts))
    elif mode == "ops":
        print(json.dumps(counts))


def _where(path: str, line: int) -> str:
    if path == "~":
        return "C"
    parts = path.split(os.sep)
    return "/".join(parts[-2:]) + f":{line}"


def _trace_opcodes(counts: dict[str, int]) -> None:
    """Count the bytecodes each Python function runs (threads too)."""
    import threading

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            code = frame.f_code
            name = f"{_where(code.co_filename, code.co_firstlineno)}:{code.co_qualname}"

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "opcode":
                    counts[name] = counts.get(name, 0) + 1
                return local

            return local
        return None

    threading.settrace(tracer)
    sys.settrace(tracer)


def _sync_scenario(scen: str, variant: str, n: int) -> Any:
    import threading
    import time

    import singleflight

    def work(i: Any = None) -> int:
        return 1

    if scen == "ds":  # the decorator on a sync function, key = its arguments
        if variant == "direct":
            f = work
        elif variant == "minimal":
            floor = MinimalSync().do

            def f(i: Any = None) -> int:
                return floor((i,), work, i)  # type: ignore[no-any-return]

        else:
            f = singleflight.singleflight(work)

        def ds() -> None:
            for i in range(n):
                f(i)

        return ds
    if variant == "direct":

        def call(key: Any, fn: Callable[[], Any]) -> Any:
            return fn()

        group = None
    elif variant == "minimal":
        floor_group = MinimalSync()
        call = floor_group.do
        group = None
    else:
        group = singleflight.Group[Any]()
        call = group.do_sync
    if scen == "s":

        def s() -> None:
            for i in range(n):
                call(i, work)

        return s

    def joined() -> int:  # followers waiting on key "k"
        if variant == "minimal":
            return len(floor_group._m.get("k", ()))
        assert group is not None
        return group.stats.followers

    def t() -> None:
        go = threading.Event()

        def lead() -> int:
            go.wait()
            return 1

        leader = threading.Thread(target=call, args=("k", lead))
        leader.start()
        while ("k" not in floor_group._m) if variant == "minimal" else ("k" not in group):
            time.sleep(0.001)
        threads = [threading.Thread(target=call, args=("k", work)) for _ in range(n)]
        for th in threads:
            th.start()
        while joined() < n:
            time.sleep(0.001)
        go.set()
        for th in (leader, *threads):
            th.join()
        assert group is None or group.stats.followers == n, group.stats

    return t


def _async_scenario(scen: str, variant: str, n: int) -> Any:
    import asyncio

    if scen.startswith("h"):
        return _httpx_scenario(scen, variant, n)
    if scen.startswith("x"):
        return _aiohttp_scenario(scen, variant, n)
    import singleflight

    if scen in ("dm", "dt"):
        return _decorated(scen, variant, n)
    call: Callable[[Any, Callable[[], Any]], Any]
    group = None
    if variant == "direct":

        async def direct(key: Any, fn: Callable[[], Any]) -> Any:
            return await fn()

        call = direct
    elif variant == "minimal":
        call = Minimal().do
    elif variant == "group":
        group = singleflight.Group[Any]()
        call = group.do
    else:

        @singleflight.singleflight
        async def tramp(key: Any, fn: Callable[[], Any]) -> Any:
            return await fn()

        call = tramp

    async def a() -> None:
        async def work() -> int:
            return 1

        for i in range(n):
            await call(i, work)

    async def b() -> None:
        ev = asyncio.Event()

        async def work() -> int:
            await ev.wait()
            return 1

        tasks = [asyncio.ensure_future(call("k", work)) for _ in range(n)]
        await asyncio.sleep(0)
        ev.set()
        assert len(await asyncio.gather(*tasks)) == n
        if isinstance(group, singleflight.Group):
            assert group.stats.leaders == 1, group.stats

    async def c() -> None:
        keys = n // 100

        async def work() -> int:
            await asyncio.sleep(0)
            return 1

        await asyncio.gather(*[call(i % keys, work) for i in range(n)])

    return {"a": a, "b": b, "c": c}[scen]()


async def _decorated(scen: str, variant: str, n: int) -> None:
    import cachetools

    import singleflight

    if scen == "dm":  # an async method; key = (self, i)
        floor = Minimal().call

        class Api:
            async def raw(self, i: int) -> int:
                return 1

            def floor(self, i: int) -> Any:  # a hand-written wrapper: no coroutine of its own
                return floor((self, i), self.raw, i)

            deco = singleflight.singleflight(raw)

        api = Api()
        f = {"direct": api.raw, "minimal": api.floor, "deco": api.deco}[variant]
        for i in range(n):
            await f(i)
        return
    # dt: cache hits. The floor is a hand-written TTLCache lookup under a lock, the same
    # cachetools.TTLCache the decorator builds; a miss would lead a flight.
    import threading

    async def work(i: int) -> int:
        return 1

    if variant == "minimal":
        cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(1024, 3600)
        lock = threading.Lock()
        missing = object()
        lead = Minimal().call

        async def g(i: int) -> Any:
            with lock:
                v = cache.get(i, missing)
            if v is missing:
                v = await lead((i,), work, i)
                with lock:
                    cache[i] = v
            return v

    else:
        g = singleflight.singleflight(ttl=3600)(work)
    await g(0)
    for _ in range(n):
        await g(0)
    if variant == "deco":
        assert g.stats.cache_hits == n, g.stats  # type: ignore[attr-defined]


async def _httpx_scenario(scen: str, variant: str, n: int) -> None:
    import asyncio

    import httpx

    from singleflight.httpx import AsyncSingleflightTransport

    class Instant(httpx.AsyncBaseTransport):
        """Answers at once: what httpx itself costs per request."""

        def __init__(self, gate: asyncio.Event | None) -> None:
            self.gate = gate

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if self.gate is not None:
                await self.gate.wait()
            return httpx.Response(
                200, headers=[(b"content-length", b"2")], stream=httpx.ByteStream(b"{}")
            )

    gate = asyncio.Event() if scen == "hb" and variant == "wrapped" else None
    inner = Instant(gate)
    transport: httpx.AsyncBaseTransport = inner
    if variant == "wrapped":
        transport = AsyncSingleflightTransport(inner, ttl=3600 if scen == "hc" else None)
    async with httpx.AsyncClient(transport=transport) as cl:
        if scen == "ha":
            for i in range(n):
                (await cl.get(f"http://example.test/item/{i}")).read()
        elif scen == "hb":
            tasks = [asyncio.ensure_future(cl.get("http://example.test/hot")) for _ in range(n)]
            await asyncio.sleep(0)
            if gate is not None:
                gate.set()
            for r in await asyncio.gather(*tasks):
                r.read()
        else:
            (await cl.get("http://example.test/hot")).read()
            for _ in range(n):
                (await cl.get("http://example.test/hot")).read()
        if isinstance(transport, AsyncSingleflightTransport):  # it did share, or hit the cache
            stats = transport.stats
            assert stats.leaders == 1 if scen != "ha" else stats.leaders == n, stats


async def _aiohttp_scenario(scen: str, variant: str, n: int) -> None:
    import asyncio

    import aiohttp

    from singleflight._http import Snapshot
    from singleflight.aiohttp import SingleflightMiddleware, _respond

    body = b"{}"
    snap = Snapshot.build(200, "OK", "HTTP/1.1", [("Content-Length", str(len(body)))], body)
    gate = asyncio.Event() if scen == "xb" and variant == "wrapped" else None

    async def answer(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """The end of the chain: a complete response, no connector, no network."""
        if gate is not None:
            await gate.wait()
        return _respond(req, snap)

    async def pass_through(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        return await handler(req)

    ours = SingleflightMiddleware()
    chain: tuple[aiohttp.ClientMiddlewareType, ...] = {
        "plain": (answer,),
        "pass": (pass_through, answer),
        "wrapped": (ours, answer),
    }[variant]

    async def get(s: aiohttp.ClientSession, url: str) -> bytes:
        async with s.get(url) as resp:
            return await resp.read()

    async with aiohttp.ClientSession(middlewares=chain) as s:
        if scen == "xa":
            for i in range(n):
                await get(s, f"http://example.test/item/{i}")
        else:
            tasks = [asyncio.ensure_future(get(s, "http://example.test/hot")) for _ in range(n)]
            await asyncio.sleep(0)
            if gate is not None:
                gate.set()
            assert len(await asyncio.gather(*tasks)) == n
    if variant == "wrapped":  # it did share
        assert ours.stats.leaders == (n if scen == "xa" else 1), ours.stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated row ids from {','.join(IDS)}")
    p.add_argument("--json", help="write the per-call figures of every variant here")
    p.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    p.add_argument("--child", nargs=3, metavar=("SCEN", "VARIANT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--profile",
        metavar="ROW",
        help="instead of the table: where one row's floor and ours spend their calls, bytecodes "
        "and (with --c) machine instructions, per call",
    )
    p.add_argument("--c", action="store_true", help="with --profile: also callgrind by C function")
    args = p.parse_args(argv)
    if args.child:
        scen, variant, n = args.child
        child(scen.removesuffix("-mem"), variant, int(n), args.mode)
        return
    if args.profile:
        rows = [r for r in ROWS if r.id == args.profile]
        if not rows:
            p.error(f"--profile: unknown row {args.profile}; choose from {','.join(IDS)}")
        profile(rows[0], args.c)
        return
    chosen = set(args.only.split(",")) if args.only else set(IDS)
    unknown = chosen - set(IDS)
    if unknown:
        p.error(f"--only: unknown row(s) {','.join(sorted(unknown))}; choose from {','.join(IDS)}")
    rows = [r for r in ROWS if r.id in chosen]
    res = measure(rows, args.jobs, lambda s: print(s, file=sys.stderr, flush=True))
    print(
        f"CPython {platform.python_version()}: instructions per call (callgrind), "
        "c-mem: bytes per task"
    )
    print(render(rows, res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
