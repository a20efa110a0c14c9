"""Observability of the aiohttp middleware: one debug record per request, bypasses in stats.

Every request is noted once on the "singleflight" logger (and on OpenTelemetry, when it is
installed): how it was served, or why it went straight through. No record ever holds a header
value or a body. OpenTelemetry's global providers belong to tests/test_observe.py: the span
test here uses a local TracerProvider of its own, never the global one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import aiohttp
import pytest
from _aiohttp_support import bounded, joined, wait_until

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)

SECRETS = ("tok_alice_6f1d", "sid=tok_cookie_91ab", "tok_apikey_c3e2")
HEADERS = {"Authorization": f"Bearer {SECRETS[0]}", "Cookie": SECRETS[1], "X-API-Key": SECRETS[2]}
BODY_MARK = "body_mark_5a5a"  # a request body


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("singleflight")]


def roles(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    return Counter(m for m in messages(caplog) if m.startswith("request "))


def assert_nothing_secret(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__.get("exc_text"))
        for secret in (*SECRETS, BODY_MARK, "Bearer"):
            assert secret not in text, (secret, text)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="singleflight")
    return caplog


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs) -> aiohttp.ClientResponse:
    async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        await resp.read()
    return resp


async def test_leader_follower_and_cache_hit_each_noted_once(upstream, make_session, debug_logs):
    # The upstream's JSON body echoes the credentials: neither they nor the body may be logged.
    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    url = upstream.url + "/obs?gate=obs"
    tasks = [asyncio.create_task(fetch(session, url, headers=HEADERS)) for _ in range(5)]
    await joined(mw, 4)
    upstream.open_gate("obs")
    responses = await bounded(asyncio.gather(*tasks))
    assert {(await r.json())["who"]["x-api-key"] for r in responses} == {SECRETS[2]}
    assert served(await bounded(fetch(session, url, headers=HEADERS))) == "cache"
    assert roles(debug_logs) == {
        "request served as leader": 1,
        "request served as follower": 4,
        "request served as cache": 1,
    }
    assert sum("landed: 1 leader, 4 follower(s)" in m for m in messages(debug_logs)) == 1
    assert mw.stats.bypasses == 0
    assert_nothing_secret(debug_logs)


@pytest.mark.parametrize(
    ("reason", "request_kwargs", "options"),
    [
        ("method", {"method": "POST"}, {}),
        ("body", {"data": BODY_MARK.encode()}, {}),
        ("upgrade", {"headers": {"Upgrade": "websocket", "Connection": "Upgrade"}}, {}),
        ("event-stream", {"headers": {"Accept": "text/event-stream"}}, {}),
        ("key", {}, {"key": lambda request: None}),
    ],
)
async def test_each_bypass_is_noted_with_its_reason_and_counted(
    upstream, make_session, debug_logs, reason, request_kwargs, options
):
    mw = SingleflightMiddleware(**options)
    session = make_session(mw)
    kwargs = dict(request_kwargs)
    kwargs["headers"] = {**HEADERS, **kwargs.get("headers", {})}
    for _ in range(3):
        resp = await bounded(fetch(session, upstream.url + "/bypass", **kwargs))
        assert served(resp) is None
    assert messages(debug_logs) == [f"request bypassed: {reason}"] * 3
    assert mw.stats.bypasses == 3 and mw.stats.calls == 0
    assert_nothing_secret(debug_logs)


async def test_a_reentrant_request_is_noted_as_a_bypass(upstream, make_session, debug_logs):
    nested = False

    async def again(req: aiohttp.ClientRequest, handler):
        # Like an auth middleware: sends the very same request from inside the flight.
        nonlocal nested
        if not nested:
            nested = True
            await fetch(session, str(req.url), headers=HEADERS)
        return await handler(req)

    mw = SingleflightMiddleware()
    session = make_session(middlewares=(mw, again))
    resp = await bounded(fetch(session, upstream.url + "/nested", headers=HEADERS))
    assert resp.status == 200 and served(resp) == "leader"
    assert upstream.hits("/nested") == 2
    assert messages(debug_logs) == ["request bypassed: reentrant", "request served as leader"]
    assert mw.stats.bypasses == 1 and mw.stats.leaders == 1


async def test_errors_and_reelections_are_noted_without_values(upstream, make_session, debug_logs):
    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    url = upstream.url + "/err?reset=10&gate=err"
    tasks = [asyncio.create_task(fetch(session, url, headers=HEADERS)) for _ in range(3)]
    await joined(mw, 2)
    upstream.open_gate("err")
    results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert all(isinstance(e, aiohttp.ClientPayloadError) for e in results)
    assert roles(debug_logs) == {"request served as leader": 1, "request served as follower": 2}

    debug_logs.clear()
    slow = upstream.url + "/slow?gate=slow"
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    leader = asyncio.create_task(fetch(session, slow, headers=HEADERS, timeout=timeout))
    await upstream.wait_for_hits_async(1, "/slow")
    follower = asyncio.create_task(fetch(session, slow, headers=HEADERS))
    await joined(mw, 3)
    with pytest.raises(asyncio.TimeoutError):
        await bounded(leader)
    await upstream.wait_for_hits_async(2, "/slow")
    upstream.open_gate("slow")
    assert served(await bounded(follower)) == "leader"
    assert roles(debug_logs) == {"request served as leader": 2}
    assert any("re-electing" in m for m in messages(debug_logs))
    assert_nothing_secret(debug_logs)


async def test_the_role_is_set_on_the_callers_current_span(upstream, make_session):
    # A local provider and exporter: the process-wide providers are tests/test_observe.py's.
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test_aiohttp_observe")

    mw = SingleflightMiddleware(ttl=60)
    session = make_session(mw)
    url = upstream.url + "/span?gate=span"

    async def get(name: str, **kwargs) -> None:
        with tracer.start_as_current_span(name):
            await fetch(session, url, **kwargs)

    tasks = [asyncio.create_task(get(f"caller-{i}")) for i in range(3)]
    await wait_until(lambda: mw.stats.calls == 3, "3 callers")
    upstream.open_gate("span")
    await bounded(asyncio.gather(*tasks))
    await bounded(get("cached"))
    await bounded(get("bypass", method="POST"))
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    callers = sorted(spans[f"caller-{i}"]["singleflight.role"] for i in range(3))
    assert callers == ["follower", "follower", "leader"]
    assert spans["cached"]["singleflight.role"] == "cache"
    assert spans["bypass"]["singleflight.role"] == "bypass"
