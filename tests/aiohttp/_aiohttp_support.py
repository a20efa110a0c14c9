"""Waiting helpers for the aiohttp middleware tests (every wait is bounded; Python 3.10 too)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from singleflight.aiohttp import SingleflightMiddleware


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait until ``pred()`` is true (polled every millisecond), at most ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def joined(mw: SingleflightMiddleware, followers: int) -> None:
    """Wait until ``followers`` callers wait on the middleware's flights."""
    await wait_until(lambda: mw.stats.followers >= followers, f"{followers} followers")


async def bounded(aw: Awaitable[Any], timeout: float = 10.0) -> Any:
    """Await ``aw`` for at most ``timeout`` seconds."""
    return await asyncio.wait_for(aw, timeout)
