"""AsyncSingleflightTransport against a real loopback upstream (asyncio)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import httpx
import pytest
from http_helpers import bounded, pool_is_idle, wait_until

from singleflight import Group
from singleflight.httpx import (
    DEFAULT_IGNORE_HEADERS,
    AsyncSingleflightTransport,
    SingleflightTransport,
)


def client(transport: AsyncSingleflightTransport, upstream, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url=upstream.url, **kw)


async def burst(c: httpx.AsyncClient, transport, n: int, url: str, **kw) -> list[httpx.Response]:
    """Send n identical requests, wait until all joined one flight, then let them land."""
    tasks = [asyncio.ensure_future(c.get(url, **kw)) for _ in range(n)]
    await wait_until(lambda: transport.stats.calls >= n)
    return await asyncio.gather(*tasks)


async def test_1000_concurrent_identical_gets_make_one_upstream_call(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(30), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get("/burst?gate=g1")) for _ in range(1000)]
        await wait_until(lambda: t.stats.calls == 1000, timeout=20)
        upstream.open_gate("g1")
        responses = await asyncio.gather(*tasks)
        assert upstream.hits("/burst") == 1
        assert pool_is_idle(t.inner)
    assert t.stats.leaders == 1 and t.stats.followers == 999
    roles = [r.extensions["singleflight"] for r in responses]
    assert roles.count("leader") == 1 and roles.count("follower") == 999
    assert len({id(r) for r in responses}) == 1000
    assert len({id(r.request) for r in responses}) == 1000
    bodies = {r.content for r in responses}
    assert len(bodies) == 1 and json.loads(bodies.pop())["hit"] == 1
    for r in responses[:5]:
        assert r.status_code == 200
        assert r.http_version == "HTTP/1.1" and r.reason_phrase == "OK"
        # The leader keeps its own connection's stream; a follower never gets it.
        is_leader = r.extensions["singleflight"] == "leader"
        assert ("network_stream" in r.extensions) == is_leader
        assert r.headers["content-type"] == "application/json"
    assert t.group.in_flight == 0


async def test_each_response_is_bound_to_its_own_request(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        tasks = [
            asyncio.ensure_future(c.get("/own?gate=g", headers={"traceparent": f"00-{i:032x}-01"}))
            for i in range(5)
        ]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("g")
        responses = await asyncio.gather(*tasks)
    assert upstream.hits("/own") == 1  # traceparent differences still coalesce
    for i, r in enumerate(responses):
        assert r.request.headers["traceparent"] == f"00-{i:032x}-01"


@pytest.mark.parametrize(
    "header", ["Authorization", "Cookie", "X-API-Key"], ids=lambda h: h.lower()
)
async def test_credentials_separate_callers_without_cross_talk(upstream, header):
    t = AsyncSingleflightTransport()
    users = ["alice", "bob", "carol"]
    async with bounded(10), client(t, upstream) as c:
        tasks = {
            user: [
                asyncio.ensure_future(c.get("/who?gate=w", headers={header: f"{user}-token"}))
                for _ in range(10)
            ]
            for user in users
        }
        await wait_until(lambda: t.stats.calls == 30)
        assert t.group.in_flight == 3
        upstream.open_gate("w")
        for user, user_tasks in tasks.items():
            for r in await asyncio.gather(*user_tasks):
                assert r.json()["who"][header.lower()] == f"{user}-token"
    assert upstream.hits("/who") == 3
    seen = sorted(r.header(header) for r in upstream.requests("/who"))
    assert seen == [f"{u}-token" for u in users]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_compressed_bodies_decode_exactly_once(upstream, encoding, chunked):
    t = AsyncSingleflightTransport()
    url = f"/z?encoding={encoding}&chunked={chunked}&gate=z"
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get(url)) for _ in range(8)]
        await wait_until(lambda: t.stats.calls == 8)
        upstream.open_gate("z")
        responses = await asyncio.gather(*tasks)
    assert upstream.hits("/z") == 1
    raw_len = {r.num_bytes_downloaded for r in responses}
    for r in responses:
        assert r.headers["content-encoding"] == encoding
        assert r.json()["path"] == "/z"
    # Every caller downloaded the same raw (still compressed) bytes and decoded them itself.
    assert len(raw_len) == 1
    plain = responses[0].content
    compressed = gzip.compress(plain, mtime=0) if encoding == "gzip" else zlib.compress(plain)
    assert raw_len.pop() == len(compressed)


async def test_streaming_callers_read_the_shared_body(upstream):
    t = AsyncSingleflightTransport()

    async def stream_one(c):
        async with c.stream("GET", "/lines?size=5000&gate=s") as r:
            return r.extensions["singleflight"], b"".join([b async for b in r.aiter_bytes()])

    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(stream_one(c)) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("s")
        results = await asyncio.gather(*tasks)
    assert upstream.hits("/lines") == 1
    assert {len(body) for _, body in results} == {5000}
    assert sorted(role for role, _ in results) == ["follower"] * 4 + ["leader"]


async def test_set_cookie_goes_to_the_leader_only(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get("/login?set_cookie=sid=abc&gate=c")) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("c")
        responses = await asyncio.gather(*tasks)
        # Every caller made its own request: nobody got someone else's session.
        assert upstream.hits("/login") == 5
        assert [r.extensions["singleflight"] for r in responses] == ["leader"] * 5
        assert len({r.json()["hit"] for r in responses}) == 5
        assert all(r.headers["set-cookie"] == "sid=abc" for r in responses)
        # ... and nothing was cached.
        again = await c.get("/login?set_cookie=sid=abc&gate=c")
        assert again.extensions["singleflight"] == "leader" and upstream.hits("/login") == 6
        assert pool_is_idle(t.inner)


async def test_event_stream_is_streamed_to_its_leader_never_buffered(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        async with c.stream("GET", "/sse?sse=3&hold=h") as r:
            assert r.headers["content-type"] == "text/event-stream"
            assert r.extensions["singleflight"] == "leader"
            lines = r.aiter_lines()
            # The first event arrives while the upstream still holds the rest.
            assert await lines.__anext__() == "data: 0"
            upstream.open_gate("h")
            rest = [line async for line in lines if line]
        assert rest == ["data: 1", "data: 2"]
        assert pool_is_idle(t.inner)


async def test_accept_event_stream_bypasses(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        r = await c.get("/sse?sse=2", headers={"Accept": "text/event-stream"})
    assert r.text == "data: 0\n\ndata: 1\n\n"
    assert "singleflight" not in r.extensions and t.stats.calls == 0


@pytest.mark.parametrize("chunked", ["0"])  # chunked: shared live, test_httpx_live.py
async def test_oversized_bodies_are_not_shared(upstream, chunked):
    t = AsyncSingleflightTransport(max_body_size=10_000)
    url = f"/big?size=50000&chunked={chunked}&gate=b"
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get(url)) for _ in range(4)]
        await wait_until(lambda: t.stats.calls == 4)
        upstream.open_gate("b")
        responses = await asyncio.gather(*tasks)
        assert upstream.hits("/big") == 4
        assert all(len(r.content) == 50000 for r in responses)
        assert [r.extensions["singleflight"] for r in responses] == ["leader"] * 4
        assert pool_is_idle(t.inner)
        # Under the limit it is shared again.
        small = await burst(c, t, 3, "/small?size=100&delay=0.05")
        assert upstream.hits("/small") == 1 and len(small[2].content) == 100


async def test_head_is_shared_whatever_its_content_length(upstream):
    t = AsyncSingleflightTransport(max_body_size=10)
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.head("/hd?size=5000&gate=hd")) for _ in range(3)]
        await wait_until(lambda: t.stats.calls == 3)
        upstream.open_gate("hd")
        responses = await asyncio.gather(*tasks)
    assert upstream.hits("/hd") == 1
    assert {r.headers["content-length"] for r in responses} == {"5000"}
    assert {r.content for r in responses} == {b""}


async def test_5xx_is_shared_from_one_hit_and_not_cached(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get("/down?status=503&gate=d")) for _ in range(20)]
        await wait_until(lambda: t.stats.calls == 20)
        upstream.open_gate("d")
        responses = await asyncio.gather(*tasks)
        assert upstream.hits("/down") == 1
        assert {r.status_code for r in responses} == {503}
        assert {r.reason_phrase for r in responses} == {"Service Unavailable"}
        await c.get("/down?status=503&gate=d")
        assert upstream.hits("/down") == 2


async def test_transport_errors_are_shared_as_fresh_exceptions(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get("/reset?reset=100&gate=r")) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("r")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert upstream.hits("/reset") == 1
        assert all(isinstance(e, httpx.RemoteProtocolError) for e in results)
        assert len({id(e) for e in results}) == 5  # each caller its own exception object...
        requests = {id(e.request) for e in results}
        assert len(requests) == 5  # ... bound to its own request
        assert pool_is_idle(t.inner)
    assert t.stats.errors == 1


async def test_connection_refused_reaches_every_caller():
    t = AsyncSingleflightTransport()
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
        results = await asyncio.gather(
            *[c.get("http://127.0.0.1:9/nothing") for _ in range(3)], return_exceptions=True
        )
    assert all(isinstance(e, httpx.ConnectError) for e in results)


async def test_leader_timeout_reelects_a_follower(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        leader = asyncio.ensure_future(c.get("/slow?gate=t", timeout=0.2))
        await upstream.wait_for_hits_async(1, "/slow")
        followers = [asyncio.ensure_future(c.get("/slow?gate=t", timeout=5)) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 6)
        with pytest.raises(httpx.ReadTimeout):
            await leader
        # A follower became the leader and sent the request again; the rest follow it.
        await upstream.wait_for_hits_async(2, "/slow")
        upstream.open_gate("t")
        responses = await asyncio.gather(*followers)
        assert [r.status_code for r in responses] == [200] * 5
        assert sorted(r.extensions["singleflight"] for r in responses) == ["follower"] * 4 + [
            "leader"
        ]
        assert responses[0].json()["hit"] == 2
        assert pool_is_idle(t.inner)
    assert upstream.hits("/slow") == 2


async def test_follower_enforces_its_own_timeout(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        leader = asyncio.ensure_future(c.get("/patient?gate=p", timeout=5))
        await upstream.wait_for_hits_async(1, "/patient")
        impatient = asyncio.ensure_future(c.get("/patient?gate=p", timeout=0.1))
        with pytest.raises(httpx.ReadTimeout) as info:
            await impatient
        assert "identical request in flight" in str(info.value)
        assert info.value.request.extensions["timeout"]["read"] == 0.1
        upstream.open_gate("p")
        assert (await leader).status_code == 200
    assert upstream.hits("/patient") == 1


async def test_follower_reelected_late_gets_its_full_timeout(upstream):
    # A follower's deadline covers its waiting only: once it leads, httpx's timeouts apply.
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        leader = asyncio.ensure_future(c.get("/late?gate=l", timeout=0.3))
        await upstream.wait_for_hits_async(1, "/late")
        follower = asyncio.ensure_future(c.get("/late?gate=l", timeout=0.5))
        await wait_until(lambda: t.stats.calls == 2)
        with pytest.raises(httpx.ReadTimeout):
            await leader
        await upstream.wait_for_hits_async(2, "/late")  # the follower now leads
        await asyncio.sleep(0.3)  # time passing is the point: past its first 0.5 s budget
        upstream.open_gate("l")
        r = await follower
    assert r.status_code == 200 and r.extensions["singleflight"] == "leader"


async def test_leader_cancellation_reelects(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        leader = asyncio.ensure_future(c.get("/cancel?gate=x"))
        await upstream.wait_for_hits_async(1, "/cancel")
        followers = [asyncio.ensure_future(c.get("/cancel?gate=x")) for _ in range(4)]
        await wait_until(lambda: t.stats.calls == 5)
        leader.cancel()
        await upstream.wait_for_hits_async(2, "/cancel")
        upstream.open_gate("x")
        responses = await asyncio.gather(*followers)
        assert leader.cancelled()
        assert {r.status_code for r in responses} == {200}
        await wait_until(lambda: pool_is_idle(t.inner))
    assert upstream.hits("/cancel") == 2


async def test_follower_cancellation_affects_it_alone(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        tasks = [asyncio.ensure_future(c.get("/fc?gate=f")) for _ in range(3)]
        await wait_until(lambda: t.stats.calls == 3)
        tasks[1].cancel()
        upstream.open_gate("f")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[0].status_code == results[2].status_code == 200
    assert upstream.hits("/fc") == 1


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("POST", {}),
        ("PUT", {"content": b"x"}),
        ("GET", {"content": b"a body"}),
        ("GET", {"headers": {"Upgrade": "websocket", "Connection": "upgrade"}}),
        ("GET", {"extensions": {"singleflight": False}}),
    ],
    ids=["post", "put", "get-with-body", "upgrade", "opt-out"],
)
async def test_bypassed_requests_go_straight_through(upstream, method, kwargs):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        responses = await asyncio.gather(
            *[c.request(method, "/by?delay=0.05", **kwargs) for _ in range(3)]
        )
    assert upstream.hits("/by") == 3
    assert all("singleflight" not in r.extensions for r in responses)
    assert t.stats.calls == 0


async def test_methods_option(upstream):
    t = AsyncSingleflightTransport(methods=("GET",))
    async with bounded(10), client(t, upstream) as c:
        await asyncio.gather(*[c.head("/m?delay=0.05") for _ in range(3)])
        assert upstream.hits("/m") == 3
        await burst(c, t, 3, "/m?delay=0.05")
        assert upstream.hits("/m") == 4


async def test_head_and_get_do_not_share(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream) as c:
        get = asyncio.ensure_future(c.get("/hg?gate=hg"))
        head = asyncio.ensure_future(c.head("/hg?gate=hg"))
        await wait_until(lambda: t.stats.calls == 2)
        upstream.open_gate("hg")
        get_r, head_r = await asyncio.gather(get, head)
    assert upstream.hits("/hg") == 2
    assert head_r.content == b"" and get_r.json()["method"] == "GET"
    assert head_r.extensions["singleflight"] == get_r.extensions["singleflight"] == "leader"


@pytest.mark.parametrize("status", [304, 206])
async def test_conditional_and_range_requests_stay_apart(upstream, status):
    t = AsyncSingleflightTransport()
    headers = {"If-None-Match": '"v1"'} if status == 304 else {"Range": "bytes=0-9"}
    async with bounded(10), client(t, upstream) as c:
        cond = asyncio.ensure_future(c.get(f"/cond?status={status}&gate=k", headers=headers))
        plain = asyncio.ensure_future(c.get("/cond?status=200&gate=k"))
        conds = [
            asyncio.ensure_future(c.get(f"/cond?status={status}&gate=k", headers=headers))
            for _ in range(3)
        ]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("k")
        results = await asyncio.gather(cond, plain, *conds)
    assert upstream.hits("/cond") == 2
    assert {r.status_code for r in [results[0], *results[2:]]} == {status}
    assert results[1].status_code == 200


async def test_redirect_hops_are_coalesced_one_by_one(upstream):
    t = AsyncSingleflightTransport()
    async with bounded(10), client(t, upstream, follow_redirects=True) as c:
        tasks = [
            asyncio.ensure_future(c.get("/hop?redirect=/final%3Fgate%3Dr&gate=r0"))
            for _ in range(5)
        ]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("r0")
        await wait_until(lambda: t.stats.calls == 10)
        upstream.open_gate("r")
        responses = await asyncio.gather(*tasks)
    assert upstream.hits("/hop") == 1 and upstream.hits("/final") == 1
    for r in responses:
        assert r.url.path == "/final" and len(r.history) == 1
        assert r.history[0].status_code == 302


async def test_no_connections_held_after_a_mixed_burst(upstream):
    t = AsyncSingleflightTransport(max_body_size=1000)
    urls = [
        "/mix?delay=0.02",
        "/mix?delay=0.02&encoding=gzip",
        "/mix?delay=0.02&set_cookie=a=b",
        "/mix?delay=0.02&size=5000",
        "/mix?delay=0.02&status=500",
        "/mix?sse=2",
    ]
    async with bounded(10), client(t, upstream) as c:
        results = await asyncio.gather(
            *[c.get(u) for u in urls for _ in range(20)], return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        assert pool_is_idle(t.inner)
        assert len(t.inner._pool.connections) <= 100


async def test_group_shared_between_transports_and_clients(upstream):
    first = AsyncSingleflightTransport(ttl=60)
    second = AsyncSingleflightTransport(group=first.group)
    async with bounded(10), client(first, upstream) as c1, client(second, upstream) as c2:
        tasks = [asyncio.ensure_future(c.get("/g2?gate=g2")) for c in (c1, c2) for _ in range(3)]
        await wait_until(lambda: first.stats.calls == 6)
        upstream.open_gate("g2")
        await asyncio.gather(*tasks)
        assert (await c2.get("/g2?gate=g2")).extensions["singleflight"] == "cache"
    assert upstream.hits("/g2") == 1
    assert second.stats == first.stats


async def test_custom_key_and_ignore_headers(upstream):
    t = AsyncSingleflightTransport(key=lambda request: request.url.path)
    async with bounded(10), client(t, upstream) as c:
        a = asyncio.ensure_future(c.get("/ck?gate=ck&v=1"))
        b = asyncio.ensure_future(c.get("/ck?gate=ck&v=2"))
        await wait_until(lambda: t.stats.calls == 2)
        upstream.open_gate("ck")
        ra, rb = await asyncio.gather(a, b)
    assert upstream.hits("/ck") == 1 and ra.content == rb.content

    t2 = AsyncSingleflightTransport(ignore_headers=DEFAULT_IGNORE_HEADERS | {"x-noise"})
    async with bounded(10), client(t2, upstream) as c:
        tasks = [
            asyncio.ensure_future(c.get("/ih?gate=ih", headers={"X-Noise": str(i)}))
            for i in range(3)
        ]
        await wait_until(lambda: t2.stats.calls == 3)
        upstream.open_gate("ih")
        await asyncio.gather(*tasks)
    assert upstream.hits("/ih") == 1


async def test_key_returning_none_bypasses(upstream):
    t = AsyncSingleflightTransport(key=lambda request: None)
    async with bounded(10), client(t, upstream) as c:
        await asyncio.gather(*[c.get("/kn?delay=0.05") for _ in range(3)])
    assert upstream.hits("/kn") == 3 and t.stats.calls == 0


async def test_reentrant_request_goes_on_its_own(upstream):
    class Nested(httpx.AsyncBaseTransport):
        """An inner transport that, like an auth flow, sends the same request once more."""

        def __init__(self):
            self.real = httpx.AsyncHTTPTransport()
            self.depth = 0

        async def handle_async_request(self, request):
            if self.depth == 0:
                self.depth += 1
                nested = await outer.handle_async_request(request)
                await nested.aread()
                await nested.aclose()
            return await self.real.handle_async_request(request)

        async def aclose(self):
            await self.real.aclose()

    outer = AsyncSingleflightTransport(Nested())
    async with bounded(10), client(outer, upstream) as c:
        r = await c.get("/nest")
    assert r.status_code == 200 and upstream.hits("/nest") == 2


async def test_context_manager_and_close_reach_the_inner_transport():
    events = []

    class Inner(httpx.AsyncBaseTransport):
        async def __aenter__(self):
            events.append("enter")
            return self

        async def __aexit__(self, *exc):
            events.append("exit")

        async def aclose(self):
            events.append("close")

        async def handle_async_request(self, request):  # pragma: no cover - not called
            raise AssertionError

    t = AsyncSingleflightTransport(Inner())
    async with httpx.AsyncClient(transport=t):
        pass
    await t.aclose()
    assert events == ["enter", "exit", "close"]
    async with t as entered:
        assert entered is t
    assert events[-2:] == ["enter", "exit"]


def test_bad_arguments_fail_at_construction():
    with pytest.raises(TypeError, match="inner must be an httpx.AsyncBaseTransport"):
        AsyncSingleflightTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inner must be an httpx.BaseTransport"):
        SingleflightTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl must be > 0 and finite, got 0"):
        AsyncSingleflightTransport(ttl=0)
    with pytest.raises(TypeError, match="methods must be a collection"):
        SingleflightTransport(methods="GET")
    with pytest.raises(ValueError, match="group= brings its own cache"):
        AsyncSingleflightTransport(group=Group(), ttl=5)
    with pytest.raises(ValueError, match="credentials"):
        AsyncSingleflightTransport(ignore_headers=["authorization"])
