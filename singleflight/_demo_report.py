"""The demo's report: its modes, one Result a mode, the table, the headline and the chart."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ("MODES", "Result", "headline", "plot")

PLAIN = ("httpx", "aiohttp")
MODES = (
    "httpx",
    "httpx + singleflight",
    "aiohttp",
    "aiohttp + singleflight",
    "httpx + singleflight + ttl",
)
STALE_MODE = "httpx + singleflight + stale"
# The same two bursts across an expiry, without stale_ttl: the second one waits upstream.
EXPIRED_MODE = "httpx + singleflight + ttl, no stale"
DEFAULT_CONCURRENCY = 20


@dataclass
class Result:
    """One mode's burst: what the upstream saw and what the callers waited."""

    mode: str
    requests: int
    upstream_hits: int = 0
    wall_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    served: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # callers whose GET raised
    error: str | None = None  # the first failure (a caller's, or the whole mode's)
    gave_up: int = 0  # callers that reached --timeout before their answer came
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    expiry_p99_ms: float | None = None  # --stale rows: the p99 of the burst after the expiry

    def public(self) -> dict[str, Any]:
        """The JSON face: everything but the raw per-caller and per-call samples."""
        return {
            "mode": self.mode,
            "requests": self.requests,
            "upstream_hits": self.upstream_hits,
            "wall_ms": self.wall_ms,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "served": self.served,
            "failed": self.failed,
            "error": self.error,
            "gave_up": self.gave_up,
            "expiry_p99_ms": self.expiry_p99_ms,
        }


def _saved(r: Result) -> str:
    """Calls saved against one upstream call per request; never rounds a saving up to 100 %."""
    if r.mode in PLAIN:
        return "—"
    if r.error and r.failed == r.requests or r.gave_up == r.requests:
        return "—"  # nobody was served: nothing was saved
    saved = r.requests - r.upstream_hits
    pct = math.floor(1000 * saved / r.requests) / 10 if r.requests else 0.0
    return f"{saved:,} ({pct:.1f} %)"


def _spread(args: argparse.Namespace) -> str:
    distinct = min(args.keys, args.requests)
    n = f"{args.requests:,} GET{'s' if args.requests != 1 else ''}"
    return f"{n} of one URL" if distinct == 1 else f"{n} spread over {distinct:,} URLs"


def _calls(n: int) -> str:
    return f"{n:,} upstream call{'' if n == 1 else 's'}"


def headline(results: list[Result]) -> str:
    """headline says what coalescing did, e.g. "1,000 requests -> 1 upstream call"."""
    ok = [r for r in results if "singleflight" in r.mode and not r.error and not r.gave_up]
    row = next((r for r in ok if r.mode == "httpx + singleflight"), ok[0] if ok else None)
    if row is None:
        return "singleflight demo"
    return f"{row.requests:,} requests → {_calls(row.upstream_hits)}"


def _not_served(r: Result, timeout: float) -> str:
    parts = []
    if r.gave_up:
        parts.append(f"{r.gave_up:,} gave up at {timeout:g} s")
    if r.error:
        parts.append(f"{r.failed:,} failed: {r.error}")
    return "; ".join(parts)


def _table(results: list[Result], args: argparse.Namespace, target: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{headline(results)}  ({_spread(args)}, all at once, at {target})",
        caption=(
            "upstream calls: requests the server saw; latency: what each caller waited, from "
            f"asking to its answer; plain clients queue for {args.concurrency} connections, and "
            f"their callers give up after {args.timeout:g} s"
        ),
    )
    columns = ["mode", "callers", "upstream calls", "calls saved", "wall ms", "p50 ms", "p99 ms"]
    expiry = any(r.expiry_p99_ms is not None for r in results)  # --stale
    if expiry:
        columns.append("p99 ms after expiry")
    failures = any(r.error or r.gave_up for r in results)
    if failures:
        columns.append("not served")
    for col in columns:
        table.add_column(col, justify="left" if col in ("mode", "not served") else "right")
    for r in results:
        if r.error and r.failed == r.requests:
            row = [r.mode, f"{r.requests:,}", f"{r.upstream_hits:,}", "—", "—", "—", "—"]
        else:
            row = [
                r.mode,
                f"{r.requests:,}",
                f"{r.upstream_hits:,}",
                _saved(r),
                f"{r.wall_ms:,.0f}",
                f"{r.p50_ms:,.1f}",
                f"{r.p99_ms:,.1f}",
            ]
        if expiry:
            row.append("—" if r.expiry_p99_ms is None else f"{r.expiry_p99_ms:,.1f}")
        if failures:
            row.append(_not_served(r, args.timeout))
        table.add_row(*row, style="red" if r.error else None)
    console = Console()
    console.width = max(console.width, 150 if failures else 120)
    console.print(table)


