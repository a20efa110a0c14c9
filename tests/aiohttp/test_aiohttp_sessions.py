"""Sessions that share one middleware (or Group): one session's end is not another's error."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_servers import WebUpstream, serve
from _aiohttp_support import bounded, joined, wait_until

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def test_a_leader_whose_session_closes_hands_the_flight_to_another_session():
    up = WebUpstream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base:
        sa = aiohttp.ClientSession(middlewares=(mw,))
        sb = aiohttp.ClientSession(middlewares=(mw,))
        try:
            lead = asyncio.create_task(sa.get(base + "/x?gate=g"))
            await bounded(up.arrival("g").wait())
            follow = [asyncio.create_task(sb.get(base + "/x?gate=g")) for _ in range(3)]
            await joined(mw, 3)
            await sa.close()  # mid-flight: the leader's request dies with its session
            with pytest.raises(aiohttp.ClientError):
                await bounded(lead)  # its own error, as plain aiohttp gives it
            # One of sb's callers took the flight over; the others follow it.
            await wait_until(lambda: up.hits["/x"] == 2, "the new leader's request")
            up.gate("g").set()
            responses = await bounded(asyncio.gather(*follow))
            assert sorted(served(r) for r in responses) == ["follower", "follower", "leader"]
            assert {r.status for r in responses} == {200}
        finally:
            await sa.close()
            await sb.close()
    assert mw.stats.reelections == 1 and mw.group.in_flight == 0


async def test_a_follower_whose_session_closes_leaves_the_flight_alone():
    up = WebUpstream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as sa:
        sb = aiohttp.ClientSession(middlewares=(mw,))
        lead = asyncio.create_task(sa.get(base + "/x?gate=g"))
        await bounded(up.arrival("g").wait())
        follow = asyncio.create_task(sb.get(base + "/x?gate=g"))
        await joined(mw, 1)
        await sb.close()
        up.gate("g").set()
        async with await bounded(lead) as r:
            assert r.status == 200 and served(r) == "leader"
        async with await bounded(follow) as r:  # a copy needs no connection of its own
            assert served(r) == "follower" and (await r.json())["hit"] == 1
    assert up.hits["/x"] == 1 and mw.group.in_flight == 0


class _NoRawHeaders(aiohttp.ClientResponse):
    """A custom response class whose start() leaves raw_headers None (as aiohttp's own
    test_custom_req_rep does): the middleware must cope, and leak nothing either way."""

    async def start(self, connection):  # type: ignore[no-untyped-def]
        await super().start(connection)
        self._raw_headers = None
        return self


async def test_a_custom_response_without_raw_headers_is_served_and_nothing_leaks():
    up = WebUpstream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base:
        session = aiohttp.ClientSession(middlewares=(mw,), response_class=_NoRawHeaders)
        async with session:
            lead = asyncio.create_task(session.get(base + "/x?gate=g"))
            await bounded(up.arrival("g").wait())
            follow = asyncio.create_task(session.get(base + "/x?gate=g"))
            await joined(mw, 1)
            up.gate("g").set()
            for r in await bounded(asyncio.gather(lead, follow)):
                async with r:
                    assert r.status == 200 and (await r.json())["path"] == "/x"
            assert not session.connector._acquired
    assert mw.group.in_flight == 0


async def test_a_response_the_middleware_fails_to_hand_out_is_closed(monkeypatch):
    # A fault injected after the upstream answered (a mock: the honest way to make our own
    # code fail there): the error reaches the caller and the connection is not left held.
    import singleflight.aiohttp as adapter

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(adapter, "alone_reason", broken)
    up = WebUpstream()
    async with (
        serve(up.app) as base,
        aiohttp.ClientSession(middlewares=(adapter.SingleflightMiddleware(),)) as s,
    ):
        with pytest.raises(RuntimeError, match="injected"):
            # A body held after its first piece: its connection is busy until closed.
            await bounded(s.get(base + "/x?kind=chunked&mid=m"))
        assert not s.connector._acquired
        up.gate("m").set()
