"""Helpers for the HTTP adapter tests (bounded waits, pool inspection)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import anyio


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (cheap, in-process state) until true; fail after ``timeout`` s."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Blocking twin of ``wait_until``, for threaded tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.001)


def pool_is_idle(transport: object) -> bool:
    """True if an httpx HTTP transport's pool has no request queued and no connection busy."""
    pool = transport._pool  # type: ignore[attr-defined]
    return not pool._requests and all(c.is_idle() or c.is_closed() for c in pool.connections)


@contextlib.asynccontextmanager
async def bounded(seconds: float = 10.0) -> AsyncIterator[None]:
    """Fail (TimeoutError) if the block takes longer than ``seconds``: a hang fails fast.

    ``asyncio.timeout`` needs Python 3.11; this works on 3.10 and on trio too.
    """
    with anyio.fail_after(seconds):
        yield
