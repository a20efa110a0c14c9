"""Timeouts and cancellation: the leader's own end re-elects; each waiter keeps its own deadline."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_support import bounded, joined

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "timeout",
    [aiohttp.ClientTimeout(total=0.2), aiohttp.ClientTimeout(sock_read=0.2)],
    ids=["total", "sock_read"],
)
async def test_leader_timeout_reelects_a_follower(upstream, make_session, timeout):
    mw = SingleflightMiddleware()
    connector = aiohttp.TCPConnector()
    session = make_session(mw, connector=connector)
    url = upstream.url + "/slow?gate=slow"
    leader = asyncio.create_task(session.get(url, timeout=timeout))
    await upstream.wait_for_hits_async(1, "/slow")
    followers = [asyncio.create_task(session.get(url)) for _ in range(4)]
    await joined(mw, 4)

    with pytest.raises(asyncio.TimeoutError):  # the leader's own deadline: only it fails
        await bounded(leader)
    await upstream.wait_for_hits_async(2, "/slow")  # a follower took over and asked upstream
    upstream.open_gate("slow")
    responses = await bounded(asyncio.gather(*followers))

    assert upstream.hits("/slow") == 2
    assert {r.status for r in responses} == {200}
    assert sorted(served(r) for r in responses) == ["follower"] * 3 + ["leader"]
    assert {(await r.json())["hit"] for r in responses} == {2}
    assert mw.stats.errors == 0 and mw.group.in_flight == 0
    assert len(connector._acquired) == 0


async def test_leader_cancellation_reelects_a_follower(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/cancel?gate=cancel"
    leader = asyncio.create_task(session.get(url))
    await upstream.wait_for_hits_async(1, "/cancel")
    followers = [asyncio.create_task(session.get(url)) for _ in range(4)]
    await joined(mw, 4)

    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(leader)
    await upstream.wait_for_hits_async(2, "/cancel")
    upstream.open_gate("cancel")
    responses = await bounded(asyncio.gather(*followers))
    assert {r.status for r in responses} == {200}
    assert upstream.hits("/cancel") == 2


async def test_each_follower_keeps_its_own_timeout(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/own?gate=own"
    leader = asyncio.create_task(session.get(url))  # no deadline of its own
    await upstream.wait_for_hits_async(1, "/own")
    impatient = asyncio.create_task(session.get(url, timeout=aiohttp.ClientTimeout(total=0.1)))
    patient = [asyncio.create_task(session.get(url)) for _ in range(3)]
    await joined(mw, 4)

    with pytest.raises(asyncio.TimeoutError):
        await bounded(impatient)
    assert not leader.done() and not any(t.done() for t in patient)  # the others wait on
    upstream.open_gate("own")
    responses = await bounded(asyncio.gather(leader, *patient))
    assert {r.status for r in responses} == {200}
    assert upstream.hits("/own") == 1


async def test_cancelled_follower_leaves_the_flight_alone(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/fc?gate=fc"
    leader = asyncio.create_task(session.get(url))
    await upstream.wait_for_hits_async(1, "/fc")
    follower = asyncio.create_task(session.get(url))
    await joined(mw, 1)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(follower)
    upstream.open_gate("fc")
    resp = await bounded(leader)
    assert resp.status == 200 and served(resp) == "leader"
    assert upstream.hits("/fc") == 1
