"""A shortened soak (benchmarks/soak.py) in CI: 50,000 mixed calls, and its verdict holds.

It runs in a child process (``python -W error``), so the curve measures the soak alone and not
the test session around it; the full run is ``python benchmarks/soak.py`` (1,000,000 calls).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def test_soak_50000_calls_memory_flat_nothing_in_flight_no_growth() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SOAK), "--calls", "50000", "--samples", "10"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the soak failed (exit {proc.returncode}):\n{report}"
    assert "verdict: PASS" in proc.stdout, report
    # The curve: calls, seconds, traced MiB, RSS MiB, tasks, fds, threads, in_flight.
    rows = [line.split() for line in proc.stdout.splitlines()]
    rows = [r for r in rows if len(r) == 8 and r[0].replace(",", "").isdigit()]
    assert len(rows) >= 10, f"expected a curve of at least 10 samples:\n{report}"
    assert rows[-1][0] == "50,000", f"the soak stopped early:\n{report}"
    assert all(r[4] == "1" and r[7] == "0" for r in rows), f"tasks or flights at rest:\n{report}"
