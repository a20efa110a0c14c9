"""The key policy through aiohttp: who shares a flight and what passes straight through."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest
from _aiohttp_support import bounded, joined

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


async def _burst(upstream, mw, session, path, header_sets, *, followers, hits, gate=None):
    """Send one GET per header set to ``path`` behind a gate; return the responses' JSON."""
    gate = gate or path.strip("/")
    url = f"{upstream.url}{path}?gate={gate}"
    tasks = [asyncio.create_task(session.get(url, headers=h)) for h in header_sets]
    await upstream.wait_for_hits_async(hits, path)
    await joined(mw, followers)
    upstream.open_gate(gate)
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits(path) == hits
    return [await r.json() for r in responses]


@pytest.mark.parametrize(
    "header",
    ["Authorization", "Cookie", "X-API-Key", "Proxy-Authorization", "Accept", "Range", "X-User"],
)
async def test_different_credentials_and_representations_separate_callers(
    upstream, make_session, header
):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    values = ["alice", "bob", "alice", "bob", "carol"]
    data = await _burst(
        upstream, mw, session, "/who", [{header: v} for v in values], followers=2, hits=3
    )
    if header.lower() in ("authorization", "cookie", "x-api-key", "x-user"):
        # Nobody ever sees another caller's response.
        assert [d["who"][header.lower()] for d in data] == values


async def test_tracing_headers_still_coalesce(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    header_sets = [
        {"traceparent": f"00-{i:032x}-{i:016x}-01", "X-B3-TraceId": str(i), "baggage": str(i)}
        for i in range(1, 11)
    ]
    await _burst(upstream, mw, session, "/traced", header_sets, followers=9, hits=1)


async def test_trace_config_headers_still_coalesce(upstream, make_session):
    # OpenTelemetry-style: a TraceConfig hook adds a fresh traceparent to every request.
    counter = iter(range(1, 1000))

    async def on_start(session, ctx, params):
        params.headers["traceparent"] = f"00-{next(counter):032x}-{1:016x}-01"

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    mw = SingleflightMiddleware()
    session = make_session(mw, trace_configs=[trace])
    await _burst(upstream, mw, session, "/otel", [{}] * 5, followers=4, hits=1)


async def test_ignore_headers_extends_the_policy(upstream, make_session):
    mw = SingleflightMiddleware(ignore_headers={"x-user"})
    session = make_session(mw)
    await _burst(
        upstream, mw, session, "/ign", [{"X-User": u} for u in "abcd"], followers=3, hits=1
    )


async def test_custom_key_replaces_the_policy(upstream, make_session):
    mw = SingleflightMiddleware(key=lambda req: req.url.path)  # queries ignored
    session = make_session(mw)
    tasks = [asyncio.create_task(session.get(f"{upstream.url}/ck?gate=ck&i={i}")) for i in range(5)]
    await upstream.wait_for_hits_async(1, "/ck")
    await joined(mw, 4)
    upstream.open_gate("ck")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/ck") == 1
    assert {(await r.json())["query"] for r in responses} == {"gate=ck&i=0"}


async def test_custom_key_returning_none_bypasses(upstream, make_session):
    mw = SingleflightMiddleware(key=lambda req: None)
    session = make_session(mw)
    responses = await bounded(
        asyncio.gather(*(session.get(upstream.url + "/none?delay=0.05") for _ in range(5)))
    )
    assert upstream.hits("/none") == 5
    assert {served(r) for r in responses} == {None}


async def test_auto_decompress_is_part_of_the_key(upstream, make_session):
    mw = SingleflightMiddleware()
    decoding = make_session(mw)
    raw = make_session(mw, auto_decompress=False)
    url = upstream.url + "/gz?gate=gz&encoding=gzip"
    tasks = [asyncio.create_task(s.get(url)) for s in (decoding, raw, decoding, raw)]
    await upstream.wait_for_hits_async(2, "/gz")
    await joined(mw, 2)
    upstream.open_gate("gz")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/gz") == 2
    bodies = [await r.read() for r in responses]
    assert bodies[0] == bodies[2] and bodies[0].startswith(b"{")  # decoded by aiohttp
    assert bodies[1] == bodies[3] and bodies[1][:2] == b"\x1f\x8b"  # raw gzip bytes
    assert json.loads(gzip.decompress(bodies[1]))["path"] == "/gz"


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("POST", {}),
        ("PUT", {"data": b"x"}),
        ("GET", {"data": b"a body"}),
        ("GET", {"headers": {"Accept": "text/event-stream"}, "params": {"sse": "1"}}),
        ("GET", {"headers": {"Upgrade": "websocket", "Connection": "Upgrade"}}),
    ],
    ids=["post", "put-body", "get-with-body", "accept-event-stream", "upgrade"],
)
async def test_requests_that_pass_straight_through(upstream, make_session, method, kwargs):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    params = {"delay": "0.05", **kwargs.pop("params", {})}
    responses = await bounded(
        asyncio.gather(
            *(
                session.request(method, upstream.url + "/pass", params=params, **kwargs)
                for _ in range(4)
            )
        )
    )
    for r in responses:
        await r.read()
        assert served(r) is None
    assert upstream.hits("/pass") == 4
    assert mw.stats.calls == 0


async def test_methods_option(upstream, make_session):
    mw = SingleflightMiddleware(methods=("GET", "OPTIONS"))
    session = make_session(mw)
    url = upstream.url + "/opt?gate=opt"
    tasks = [asyncio.create_task(session.request("OPTIONS", url)) for _ in range(3)]
    tasks += [asyncio.create_task(session.head(url)) for _ in range(3)]  # HEAD not listed
    await upstream.wait_for_hits_async(4, "/opt")
    await joined(mw, 2)
    upstream.open_gate("opt")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/opt") == 4
    assert [served(r) for r in responses[3:]] == [None] * 3


async def test_per_request_middlewares_replace_the_sessions(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    responses = await bounded(
        asyncio.gather(
            *(session.get(upstream.url + "/off?delay=0.05", middlewares=()) for _ in range(4))
        )
    )
    assert upstream.hits("/off") == 4
    assert {served(r) for r in responses} == {None}


async def test_non_latin1_header_values_are_keyed(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    await _burst(
        upstream, mw, session, "/utf", [{"X-Name": v} for v in ("€", "€", "☃")], followers=1, hits=2
    )


async def test_equivalent_urls_share_a_flight(upstream, make_session):
    mw = SingleflightMiddleware()
    session = make_session(mw)
    base = upstream.url  # http://127.0.0.1:PORT
    urls = [
        f"{base}?gate=root",
        f"{base}/?gate=root",
        base.upper().replace("HTTP", "http") + "/?gate=root#frag",
    ]
    tasks = [asyncio.create_task(session.get(u)) for u in urls]
    await upstream.wait_for_hits_async(1, "/")
    await joined(mw, 2)
    upstream.open_gate("root")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/") == 1
    assert sorted(served(r) for r in responses) == ["follower", "follower", "leader"]


async def test_the_key_keeps_the_shared_policy(upstream, make_session):
    # The fast path (yarl's normalised URL) must give the policy's own normalised URL.
    from singleflight._http import normalise_url

    keys = []

    async def spy(req, handler):
        keys.append((mw._key(req), normalise_url(str(req.original_url))))
        return await handler(req)

    mw = SingleflightMiddleware()
    session = make_session(None, middlewares=(spy,))
    for path in ("", "/", "/a/../b?x=%2F&y=1", "/%7euser"):
        async with session.get(upstream.url + path) as resp:
            await resp.read()
    for key, normal in keys:
        assert key.url == normal
