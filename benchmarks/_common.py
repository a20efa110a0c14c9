"""What the HTTP benchmarks share: fresh paths, (wall, CPU) timing, the Markdown table."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from itertools import count

__all__ = ("fresh", "table", "timed")

_serial = count()


def fresh(prefix: str) -> str:
    """A path never used before in this run: no run sees another's cache or flight."""
    return f"/{prefix}{next(_serial)}"


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Wall and client CPU seconds of ``await fn()`` (the upstream runs in another process)."""
    start, cpu = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - start, time.process_time() - cpu


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows (the first is the header) as an aligned Markdown table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
