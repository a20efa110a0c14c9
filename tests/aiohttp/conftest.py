"""Fixtures for the aiohttp middleware tests: a real loopback upstream and sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from singleflight.aiohttp import SingleflightMiddleware
from singleflight.testing import LoopbackUpstream


@pytest.fixture(scope="session")
def _upstream() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream() as up:
        yield up


@pytest.fixture
def upstream(_upstream: LoopbackUpstream) -> LoopbackUpstream:
    """The loopback upstream (127.0.0.1), its counters reset for this test."""
    _upstream.reset()
    return _upstream


SessionFactory = Callable[..., aiohttp.ClientSession]


@pytest.fixture
async def make_session() -> AsyncIterator[SessionFactory]:
    """make_session(mw, **kwargs) opens a ClientSession with ``mw`` as its middleware.

    Every session it made is closed at the end of the test.
    """
    sessions: list[aiohttp.ClientSession] = []

    def make(mw: SingleflightMiddleware | None = None, **kwargs: Any) -> aiohttp.ClientSession:
        kwargs.setdefault("cookie_jar", aiohttp.CookieJar(unsafe=True))  # cookies from 127.0.0.1
        kwargs.setdefault("middlewares", (mw,) if mw is not None else ())
        session = aiohttp.ClientSession(**kwargs)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()
