"""Every aiohttp reading API gives each caller the whole body, whatever its role or the body kind.

The matrix: reader (read, text, json and every ``response.content`` API) x role (leader,
follower, cache) x body (Content-Length, chunked, gzip with and without length), against a real
aiohttp.web server. Each reader's output through the middleware must equal its output on a
plain session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from _aiohttp_servers import BODY, KINDS, WebUpstream, serve
from _aiohttp_support import bounded, joined
from aiohttp.streams import StreamReader

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)

Reader = Callable[[aiohttp.ClientResponse], Awaitable[bytes]]


async def _read_n(r: aiohttp.ClientResponse) -> bytes:
    out = b""
    while chunk := await r.content.read(1000):
        out += chunk
    return out


async def _readline(r: aiohttp.ClientResponse) -> bytes:
    out = b""
    while line := await r.content.readline():
        out += line
    return out


async def _readexactly(r: aiohttp.ClientResponse) -> bytes:
    out = await r.content.readexactly(len(BODY))
    assert await r.content.read() == b""
    return out


async def _readuntil(r: aiohttp.ClientResponse) -> bytes:
    out = b""
    while part := await r.content.readuntil(b"\n"):
        out += part
    return out


async def _text(r: aiohttp.ClientResponse) -> bytes:
    return (await r.text()).encode()


async def _json(r: aiohttp.ClientResponse) -> bytes:
    return json.dumps(await r.json(), indent=0).encode()


async def _iter_chunked(r: aiohttp.ClientResponse) -> bytes:
    return b"".join([c async for c in r.content.iter_chunked(4096)])


async def _iter_any(r: aiohttp.ClientResponse) -> bytes:
    return b"".join([c async for c in r.content.iter_any()])


async def _iter_chunks(r: aiohttp.ClientResponse) -> bytes:
    return b"".join([data async for data, _ in r.content.iter_chunks()])


async def _lines(r: aiohttp.ClientResponse) -> bytes:
    return b"".join([line async for line in r.content])


async def _read(r: aiohttp.ClientResponse) -> bytes:
    return await r.read()


async def _content_read(r: aiohttp.ClientResponse) -> bytes:
    return await r.content.read()


READERS: dict[str, Reader] = {
    "read": _read,
    "text": _text,
    "json": _json,
    "content.read": _content_read,
    "content.read(n)": _read_n,
    "iter_chunked": _iter_chunked,
    "iter_any": _iter_any,
    "iter_chunks": _iter_chunks,
    "readline": _readline,
    "async-for-lines": _lines,
    "readexactly": _readexactly,
}
if hasattr(StreamReader, "readuntil"):
    READERS["readuntil"] = _readuntil


@pytest.mark.parametrize("mode", ["live", "ttl"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader", sorted(READERS))
async def test_every_reader_gets_the_whole_body_in_every_role(reader, kind, mode):
    """live: a lone caller (aiohttp's own response), a flight's leader and follower (a live
    body); ttl: the leader (its body read and handed back), a follower and the cache (copies)."""
    read = READERS[reader]
    up = WebUpstream()
    async with serve(up.app) as base:
        path = f"/{reader}/{kind}"
        async with aiohttp.ClientSession() as plain:
            async with plain.get(f"{base}{path}?kind={kind}") as r:
                expected = await read(r)
        assert expected == BODY  # the reader itself is right on a plain session
        mw = SingleflightMiddleware(ttl=60 if mode == "ttl" else None)
        async with aiohttp.ClientSession(middlewares=(mw,)) as session:
            url = f"{base}{path}?kind={kind}&gate=g"
            if mode == "live" and kind.endswith("chunked"):
                url += "&mid=m"  # the body stops after its first piece: it streams live
            got = {}
            if mode == "live":
                up.gate("g").set()
                up.gate("m").set()
                async with await bounded(session.get(url)) as lone:
                    got["lone " + str(served(lone))] = await bounded(read(lone))
                up.gate("g").clear()
                up.gate("m").clear()
            first = asyncio.create_task(session.get(url))
            await bounded(up.arrival("g").wait())
            second = asyncio.create_task(session.get(url))
            await joined(mw, 1)
            up.gate("g").set()
            responses = [*await bounded(asyncio.gather(first, second))]
            up.gate("m").set()
            if mode == "ttl":
                responses.append(await bounded(session.get(url)))
            for resp in responses:
                async with resp:
                    got[served(resp)] = await bounded(read(resp))
        if mode == "ttl":
            assert up.hits[path] == 2  # the plain one, and one for the three roles
            assert got == {"leader": expected, "follower": expected, "cache": expected}
        else:
            assert up.hits[path] == 3  # the plain one, the lone one, one for the flight
            assert got == {"lone leader": expected, "leader": expected, "follower": expected}
