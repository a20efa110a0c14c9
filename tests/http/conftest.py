"""Fixtures for the HTTP adapter tests: one real loopback upstream per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from singleflight.testing import LoopbackUpstream


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream() as server:
        yield server


@pytest.fixture
def upstream(upstream_server: LoopbackUpstream) -> Iterator[LoopbackUpstream]:
    """The session's loopback upstream, with hit counters and gates reset for this test."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()
