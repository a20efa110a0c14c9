"""Observability of the httpx transports: one debug record per request, bypasses in stats.

Every request is noted once on the "singleflight" logger (and on OpenTelemetry, when it is
installed): how it was served, or why it went straight through. No record ever holds a header
value or a body. OpenTelemetry's global providers belong to tests/test_observe.py: the span
test here uses a local TracerProvider of its own, never the global one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter

import httpx
import pytest
from http_helpers import bounded, wait_until, wait_until_sync

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

pytestmark = pytest.mark.timeout(60)

SECRETS = ("tok_alice_6f1d", "sid=tok_cookie_91ab", "tok_apikey_c3e2", "tok_userinfo_7d0e")
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


async def test_leader_follower_and_cache_hit_each_noted_once(upstream, debug_logs):
    # The upstream's JSON body echoes the credentials: neither they nor the body may be logged.
    t = AsyncSingleflightTransport(ttl=60)
    url = "/obs?gate=obs"
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        tasks = [asyncio.ensure_future(c.get(url, headers=HEADERS)) for _ in range(5)]
        await wait_until(lambda: t.stats.calls == 5)
        upstream.open_gate("obs")
        bodies = {r.json()["who"]["x-api-key"] for r in await asyncio.gather(*tasks)}
        assert bodies == {SECRETS[2]}
        assert (await c.get(url, headers=HEADERS)).extensions["singleflight"] == "cache"
    assert roles(debug_logs) == {
        "request served as leader": 1,
        "request served as follower": 4,
        "request served as cache": 1,
    }
    assert sum("landed: 1 leader, 4 follower(s)" in m for m in messages(debug_logs)) == 1
    assert t.stats.bypasses == 0
    assert_nothing_secret(debug_logs)


async def test_url_userinfo_never_reaches_a_record(upstream, debug_logs):
    t = AsyncSingleflightTransport()
    url = upstream.url.replace("http://", f"http://user:{SECRETS[3]}@") + "/userinfo?gate=ui"
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
        tasks = [asyncio.ensure_future(c.get(url)) for _ in range(3)]
        await wait_until(lambda: t.stats.calls == 3)
        upstream.open_gate("ui")
        await asyncio.gather(*tasks)
    assert upstream.hits("/userinfo") == 1 and len(messages(debug_logs)) == 4
    assert_nothing_secret(debug_logs)


@pytest.mark.parametrize(
    ("reason", "request_kwargs", "options"),
    [
        ("method", {"method": "POST"}, {}),
        ("body", {"content": BODY_MARK.encode()}, {}),
        ("upgrade", {"headers": {"Upgrade": "websocket"}}, {}),
        ("event-stream", {"headers": {"Accept": "text/event-stream"}}, {}),
        ("opt-out", {"extensions": {"singleflight": False}}, {}),
        ("key", {}, {"key": lambda request: None}),
    ],
)
async def test_each_bypass_is_noted_with_its_reason_and_counted(
    upstream, debug_logs, reason, request_kwargs, options
):
    t = AsyncSingleflightTransport(**options)
    kwargs = {"method": "GET", **request_kwargs}
    kwargs["headers"] = {**HEADERS, **kwargs.get("headers", {})}
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        for _ in range(3):
            r = await c.request(url="/bypass", **kwargs)
            assert r.status_code == 200 and "singleflight" not in r.extensions
    assert messages(debug_logs) == [f"request bypassed: {reason}"] * 3
    assert t.stats.bypasses == 3 and t.stats.calls == 0
    assert_nothing_secret(debug_logs)


async def test_a_reentrant_request_is_noted_as_a_bypass(upstream, debug_logs):
    class Nested(httpx.AsyncBaseTransport):
        """Like an auth flow: sends the same request once more from inside the flight."""

        def __init__(self) -> None:
            self.real = httpx.AsyncHTTPTransport()
            self.nested = False

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if not self.nested:
                self.nested = True
                inner = await outer.handle_async_request(request)
                await inner.aread()
                await inner.aclose()
            return await self.real.handle_async_request(request)

        async def aclose(self) -> None:
            await self.real.aclose()

    outer = AsyncSingleflightTransport(Nested())
    async with bounded(10), httpx.AsyncClient(transport=outer, base_url=upstream.url) as c:
        assert (await c.get("/nested", headers=HEADERS)).status_code == 200
    assert messages(debug_logs) == ["request bypassed: reentrant", "request served as leader"]
    assert outer.stats.bypasses == 1 and outer.stats.leaders == 1


async def test_errors_timeouts_and_reelections_are_noted_without_values(upstream, debug_logs):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        # A shared transport error: the leader and both followers are noted once each.
        tasks = [
            asyncio.ensure_future(c.get("/err?reset=10&gate=err", headers=HEADERS))
            for _ in range(3)
        ]
        await wait_until(lambda: t.stats.calls == 3)
        upstream.open_gate("err")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, httpx.RemoteProtocolError) for e in results)
        assert roles(debug_logs) == {"request served as leader": 1, "request served as follower": 2}

        # The leader's own timeout re-elects; the re-election is logged by the core.
        debug_logs.clear()
        leader = asyncio.ensure_future(c.get("/slow?gate=slow", headers=HEADERS, timeout=0.2))
        await upstream.wait_for_hits_async(1, "/slow")
        follower = asyncio.ensure_future(c.get("/slow?gate=slow", headers=HEADERS, timeout=5))
        await wait_until(lambda: t.stats.followers >= 3)
        with pytest.raises(httpx.ReadTimeout):
            await leader
        await upstream.wait_for_hits_async(2, "/slow")
        upstream.open_gate("slow")
        assert (await follower).extensions["singleflight"] == "leader"
    assert roles(debug_logs) == {"request served as leader": 2}
    assert any("re-electing" in m and "ReadTimeout" in m for m in messages(debug_logs))
    assert_nothing_secret(debug_logs)


def test_sync_transport_notes_every_request_from_threads(upstream, debug_logs):
    t = SingleflightTransport(ttl=60)
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: results.append(c.get("/st?gate=st", headers=HEADERS)))
            for _ in range(4)
        ]
        for th in threads:
            th.start()
        wait_until_sync(lambda: t.stats.calls == 4)
        upstream.open_gate("st")
        for th in threads:
            th.join(timeout=10)
        assert len(results) == 4
        c.get("/st?gate=st", headers=HEADERS)  # the cache
        c.post("/st", headers=HEADERS)  # a bypass
    assert roles(debug_logs) == {
        "request served as leader": 1,
        "request served as follower": 3,
        "request served as cache": 1,
        "request bypassed: method": 1,
    }
    assert t.stats.bypasses == 1 and t.stats.calls == 5
    assert_nothing_secret(debug_logs)


async def test_the_role_is_set_on_the_callers_current_span(upstream):
    # A local provider and exporter: the process-wide providers are tests/test_observe.py's.
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test_httpx_observe")

    t = AsyncSingleflightTransport(ttl=60)

    async def get(name: str, **kwargs: object) -> None:
        with tracer.start_as_current_span(name):
            await c.get("/span?gate=span", **kwargs)  # type: ignore[arg-type]

    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        tasks = [asyncio.ensure_future(get(f"caller-{i}")) for i in range(3)]
        await wait_until(lambda: t.stats.calls == 3)
        upstream.open_gate("span")
        await asyncio.gather(*tasks)
        await get("cached")
        with tracer.start_as_current_span("bypass"):
            await c.post("/span")
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    callers = sorted(spans[f"caller-{i}"]["singleflight.role"] for i in range(3))
    assert callers == ["follower", "follower", "leader"]
    assert spans["cached"]["singleflight.role"] == "cache"
    assert spans["bypass"]["singleflight.role"] == "bypass"