def _color(mode: str) -> str:
    if mode in PLAIN:
        return "#9a9a9a"
    if mode.endswith(("ttl", "stale")):
        return "#2e9e5b"
    return "#2f6fd0"


def _label(r: Result) -> str:
    if r.mode.endswith("ttl"):
        return f"{r.mode}\n(two bursts, the 2nd from memory)"
    if r.mode == STALE_MODE:
        return f"{r.mode}\n(two bursts, the 2nd served stale)"
    if r.mode == EXPIRED_MODE:
        return f"{r.mode}\n(two bursts, the 2nd after expiry)"
    return r.mode


def plot(results: list[Result], args: argparse.Namespace, target: str, path: str) -> None:
    """plot writes the chart: upstream calls per mode and what each caller waited."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain_number = FuncFormatter(lambda x, _pos: f"{x:,.10g}")
    shown = list(reversed(results))  # barh draws bottom-up: keep the table's order top-down
    names = [_label(r) for r in shown]
    colors = [_color(r.mode) for r in shown]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13.5, 1.6 + 0.75 * len(shown)), sharey=True)
    fig.suptitle(headline(results), fontsize=18, fontweight="bold", y=0.985)
    fig.text(
        0.5,
        0.895,
        f"{_spread(args)}, all at once, at {target}; plain clients get {args.concurrency} "
        "connections",
        ha="center",
        fontsize=10,
        color="#444444",
    )

    ys = range(len(shown))
    xmax = max([r.upstream_hits for r in shown] + [1]) * 4
    ax1.barh(ys, [max(r.upstream_hits, 0.8) for r in shown], color=colors, height=0.6)
    ax1.set_xscale("log")
    ax1.set_xlim(0.7, xmax)
    ax1.xaxis.set_major_formatter(plain_number)
    ax1.set_title("upstream calls (log scale; fewer is better)", fontsize=11)
    for y, r in zip(ys, shown, strict=True):
        label = f"{r.upstream_hits:,} for {r.requests:,} callers"
        unserved = r.failed + r.gave_up
        if unserved:
            label += f" ({unserved:,} not served)"
        hits = max(r.upstream_hits, 0.8)
        if math.log(hits / 0.7) > 0.55 * math.log(xmax / 0.7):  # a long bar: label inside it
            ax1.text(hits / 1.25, y, label, va="center", ha="right", color="white")
        else:
            ax1.text(hits * 1.25, y, label, va="center", color="#b00000" if unserved else "black")

    data = [r.latencies_ms or [float("nan")] for r in shown]
    ax2.boxplot(
        data,
        positions=list(ys),
        vert=False,
        whis=(1, 99),
        showfliers=False,
        widths=0.6,
        patch_artist=True,
        medianprops={"color": "black"},
    )
    for patch, color in zip(ax2.patches, colors, strict=False):
        patch.set_facecolor(color)
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(plain_number)
    ax2.set_title(
        "what each caller waited, ms (log scale; box p25–p75, whiskers p1–p99)", fontsize=10
    )
    top = max((r.p99_ms for r in shown), default=1.0)
    ax2.set_xlim(right=max(top, 1.0) * 12)
    for y, r in zip(ys, shown, strict=True):
        if r.latencies_ms:
            text = f"p50 {r.p50_ms:,.0f} · p99 {r.p99_ms:,.0f}"
            if r.gave_up:
                text += f"\n{r.gave_up:,} gave up at {args.timeout:g} s"
            ax2.text(r.p99_ms * 1.3, y, text, va="center", fontsize=10)
        else:
            ax2.text(1, y, r.error or "no caller finished", va="center", fontsize=9, color="red")
    ax2.grid(axis="x", which="major", alpha=0.3)
    ax1.set_yticks(list(ys), names)  # after boxplot, which resets the shared ticks
    ax1.set_ylim(-0.6, len(shown) - 0.4)
    ax1.tick_params(axis="y", length=0, labelsize=10)
    ax2.tick_params(axis="y", length=0, labelleft=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
