"""Per-request settings that change what the caller receives separate callers, or are honoured.

aiohttp resolves them in ``ClientSession._request`` and never puts them on the request; the
middleware reads them from that frame (singleflight/_aiohttp_request.py). Each test: the setting
on one request of a session with ``ttl`` must give what a plain session gives, never what a
request with other settings fetched (in flight or cached).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_servers import BODY, GZIPPED, RawUpstream, WebUpstream, serve, serve_raw
from _aiohttp_support import bounded, joined
from aiohttp import HttpVersion10

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def test_auto_decompress_per_request_separates_callers():
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as s:
        url = base + "/gz?kind=gzip-length"
        async with s.get(url) as r:
            assert await r.read() == BODY
        async with s.get(url, auto_decompress=False) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert await r.read() == GZIPPED  # raw, as plain aiohttp gives it
            assert served(r) == "leader"
        async with s.get(url) as r:
            assert served(r) == "cache" and await r.read() == BODY
        async with s.get(url, auto_decompress=False) as r:
            assert served(r) == "cache" and await r.read() == GZIPPED
    assert up.hits["/gz"] == 2


async def test_a_session_without_auto_decompress_is_honoured_per_request_too():
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    session = aiohttp.ClientSession(middlewares=(mw,), auto_decompress=False)
    async with serve(up.app) as base, session as s:
        url = base + "/gz?kind=gzip-chunked"
        async with s.get(url) as r:
            assert await r.read() == GZIPPED
        async with s.get(url, auto_decompress=True) as r:
            assert await r.read() == BODY and served(r) == "leader"


async def test_read_until_eof_false_is_not_answered_by_a_full_body():
    # A body delimited by the connection's close: read_until_eof=False reads it as empty.
    raw = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
    mw = SingleflightMiddleware(ttl=60)
    async with serve_raw(raw) as base:
        async with aiohttp.ClientSession() as plain:
            async with plain.get(base + "/", read_until_eof=False) as r:
                expected = await r.read()
        async with aiohttp.ClientSession(middlewares=(mw,)) as s:
            async with s.get(base + "/") as r:
                assert await r.read() == b"until the close"
            async with s.get(base + "/", read_until_eof=False) as r:
                assert await r.read() == expected == b""
    assert raw.hits == 3


async def test_header_parser_limits_separate_callers():
    # A 9000-byte header: over aiohttp's default max_field_size (8190), within 16000.
    big = b"X-Big: " + b"a" * 9000 + b"\r\n"
    raw = RawUpstream(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok")
    mw = SingleflightMiddleware(ttl=60)
    async with serve_raw(raw) as base:
        async with aiohttp.ClientSession(middlewares=(mw,)) as s:
            async with s.get(base + "/", max_field_size=16000) as r:
                assert await r.read() == b"ok"
            # Plain aiohttp refuses this response with the default limits: so must we.
            with pytest.raises(aiohttp.ClientResponseError):
                await bounded(s.get(base + "/"))
    assert raw.hits == 2


async def test_http_version_separates_callers():
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    async with (
        serve(up.app) as base,
        aiohttp.ClientSession(middlewares=(mw,)) as s11,
        aiohttp.ClientSession(middlewares=(mw,), version=HttpVersion10) as s10,
    ):
        async with s11.get(base + "/v") as r:
            assert (await r.json())["version"] == "1.1"
        async with s10.get(base + "/v") as r:
            assert (await r.json())["version"] == "1.0"
    assert up.hits["/v"] == 2


async def _too_long(r: aiohttp.ClientResponse) -> type[BaseException]:
    """Read lines until one is too long for the reader's buffer; return the error's type."""
    with pytest.raises(Exception) as info:  # ValueError, or LineTooLong on 3.14
        while await r.content.readline():
            pass
    return info.type


async def test_read_bufsize_is_honoured_for_every_role():
    """A line longer than twice the caller's read_bufsize fails readline() as plain."""
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    async with serve(up.app) as base:
        url = base + "/b?kind=length"
        async with aiohttp.ClientSession(read_bufsize=4) as plain:
            async with plain.get(url) as r:
                plain_error = await _too_long(r)  # '"line 00000 of the body",' > 2 * 4
        async with aiohttp.ClientSession(middlewares=(mw,), read_bufsize=1024) as s:
            first = asyncio.create_task(s.get(url + "&gate=g"))
            await bounded(up.arrival("g").wait())
            second = asyncio.create_task(s.get(url + "&gate=g"))
            await joined(mw, 1)
            up.gate("g").set()
            responses = [*await bounded(asyncio.gather(first, second))]
            responses.append(await bounded(s.get(url + "&gate=g")))
            assert [served(r) for r in responses] == ["leader", "follower", "cache"]
            for r in responses:  # short lines are fine with a 1 KiB buffer
                assert b"".join([line async for line in r.content]) == BODY
            async with s.get(url + "&gate=g", read_bufsize=4) as r:
                assert served(r) == "cache"
                assert await _too_long(r) is plain_error
