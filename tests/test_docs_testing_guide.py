"""The pytest-httpx example of docs/testing.md, run for real."""

from __future__ import annotations

import asyncio

import httpx
from pytest_httpx import HTTPXMock

from singleflight.httpx import AsyncSingleflightTransport


async def test_one_request_for_a_burst(httpx_mock: HTTPXMock) -> None:
    async def slow_upstream(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)  # the work takes a while, so the burst meets in flight
        return httpx.Response(200, json={"items": []})

    httpx_mock.add_callback(slow_upstream, url="http://api.test/items")
    async with httpx.AsyncClient(transport=AsyncSingleflightTransport()) as client:
        responses = await asyncio.gather(*[client.get("http://api.test/items") for _ in range(20)])
    assert {r.status_code for r in responses} == {200}
    assert len(httpx_mock.get_requests()) == 1
