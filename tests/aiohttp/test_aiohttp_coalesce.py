"""One upstream request for concurrent identical requests; each caller its own response."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_support import bounded, joined, wait_until

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def test_1000_identical_gets_make_one_upstream_request(upstream, make_session):
    mw = SingleflightMiddleware()
    connector = aiohttp.TCPConnector(limit=100)
    session = make_session(mw, connector=connector)
    url = upstream.url + "/burst?gate=burst"

    async def get(i: int):
        # X-Request-Id differs per caller and is left out of the key (a tracing header).
        async with session.get(url, headers={"X-Request-Id": str(i)}) as resp:
            return resp, await resp.json(), await resp.text(), await resp.read()

    tasks = [asyncio.create_task(get(i)) for i in range(1000)]
    await upstream.wait_for_hits_async(1, "/burst")
    await joined(mw, 999)
    upstream.open_gate("burst")
    results = await bounded(asyncio.gather(*tasks))

    assert upstream.hits("/burst") == 1
    assert mw.stats.calls == 1000 and mw.stats.leaders == 1 and mw.stats.followers == 999
    roles = [served(resp) for resp, *_ in results]
    assert roles.count("leader") == 1 and roles.count("follower") == 999
    assert len({id(resp) for resp, *_ in results}) == 1000  # every caller its own object
    for i, (resp, data, text, raw) in enumerate(results):
        assert resp.status == 200 and resp.ok
        assert data["hit"] == 1 and data["path"] == "/burst"
        assert text == raw.decode() and raw == results[0][3]
        assert str(resp.url) == url and resp.history == ()
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.request_info.headers["X-Request-Id"] == str(i)  # its own request
        assert str(resp.request_info.url) == url and resp.request_info.method == "GET"
        assert resp.connection is None and resp.closed
    # No connection left held: none acquired, and a limit=1 connector still gets through.
    assert len(connector._acquired) == 0
    assert mw.group.in_flight == 0


async def test_no_connection_held_with_a_one_connection_pool(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw, connector=aiohttp.TCPConnector(limit=1))
    for path in ("/p1", "/p2", "/p3"):  # a held connection would block the next path forever
        responses = await bounded(
            asyncio.gather(*(session.get(upstream.url + path + "?delay=0.01") for _ in range(20))),
            timeout=5,
        )
        assert {r.status for r in responses} == {200}
        # Nobody read or released these: followers hold nothing, the leader's body is read.
    assert upstream.hits() == 3


async def test_follower_response_behaves_like_aiohttps_own(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/obj?gate=obj&header=X-Extra:1&header=X-Extra:2"
    leader = asyncio.create_task(session.get(url))
    await upstream.wait_for_hits_async(1, "/obj")
    follower = asyncio.create_task(session.get(url))
    await joined(mw, 1)
    upstream.open_gate("obj")
    lead, resp = await bounded(asyncio.gather(leader, follower))
    assert served(lead) == "leader" and served(resp) == "follower"

    for r in (lead, resp):
        assert r.headers.getall("X-Extra") == ["1", "2"]  # duplicates and order kept
        assert r.version == aiohttp.HttpVersion11 and r.reason == "OK"
        assert r.content_type == "application/json" and r.charset is None
        assert r.get_encoding() == "utf-8"
        assert r.method == "GET" and r.real_url == r.url and r.host == "127.0.0.1"
        assert r.cookies == {}
    assert resp.raw_headers == lead.raw_headers
    assert await resp.read() == await lead.read()  # (content's API: test_aiohttp_readers)
    async with resp:
        assert (await resp.json())["hit"] == 1
    # Released, like any aiohttp response: read() says so, text()/json() still answer.
    with pytest.raises(aiohttp.ClientConnectionError):
        await resp.read()
    assert (await resp.json())["hit"] == 1
    assert "ClientResponse" in repr(resp)
    lead.release()


async def test_head_and_get_are_separate_flights(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    url = upstream.url + "/hg?gate=hg"
    tasks = [asyncio.create_task(session.request(m, url)) for m in ("GET", "HEAD") * 5]
    await upstream.wait_for_hits_async(2, "/hg")
    await joined(mw, 8)
    upstream.open_gate("hg")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/hg") == 2
    for r in responses:
        body = await r.read()
        assert r.status == 200
        assert (body == b"") == (r.method == "HEAD")
    assert sorted(served(r) for r in responses) == ["follower"] * 8 + ["leader"] * 2


async def test_distinct_urls_are_not_merged(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await bounded(
        asyncio.gather(*(session.get(f"{upstream.url}/d{i}?delay=0.01") for i in range(20)))
    )
    assert upstream.hits() == 20
    assert {served(r) for r in responses} == {"leader"}
    assert [(await r.json())["path"] for r in responses] == [f"/d{i}" for i in range(20)]


async def test_sessions_sharing_a_middleware_share_flights(upstream, make_session):
    mw = SingleflightMiddleware()
    sessions = [make_session(mw) for _ in range(3)]
    url = upstream.url + "/shared?gate=shared"
    tasks = [asyncio.create_task(s.get(url)) for s in sessions for _ in range(3)]
    await upstream.wait_for_hits_async(1, "/shared")
    await joined(mw, 8)
    upstream.open_gate("shared")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/shared") == 1
    assert {r.status for r in responses} == {200}


async def test_sequential_requests_each_fly(upstream, make_session):
    mw = SingleflightMiddleware()  # no ttl: coalescing is not caching
    session = make_session(mw)
    for n in (1, 2, 3):
        async with session.get(upstream.url + "/seq") as resp:
            assert (await resp.json())["hit"] == n
            assert served(resp) == "leader"
    assert mw.group.in_flight == 0


async def test_raise_for_status_reports_each_callers_own_request(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw, raise_for_status=True)
    url = upstream.url + "/missing?status=404&gate=rfs"

    async def get(user: str):
        await session.get(url, headers={"X-Request-Id": user})

    tasks = [asyncio.create_task(get(u)) for u in ("a", "b", "c")]
    await upstream.wait_for_hits_async(1, "/missing")
    await joined(mw, 2)
    upstream.open_gate("rfs")
    results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert upstream.hits("/missing") == 1
    for user, exc in zip("abc", results, strict=True):
        assert isinstance(exc, aiohttp.ClientResponseError) and exc.status == 404
        assert exc.request_info.headers["X-Request-Id"] == user


async def test_served_is_none_for_responses_it_did_not_serve(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    async with session.post(upstream.url + "/post", data=b"x") as resp:
        assert served(resp) is None
    async with make_session().get(upstream.url + "/plain") as resp:
        assert served(resp) is None


async def test_stats_and_in_flight(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    task = asyncio.create_task(session.get(upstream.url + "/st?gate=st"))
    await wait_until(lambda: mw.group.in_flight == 1, "a flight")
    upstream.open_gate("st")
    (await bounded(task)).release()
    assert mw.group.in_flight == 0
    assert mw.stats.calls == 1 and mw.stats.leaders == 1
    assert "SingleflightMiddleware" in repr(mw)
