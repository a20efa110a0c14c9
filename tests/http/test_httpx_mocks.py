"""The transports over mocked inner transports: pytest-httpx and httpx.MockTransport."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from http_helpers import wait_until, wait_until_sync

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

URL = "https://api.example/items"


# -- pytest-httpx: it patches the inner HTTP transports, the wrapper runs for real ----------


async def test_pytest_httpx_one_registered_response_serves_every_caller(httpx_mock):
    release = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={"items": [1, 2]})

    httpx_mock.add_callback(respond, url=URL)  # single use: a second request would fail
    t = AsyncSingleflightTransport()
    async with asyncio.timeout(10), httpx.AsyncClient(transport=t) as c:
        tasks = [asyncio.ensure_future(c.get(URL)) for _ in range(50)]
        await wait_until(lambda: t.stats.calls == 50)
        release.set()
        responses = await asyncio.gather(*tasks)
    assert len(httpx_mock.get_requests()) == 1
    assert {r.json()["items"][1] for r in responses} == {2}


async def test_pytest_httpx_add_response_with_gzip(httpx_mock):
    # An instant mock lands before the next caller starts; one registered response still
    # serves them all once the flight overlaps (the first caller holds it open).
    body = b'{"hello": "world"}'
    release = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(
            200, content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
        )

    httpx_mock.add_callback(respond, url=URL)
    t = AsyncSingleflightTransport()
    async with asyncio.timeout(10), httpx.AsyncClient(transport=t) as c:
        tasks = [asyncio.ensure_future(c.get(URL)) for _ in range(20)]
        await wait_until(lambda: t.stats.calls == 20)
        release.set()
        responses = await asyncio.gather(*tasks)
    assert len(httpx_mock.get_requests()) == 1
    assert all(r.json() == {"hello": "world"} for r in responses)
    assert all(r.headers["content-encoding"] == "gzip" for r in responses)


async def test_pytest_httpx_separate_credentials(httpx_mock):
    httpx_mock.add_response(url=URL, match_headers={"Authorization": "a"}, text="for a")
    httpx_mock.add_response(url=URL, match_headers={"Authorization": "b"}, text="for b")
    t = AsyncSingleflightTransport()
    async with asyncio.timeout(10), httpx.AsyncClient(transport=t) as c:
        ra, rb = await asyncio.gather(
            c.get(URL, headers={"Authorization": "a"}), c.get(URL, headers={"Authorization": "b"})
        )
    assert (ra.text, rb.text) == ("for a", "for b")


async def test_pytest_httpx_timeout_reelects(httpx_mock):
    release, release_again = asyncio.Event(), asyncio.Event()
    attempts = 0

    async def slow_then_fine(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await release.wait()
            raise httpx.ReadTimeout("leader timed out", request=request)
        await release_again.wait()
        return httpx.Response(200, text="second try")

    httpx_mock.add_callback(slow_then_fine, url=URL, is_reusable=True)
    t = AsyncSingleflightTransport()
    async with asyncio.timeout(10), httpx.AsyncClient(transport=t) as c:
        tasks = [asyncio.ensure_future(c.get(URL)) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        release.set()
        # The old leader failed alone; one follower leads afresh and three follow it.
        await wait_until(lambda: attempts == 2 and t.stats.calls == 5)
        release_again.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], httpx.ReadTimeout)
    assert [r.text for r in results[1:]] == ["second try"] * 4
    assert len(httpx_mock.get_requests()) == 2


def test_pytest_httpx_sync_threads(httpx_mock):
    arrived = threading.Event()

    def respond(request: httpx.Request) -> httpx.Response:
        arrived.set()
        time.sleep(0.2)  # a slow upstream, so the other threads join while it works
        return httpx.Response(200, text="once")

    httpx_mock.add_callback(respond, url=URL)
    t = SingleflightTransport()
    with httpx.Client(transport=t) as c, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(c.get, URL) for _ in range(8)]
        assert arrived.wait(5)
        wait_until_sync(lambda: t.stats.calls == 8 or all(f.done() for f in futures))
        texts = [f.result(timeout=10).text for f in futures]
    assert texts == ["once"] * 8
    assert len(httpx_mock.get_requests()) == 1


# -- httpx.MockTransport: pre-read responses, still raw bytes --------------------------------


async def test_over_mock_transport_keeps_raw_bytes():
    body = b"x" * 1000
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        await asyncio.sleep(0)
        return httpx.Response(
            200, content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
        )

    t = AsyncSingleflightTransport(httpx.MockTransport(handler), ttl=60)
    async with asyncio.timeout(10), httpx.AsyncClient(transport=t) as c:
        responses = await asyncio.gather(*[c.get(URL) for _ in range(10)])
        cached = await c.get(URL)
    assert len(calls) == 1
    assert all(r.content == body for r in [*responses, cached])
    assert cached.extensions["singleflight"] == "cache"


def test_over_sync_mock_transport():
    t = SingleflightTransport(httpx.MockTransport(lambda request: httpx.Response(204)))
    with httpx.Client(transport=t) as c:
        r = c.get(URL)
    assert r.status_code == 204 and r.extensions["singleflight"] == "leader"


@pytest.mark.parametrize("reason", [b"Fine Thanks", None])
def test_reason_phrase_and_http_version_survive(reason):
    def handler(request: httpx.Request) -> httpx.Response:
        ext = {"http_version": b"HTTP/2"}
        if reason:
            ext["reason_phrase"] = reason
        return httpx.Response(200, text="ok", extensions=ext)

    t = SingleflightTransport(httpx.MockTransport(handler), ttl=60)
    with httpx.Client(transport=t) as c:
        c.get(URL)
        r = c.get(URL)
    assert r.extensions["singleflight"] == "cache"
    assert r.http_version == "HTTP/2"
    assert r.reason_phrase == (reason.decode() if reason else "OK")
