"""benchmarks/bench_icount.py: every scenario runs and does what its row says; ratios are right.

The full table takes minutes under valgrind (even one callgrind pair takes 10-70 s here, too
slow for the suite); here each scenario runs once, tiny, without it: its own assertions check
that the wrapped variants really share, lead once per key or hit the cache.
"""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_icount")
    finally:
        sys.path.remove(str(BENCH))


def _variants(row: object) -> list[str]:
    r = row  # a bench_icount.Row
    return [r.floor, r.ours, *r.extra, *([r.direct] if r.direct else [])]  # type: ignore[attr-defined]


def test_every_row_runs_each_variant_tiny(bench: ModuleType) -> None:
    tiny = {"b": 50, "c": 200, "c-mem": 200, "t": 3}
    try:
        for row in bench.ROWS:
            for variant in _variants(row):
                bench.child(row.scen.removesuffix("-mem"), variant, tiny.get(row.scen, 5), "")
    finally:
        gc.enable()


def test_memory_child_prints_a_peak(bench: ModuleType) -> None:
    assert bench.peak_bytes("c-mem", "group", 200) > 0


def test_ratio_is_of_overheads_above_direct_when_the_row_says_so(bench: ModuleType) -> None:
    rows = {r.id: r for r in bench.ROWS}
    floor, ours, r = bench.ratio(rows["a"], {"direct": 1000.0, "minimal": 2000.0, "group": 2500.0})
    assert (floor, ours, r) == (1000.0, 1500.0, 1.5)
    assert bench.ratio(rows["b"], {"minimal": 200.0, "group": 220.0})[2] == pytest.approx(1.1)
    text = bench.render([rows["b"]], {"b": {"minimal": 200.0, "group": 220.0}})
    assert "| 200 " in text and "| 220 " in text and "1.10×" in text


def test_unknown_row_is_refused_with_the_choices(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--only", "nope"])
    err = capsys.readouterr().err
    assert "unknown row(s) nope" in err and "h-dist" in err
