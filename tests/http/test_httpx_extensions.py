"""Every response extension is kept for the leader; followers get the informational ones.

Against the loopback upstream through a real ``httpx.AsyncHTTPTransport`` (and its sync twin),
wrapped in a transport that adds its own extension as hishel does.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from http_helpers import bounded, wait_until, wait_until_sync

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

pytestmark = pytest.mark.timeout(60)


class Tagging(httpx.AsyncBaseTransport):
    """A wrapped transport that adds its own extension (as hishel adds ``caching``)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        response.extensions["tag"] = {"seen": True}
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class SyncTagging(httpx.BaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.extensions["tag"] = {"seen": True}
        return response

    def close(self) -> None:
        self.inner.close()


def check_roles(responses: list[httpx.Response], port: int) -> None:
    by_role: dict[str, list[httpx.Response]] = {}
    for r in responses:
        by_role.setdefault(r.extensions["singleflight"], []).append(r)
    assert len(by_role["leader"]) == 1 and len(by_role["follower"]) == len(responses) - 1
    (leader,) = by_role["leader"]
    stream = leader.extensions["network_stream"]  # the leader's own connection, as plain httpx
    assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
    for r in responses:
        assert r.extensions["tag"] == {"seen": True}  # a wrapped transport's own: everyone
        assert r.extensions["http_version"] == b"HTTP/1.1"
        assert r.extensions["reason_phrase"] == b"OK"
    for r in by_role["follower"]:
        assert "network_stream" not in r.extensions  # never the leader's connection


async def test_async_leader_keeps_every_extension_followers_the_informational_ones(upstream):
    t = AsyncSingleflightTransport(Tagging(), ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        tasks = [asyncio.ensure_future(c.get("/x?gate=x")) for _ in range(4)]
        await wait_until(lambda: t.stats.followers == 3)
        upstream.open_gate("x")
        responses = await asyncio.gather(*tasks)
        check_roles(responses, httpx.URL(upstream.url).port or 0)
        cached = await c.get("/x?gate=x")
        assert cached.extensions["singleflight"] == "cache"
        assert cached.extensions["tag"] == {"seen": True}
        assert "network_stream" not in cached.extensions


def test_sync_leader_keeps_every_extension_followers_the_informational_ones(upstream):
    t = SingleflightTransport(SyncTagging())
    responses: list[Any] = []
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        threads = [
            threading.Thread(target=lambda: responses.append(c.get("/sx?gate=sx")))
            for _ in range(3)
        ]
        for th in threads:
            th.start()
        wait_until_sync(lambda: t.stats.followers == 2)
        upstream.open_gate("sx")
        for th in threads:
            th.join(10)
        check_roles(responses, httpx.URL(upstream.url).port or 0)


async def test_a_followers_own_read_timeout_is_honoured(upstream):
    # The follower's request extension "timeout" bounds its own wait, not the leader's.
    t = AsyncSingleflightTransport()
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        lead = asyncio.ensure_future(c.get("/t?gate=t", timeout=10))
        await upstream.wait_for_hits_async(1, "/t")
        with pytest.raises(httpx.ReadTimeout):
            await c.get("/t?gate=t", timeout=httpx.Timeout(10, read=0.2))
        upstream.open_gate("t")
        assert (await lead).status_code == 200
