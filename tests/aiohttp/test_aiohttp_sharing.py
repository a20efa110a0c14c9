"""What is shared with a flight's followers: bodies, statuses, errors; and what never is."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from _aiohttp_servers import RawUpstream, serve_raw
from _aiohttp_support import bounded, joined

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def _gated(upstream, mw, session, path, query, n, *, hits=1, followers=None):
    """n concurrent GETs of path?query behind a gate; return the responses (or exceptions)."""
    gate = path.strip("/")
    url = f"{upstream.url}{path}?gate={gate}&{query}"
    tasks = [asyncio.create_task(session.get(url)) for _ in range(n)]
    await upstream.wait_for_hits_async(hits, path)
    await joined(mw, n - hits if followers is None else followers)
    upstream.open_gate(gate)
    return await bounded(asyncio.gather(*tasks, return_exceptions=True))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_encoded_bodies_decode_once(upstream, make_session, encoding, chunked):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await _gated(
        upstream, mw, session, "/enc", f"encoding={encoding}&chunked={chunked}", 10
    )
    assert upstream.hits("/enc") == 1
    for r in responses:
        assert r.headers["Content-Encoding"] == encoding  # as received, like stock aiohttp
        assert (await r.json())["path"] == "/enc"


async def test_binary_body_is_shared_exactly(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/bin", "size=300000&chunked=1", 5)
    bodies = {await r.read() for r in responses}
    assert len(bodies) == 1 and len(bodies.pop()) == 300000
    assert upstream.hits("/bin") == 1


async def test_set_cookie_is_never_shared(upstream, make_session):
    mw = SingleflightMiddleware()
    sessions = [make_session(mw) for _ in range(4)]
    url = upstream.url + "/login?gate=login&set_cookie=sid%3Dabc"
    tasks = [asyncio.create_task(s.get(url)) for s in sessions]
    await upstream.wait_for_hits_async(1, "/login")
    await joined(mw, 3)
    upstream.open_gate("login")
    responses = await bounded(asyncio.gather(*tasks))
    # The leader got its own response; every follower made its own request.
    assert upstream.hits("/login") == 4
    assert {served(r) for r in responses} == {"leader"}
    assert sorted([(await r.json())["hit"] for r in responses]) == [1, 2, 3, 4]
    for s, r in zip(sessions, responses, strict=True):
        assert r.cookies["sid"].value == "abc"
        assert {c.key: c.value for c in s.cookie_jar} == {"sid": "abc"}


async def test_event_stream_goes_to_its_leader_only(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/sse", "sse=3", 3)
    assert upstream.hits("/sse") == 3
    for r in responses:
        assert served(r) == "leader"
        assert [line async for line in r.content if line.strip()] == [
            b"data: 0\n",
            b"data: 1\n",
            b"data: 2\n",
        ]


async def test_body_above_max_body_size_is_not_shared(upstream, make_session):
    mw = SingleflightMiddleware(max_body_size=1000)
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/big", "size=5000", 3)
    assert upstream.hits("/big") == 3
    for r in responses:
        assert served(r) == "leader" and len(await r.read()) == 5000


@pytest.mark.parametrize("ttl", [None, 60])
async def test_chunked_body_growing_past_max_body_size(upstream, make_session, ttl):
    mw = SingleflightMiddleware(max_body_size=10_000, ttl=ttl)
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/grow", "size=50000&chunked=1", 3)
    expected = (b"0123456789abcdef" * 4000)[:50000]
    if ttl is None:  # streamed live to the flight's callers: max_body_size bounds late joiners
        assert upstream.hits("/grow") == 1
        assert sorted(served(r) for r in responses) == ["follower", "follower", "leader"]
    else:  # buffered to be stored: past max_body_size each caller streams its own request
        assert upstream.hits("/grow") == 3
        assert {served(r) for r in responses} == {"leader"}
    for r in responses:
        assert await r.read() == expected  # the bytes read to measure it are not lost


async def test_chunked_body_within_max_body_size_is_shared(upstream, make_session):
    mw = SingleflightMiddleware(max_body_size=10_000)
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/fits", "size=10000&chunked=1", 3)
    assert upstream.hits("/fits") == 1
    assert {len(await r.read()) for r in responses} == {10000}


@pytest.mark.parametrize("status", [500, 502, 503, 304, 204])
async def test_any_status_is_shared_from_one_hit(upstream, make_session, status):
    mw = SingleflightMiddleware(ttl=60)  # shared with the flight, but never cached
    session = make_session(mw)
    responses = await _gated(upstream, mw, session, "/st", f"status={status}", 10)
    assert upstream.hits("/st") == 1
    assert {r.status for r in responses} == {status}
    if status >= 500:
        for r in responses:
            with pytest.raises(aiohttp.ClientResponseError) as info:
                r.raise_for_status()
            assert info.value.status == status
    async with session.get(upstream.url + f"/st?status={status}") as again:
        assert served(again) == "leader"  # not served from the cache
    assert upstream.hits("/st") == 2


async def test_error_mid_body_reaches_every_waiter(upstream, make_session):
    mw = SingleflightMiddleware()
    connector = aiohttp.TCPConnector()
    session = make_session(mw, connector=connector)
    responses = await _gated(upstream, mw, session, "/reset", "reset=100", 5)
    assert upstream.hits("/reset") == 1
    for r in responses:  # as plain aiohttp: the error comes where the body is read
        with pytest.raises(aiohttp.ClientPayloadError):
            await bounded(r.read())
    # The flight itself succeeded (its headers came); the body failed for each reader.
    assert mw.stats.errors == 0 and mw.group.in_flight == 0
    assert len(connector._acquired) == 0 and not mw._live


async def test_connection_refused_reaches_every_waiter(make_session):
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mw = SingleflightMiddleware()
    session = make_session(mw)
    results = await bounded(
        asyncio.gather(
            *(session.get(f"http://127.0.0.1:{port}/x") for _ in range(5)),
            return_exceptions=True,
        )
    )
    assert all(isinstance(r, aiohttp.ClientConnectorError) for r in results)
    assert mw.group.in_flight == 0


async def test_head_of_a_large_resource_is_still_shared(upstream, make_session):
    mw = SingleflightMiddleware(max_body_size=1000)
    session = make_session(mw)
    url = upstream.url + "/large-head?gate=lh&size=5000"
    tasks = [asyncio.create_task(session.head(url)) for _ in range(4)]
    await upstream.wait_for_hits_async(1, "/large-head")
    await joined(mw, 3)
    upstream.open_gate("lh")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/large-head") == 1
    for r in responses:
        assert r.headers["Content-Length"] == "5000" and await r.read() == b""


async def test_a_1xx_response_is_never_shared():
    # 101 Switching Protocols to a plain GET: the response belongs to its own connection.
    raw = RawUpstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: chat\r\nConnection: Upgrade\r\n\r\n",
        gated=True,
    )
    mw = SingleflightMiddleware()
    async with serve_raw(raw) as base, aiohttp.ClientSession(middlewares=(mw,)) as s:
        first = asyncio.create_task(s.get(base + "/ws"))
        await bounded(raw.arrived.wait())
        second = asyncio.create_task(s.get(base + "/ws"))
        await joined(mw, 1)
        raw.gate.set()
        responses = await bounded(asyncio.gather(first, second))
        assert [(r.status, served(r)) for r in responses] == [(101, "leader"), (101, "leader")]
        for r in responses:
            r.close()
    assert raw.hits == 2  # the follower made its own request
