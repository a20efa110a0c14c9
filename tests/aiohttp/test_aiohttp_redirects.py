"""aiohttp runs the middleware once per redirect hop: each hop coalesces on its own."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_support import bounded, joined

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def test_each_redirect_hop_is_coalesced(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/from?gate=from&redirect=/to%3Fgate%3Dto"
    tasks = [asyncio.create_task(session.get(url, headers={"X-User": "u"})) for _ in range(10)]
    await upstream.wait_for_hits_async(1, "/from")
    await joined(mw, 9)
    upstream.open_gate("from")
    await upstream.wait_for_hits_async(1, "/to")  # second hop: a new flight
    await joined(mw, 18)
    upstream.open_gate("to")
    responses = await bounded(asyncio.gather(*tasks))

    assert upstream.hits("/from") == 1 and upstream.hits("/to") == 1
    hops = set()
    for r in responses:
        assert r.status == 200 and str(r.url) == upstream.url + "/to?gate=to"
        assert (await r.json())["who"]["x-user"] == "u"
        assert len(r.history) == 1
        first = r.history[0]
        assert first.status == 302 and first.headers["Location"] == "/to?gate=to"
        assert first.url.path == "/from" and first.url.query["redirect"] == "/to?gate=to"
        hops.add((served(first), served(r)))
        assert first.connection is None
    assert {a for a, _ in hops} == {"leader", "follower"}
    assert len({id(r.history[0]) for r in responses}) == 10  # per-caller history objects


async def test_redirect_without_following(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await bounded(
        asyncio.gather(
            *(
                session.get(upstream.url + "/nf?delay=0.05&redirect=/x", allow_redirects=False)
                for _ in range(5)
            )
        )
    )
    assert {r.status for r in responses} == {302}
    assert {r.headers["Location"] for r in responses} == {"/x"}
    assert upstream.hits("/nf") == 1 and upstream.hits("/x") == 0


@pytest.mark.parametrize("ttl", [None, 60])
async def test_chunk_traces_fire_as_with_a_plain_session(upstream, make_session, ttl):
    """on_response_chunk_received fires for the bodies the caller reads, not redirect hops'."""

    async def count(session: aiohttp.ClientSession, seen: list[bytes]) -> bytes:
        async with session.get(upstream.url + "/hop?redirect=/final%3Fbody%3Dend") as r:
            return await r.read()

    def traced(seen: list[bytes]) -> aiohttp.TraceConfig:
        async def on_chunk(session, ctx, params) -> None:
            seen.append(params.chunk)

        config = aiohttp.TraceConfig()
        config.on_response_chunk_received.append(on_chunk)
        return config

    plain_seen: list[bytes] = []
    wrapped_seen: list[bytes] = []
    plain = make_session(trace_configs=[traced(plain_seen)])
    wrapped = make_session(SingleflightMiddleware(ttl=ttl), trace_configs=[traced(wrapped_seen)])
    assert await count(plain, plain_seen) == await count(wrapped, wrapped_seen) == b"end"
    assert wrapped_seen == plain_seen == [b"end"]
