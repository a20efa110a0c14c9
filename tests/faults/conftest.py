"""Fixtures for the fault tests: a misbehaving raw TCP server and the loopback upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from fault_server import FaultServer
from fault_support import Driver, make_driver

from singleflight.testing import LoopbackUpstream


@pytest.fixture(scope="session")
def _fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def faults(_fault_server: FaultServer) -> Iterator[FaultServer]:
    """The raw fault server (127.0.0.1), counters, gates and healing reset for this test."""
    _fault_server.reset()
    yield _fault_server
    _fault_server.reset()


@pytest.fixture(scope="session")
def _loopback() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream() as server:
        yield server


@pytest.fixture
def upstream(_loopback: LoopbackUpstream) -> Iterator[LoopbackUpstream]:
    """The well-behaved loopback upstream, its counters and gates reset for this test."""
    _loopback.reset()
    yield _loopback
    _loopback.reset()


@pytest.fixture(params=["httpx-async", "httpx-sync", "aiohttp"])
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    """Each adapter in turn, with a TTL cache (so a test can see that nothing was cached)."""
    d = make_driver(request.param, ttl=60.0)
    yield d
    await d.aclose()
