"""The async transport in a sync client (and the reverse) says which twin to use (issue 16)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport


def test_async_transport_in_a_sync_client_names_the_sync_twin(upstream) -> None:
    with pytest.raises(TypeError, match=r"pass httpx\.Client\(transport=SingleflightTransport"):
        with httpx.Client(transport=AsyncSingleflightTransport()) as client:
            client.get(upstream.url)
    client = httpx.Client(transport=AsyncSingleflightTransport())  # no `with`: the request says it
    with pytest.raises(TypeError, match=r"AsyncSingleflightTransport is for httpx\.AsyncClient"):
        client.get(upstream.url)
    assert upstream.hits() == 0


def test_sync_transport_in_an_async_client_names_the_async_twin(upstream) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"AsyncClient\(transport=AsyncSingleflightTransport"):
            async with httpx.AsyncClient(transport=SingleflightTransport()) as client:
                await client.get(upstream.url)
        client = httpx.AsyncClient(transport=SingleflightTransport())
        with pytest.raises(TypeError, match=r"SingleflightTransport is for httpx\.Client"):
            await client.get(upstream.url)

    asyncio.run(main())
    assert upstream.hits() == 0
