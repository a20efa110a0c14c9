"""A follower waits at most its own sock_read: re-elected leaders' timeouts never add up."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from _aiohttp_support import bounded, joined

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


def sock_read(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_read=seconds)


async def test_a_follower_gives_up_at_its_own_sock_read(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/own-read?gate=own-read"
    leader = asyncio.create_task(session.get(url, timeout=sock_read(10)))
    await upstream.wait_for_hits_async(1, "/own-read")
    t0 = time.monotonic()
    impatient = asyncio.create_task(session.get(url, timeout=sock_read(0.2)))
    await joined(mw, 1)

    with pytest.raises(aiohttp.SocketTimeoutError, match="identical request in flight"):
        await bounded(impatient)
    assert 0.15 <= time.monotonic() - t0 <= 2.0
    assert not leader.done()  # the flight goes on without it
    upstream.open_gate("own-read")
    resp = await bounded(leader)
    assert resp.status == 200 and served(resp) == "leader"
    assert upstream.hits("/own-read") == 1 and mw.group.in_flight == 0


async def test_the_error_is_a_timeout_error_like_aiohttps_own(upstream, make_session):
    session = make_session(SingleflightMiddleware())
    url = upstream.url + "/kind?gate=kind"
    leader = asyncio.create_task(session.get(url))
    await upstream.wait_for_hits_async(1, "/kind")
    with pytest.raises(asyncio.TimeoutError):
        await bounded(session.get(url, timeout=sock_read(0.05)))
    upstream.open_gate("kind")
    (await bounded(leader)).release()


async def test_a_session_sock_read_applies_and_a_request_timeout_overrides_it(
    upstream, make_session
):
    mw = SingleflightMiddleware()
    session = make_session(mw, timeout=sock_read(0.1))
    url = upstream.url + "/override?gate=override"
    leader = asyncio.create_task(session.get(url, timeout=sock_read(10)))
    await upstream.wait_for_hits_async(1, "/override")
    by_session = asyncio.create_task(session.get(url))  # the session's 0.1 s
    patient = asyncio.create_task(session.get(url, timeout=sock_read(10)))
    await joined(mw, 2)
    with pytest.raises(aiohttp.SocketTimeoutError):
        await bounded(by_session)
    assert not patient.done()
    upstream.open_gate("override")
    assert [r.status for r in await bounded(asyncio.gather(leader, patient))] == [200, 200]


async def test_a_chain_of_timed_out_leaders_does_not_add_up(upstream, make_session):
    # Every request hangs; each caller's sock_read is 0.2 s. A re-elected follower leads with
    # its own timeout; the others give up at theirs, not after one timeout per leader.
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/chain?gate=chain"
    started = time.monotonic()
    tasks = [asyncio.create_task(session.get(url, timeout=sock_read(0.2))) for _ in range(10)]
    results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert all(isinstance(r, asyncio.TimeoutError) for r in results)
    assert time.monotonic() - started < 0.2 * 3 + 0.5  # not 10 x 0.2 s
    assert upstream.hits("/chain") <= 2 and mw.group.in_flight == 0


async def test_a_follower_reelected_late_gets_its_full_sock_read(upstream, make_session):
    # Its deadline covers its waiting only: once it leads, aiohttp's own timeouts apply.
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/late?gate=late"
    leader = asyncio.create_task(session.get(url, timeout=sock_read(0.2)))
    await upstream.wait_for_hits_async(1, "/late")
    follower = asyncio.create_task(session.get(url, timeout=sock_read(0.4)))
    await joined(mw, 1)
    with pytest.raises(asyncio.TimeoutError):
        await bounded(leader)
    await upstream.wait_for_hits_async(2, "/late")  # the follower leads now
    await asyncio.sleep(0.3)  # past its first 0.4 s from joining, inside its own read timeout
    upstream.open_gate("late")
    resp = await bounded(follower)
    assert resp.status == 200 and served(resp) == "leader"


@pytest.fixture
async def steady_server():
    """A loopback server whose body arrives a byte every 0.1 s: slow, never silent for long."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    hits = []

    async def steady(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = 8
        await resp.prepare(request)
        for _ in range(8):
            await asyncio.sleep(0.1)
            await resp.write(b"s")
        return resp

    app = web.Application()
    app.router.add_get("/steady", steady)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.hits = hits
    yield server
    await server.close()


async def test_a_follower_waits_while_the_shared_response_keeps_coming(steady_server, make_session):
    # 0.8 s in all, never silent for 0.3 s: a lone caller with sock_read=0.3 gets it, and so
    # does every follower (their read timeout starts over whenever the body moves on).
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = str(steady_server.make_url("/steady"))

    async def get() -> bytes:
        async with session.get(url, timeout=sock_read(0.3)) as resp:
            return await resp.read()

    tasks = [asyncio.create_task(get()) for _ in range(5)]
    assert await bounded(asyncio.gather(*tasks)) == [b"s" * 8] * 5
    assert steady_server.hits == ["/steady"] and mw.stats.followers == 4
