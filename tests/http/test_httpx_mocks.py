"""The transports over mocked inner transports: pytest-httpx and httpx.MockTransport."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from http_helpers import bounded, wait_until, wait_until_sync

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
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
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
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
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
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
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
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
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
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
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


# -- an inner transport whose one-shot stream was already read ------------------------------


async def test_pre_read_one_shot_stream_falls_back_to_decoded_content():
    class PreRead(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            async def once():
                yield gzip.compress(b"hello")

            response = httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=once())
            await response.aread()  # e.g. a logging wrapper read it
            return response

    t = AsyncSingleflightTransport(PreRead())
    async with httpx.AsyncClient(transport=t) as c:
        r = await c.get(URL)
    assert r.text == "hello"
    assert "content-encoding" not in r.headers and r.headers["content-length"] == "5"


def test_sync_pre_read_one_shot_stream_falls_back_to_decoded_content():
    class PreRead(httpx.BaseTransport):
        def handle_request(self, request):
            response = httpx.Response(
                200, headers={"Content-Encoding": "gzip"}, content=iter([gzip.compress(b"hi")])
            )
            response.read()  # a plain iterator: read again, it would silently yield nothing
            return response

    with httpx.Client(transport=SingleflightTransport(PreRead())) as c:
        r = c.get(URL)
    assert r.text == "hi" and "content-encoding" not in r.headers


def test_default_key_matches_the_shared_policy(monkeypatch):
    """httpx.URL parts give the same key as _http.request_key on the URL string (aiohttp's
    path), so both adapters and a shared Redis tier agree on what is the same request."""
    from singleflight._http import request_key

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the default CA store
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    t = AsyncSingleflightTransport()
    for url in [
        "http://127.0.0.1:8080/a?b=1&a=2",
        "HTTPS://Example.COM:443/",
        "https://example.com",
        "http://user:pw@example.com:80/p%20q?x=%2F",
        "http://[::1]:8000/v6",
    ]:
        request = httpx.Request("GET", url, headers={"Authorization": "a"})
        extra = ("raw", "httpx")  # raw bodies, sent by a default inner transport
        expected = request_key("GET", str(request.url), request.headers.raw, extra=extra)
        assert t._policy.key(request) == expected, url
