"""The README's first command: python -m singleflight demo, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from singleflight.testing import LoopbackUpstream


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "singleflight", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    assert proc.returncode == 0, proc.stderr
    return {r["mode"]: r for r in json.loads(proc.stdout)["results"]}


@pytest.mark.timeout(180)
def test_demo_json_shows_one_hit_for_coalesced_modes_and_n_for_plain() -> None:
    out = results(demo("--requests", "40", "--delay", "0.05", "--json"))
    assert out["httpx"]["upstream_hits"] == 40
    assert out["aiohttp"]["upstream_hits"] == 40
    assert out["httpx + singleflight"]["upstream_hits"] == 1
    assert out["aiohttp + singleflight"]["upstream_hits"] == 1
    ttl = out["httpx + singleflight + ttl"]
    assert ttl["upstream_hits"] == 1 and ttl["requests"] == 80
    assert ttl["served"]["cache"] == 40  # the whole second burst came from memory
    for r in out.values():
        assert 0 < r["p50_ms"] <= r["p99_ms"]


@pytest.mark.timeout(180)
def test_demo_keys_spread_the_burst() -> None:
    out = results(demo("--requests", "40", "--keys", "4", "--delay", "0.05", "--json"))
    assert out["httpx + singleflight"]["upstream_hits"] == 4
    assert out["aiohttp + singleflight"]["upstream_hits"] == 4
    assert out["aiohttp"]["upstream_hits"] == 40


@pytest.mark.timeout(180)
def test_demo_against_a_given_url_counts_requests_sent() -> None:
    with LoopbackUpstream() as up:
        out = results(demo("--url", up.url, "--requests", "20", "--json"))
        assert out["httpx"]["upstream_hits"] == 20
        assert out["httpx + singleflight"]["upstream_hits"] == 1
        assert up.hits() == sum(r["upstream_hits"] for r in out.values())


@pytest.mark.timeout(180)
def test_demo_prints_a_table_and_writes_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    proc = demo("--requests", "10", "--delay", "0.01", "--plot", str(chart))
    assert proc.returncode == 0, proc.stderr
    assert "upstream hits" in proc.stdout and "aiohttp + singleflight" in proc.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_help_explains_every_option() -> None:
    proc = demo("--help")
    assert proc.returncode == 0
    for option in ("--requests", "--concurrency", "--keys", "--delay", "--url", "--json", "--plot"):
        assert option in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--requests", "0"], "--requests: must be at least 1"),
        (["--requests", "many"], "expected a whole number"),
        (["--delay", "-1"], "--delay: must be between 0 and 60"),
        (["--url", "ftp://x"], "expected an http:// or https:// URL"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_demo_bad_options_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    proc = demo(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
