"""A follower's read timeout runs on the shared response's silence, not on its total time.

A response that takes far longer than the read timeout but is never silent for that long
reaches a lone caller; it must reach every follower too (asyncio, trio and threads).
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from http_helpers import wait_until, wait_until_sync

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

trio = pytest.importorskip("trio")
pytestmark = pytest.mark.timeout(60)


class Steady(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """An inner transport whose response takes 0.8 s, a byte every 0.1 s (never silent long)."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        import anyio

        async def body():
            for _ in range(8):
                await anyio.sleep(0.1)
                yield b"s"

        return httpx.Response(200, stream=_AsyncStream(body()), request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        import time

        def body():
            for _ in range(8):
                time.sleep(0.1)
                yield b"s"

        return httpx.Response(200, stream=_SyncStream(body()), request=request)


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, it) -> None:
        self._it = it

    async def __aiter__(self):
        async for chunk in self._it:
            yield chunk


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, it) -> None:
        self._it = it

    def __iter__(self):
        yield from self._it


def test_trio_followers_wait_while_the_response_keeps_coming():
    inner = Steady()
    t = AsyncSingleflightTransport(inner)
    bodies: list[bytes] = []

    async def main():
        with trio.fail_after(10):
            async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1:9") as c:

                async def one():
                    bodies.append((await c.get("/steady", timeout=0.3)).content)

                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(one)

    trio.run(main)
    assert bodies == [b"s" * 8] * 5 and inner.calls == 1
    assert t.stats.calls == 5 and t.stats.followers == 4  # rejoins are not counted twice


async def test_asyncio_followers_wait_while_the_response_keeps_coming():
    inner = Steady()
    t = AsyncSingleflightTransport(inner)
    async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1:9") as c:
        tasks = [asyncio.ensure_future(c.get("/steady", timeout=0.3)) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        responses = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [r.content for r in responses] == [b"s" * 8] * 5 and inner.calls == 1


def test_sync_followers_wait_while_the_response_keeps_coming():
    inner = Steady()
    t = SingleflightTransport(inner)
    bodies: list[bytes] = []
    with httpx.Client(transport=t, base_url="http://127.0.0.1:9") as c:
        threads = [
            threading.Thread(target=lambda: bodies.append(c.get("/steady", timeout=0.3).content))
            for _ in range(5)
        ]
        for th in threads:
            th.start()
        wait_until_sync(lambda: t.stats.calls == 5)
        for th in threads:
            th.join(timeout=10)
    assert bodies == [b"s" * 8] * 5 and inner.calls == 1
    assert t.stats.calls == 5 and t.stats.followers == 4  # rejoins are not counted twice


async def test_a_silent_response_still_fails_followers_at_their_read_timeout():
    class Silent(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(5)
            raise AssertionError("never answered")

    t = AsyncSingleflightTransport(Silent())
    async with httpx.AsyncClient(transport=t, base_url="http://127.0.0.1:9") as c:
        leader = asyncio.ensure_future(c.get("/silent"))
        await wait_until(lambda: t.stats.calls == 1)
        with pytest.raises(httpx.ReadTimeout, match="identical request in flight"):
            await asyncio.wait_for(c.get("/silent", timeout=0.2), 5)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
