"""httpx transports with stale_ttl= (issue 13) against a real loopback upstream that counts hits.

The clock of the transport's ttl cache is the test's (``clocked``): a value stored at 0 is
fresh until 10, stale until 30. The upstream is gated with events: a stale answer that waited
for it could not arrive while the gate is closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from http_helpers import bounded, pool_is_idle, wait_until, wait_until_sync

from singleflight._stale import StaleFront
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport
from tests.core_helpers import assert_idle
from tests.stale_upstream import Answer, ScriptedUpstream, scripted_upstream

T, S = 10.0, 20.0
STALE, EXPIRED = 15.0, 31.0
BURST = 50


@pytest.fixture
def up() -> Iterator[ScriptedUpstream]:
    yield from scripted_upstream()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def front_of(transport: Any) -> StaleFront:
    front = transport.group._front
    assert isinstance(front, StaleFront)
    return front


def clocked(transport: Any) -> Clock:
    clock = Clock()
    front_of(transport)._timer = clock
    return clock


def role(r: httpx.Response) -> str:
    return str(r.extensions["singleflight"])


class Recording(httpx.AsyncBaseTransport):
    """The real HTTP transport, keeping every response it hands out (to check they close)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.responses: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.responses.append(response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def refreshed(transport: Any) -> None:
    front = front_of(transport)
    await wait_until(lambda: not front.tasks and not front._refreshing)


# -- construction -----------------------------------------------------------------------------

BAD = [
    ({"stale_ttl": 5}, ValueError, ["stale_ttl=", "needs ttl="]),
    ({"ttl": 5, "stale_ttl": -1}, ValueError, ["stale_ttl", "-1", ">= 0"]),
    ({"ttl": 5, "stale_ttl": float("inf")}, ValueError, ["stale_ttl", "inf"]),
    ({"ttl": 5, "stale_ttl": "30"}, TypeError, ["stale_ttl", "'30'", "stale_ttl=30.0"]),
    ({"ttl": 5, "stale_ttl": True}, TypeError, ["stale_ttl", "True"]),
    ({"ttl": 5, "max_ttl": 60}, ValueError, ["max_ttl=", 'ttl="headers"']),
    ({"max_ttl": 60}, ValueError, ["max_ttl=", 'ttl="headers"']),
    ({"ttl": "header"}, TypeError, ["ttl", "'header'", 'ttl="headers"']),
    ({"ttl": "headers", "stale_ttl": 5}, ValueError, ["stale_ttl=", "Cache-Control", "max_ttl="]),
    ({"ttl": "headers", "max_ttl": 0}, ValueError, ["max_ttl", "0", "max_ttl=None"]),
    ({"ttl": "headers", "max_ttl": "9"}, TypeError, ["max_ttl", "'9'", "max_ttl=300"]),
    ({"ttl": "headers", "cache": {}}, ValueError, ["cache=", 'ttl="headers"']),
    ({"ttl": 5, "stale_ttl": 5, "cache": {}}, ValueError, ["cache=", "ttl="]),
    ({"ttl": 5, "stale_ttl": 5, "maxsize": 0}, ValueError, ["maxsize", "0"]),
]


@pytest.mark.parametrize("factory", [AsyncSingleflightTransport, SingleflightTransport])
@pytest.mark.parametrize(("kwargs", "error", "words"), BAD)
def test_bad_stale_options_fail_at_construction_naming_the_fix(
    factory: Any, kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        factory(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_group_brings_its_own_cache_so_stale_ttl_with_group_is_refused() -> None:
    other = SingleflightTransport()
    with pytest.raises(ValueError, match="group= brings its own cache"):
        SingleflightTransport(ttl=5, stale_ttl=5, group=other.group)
    with pytest.raises(ValueError, match="group= brings its own cache"):
        SingleflightTransport(ttl="headers", group=other.group)
    other.close()


# -- async ------------------------------------------------------------------------------------


async def test_async_stale_answers_at_once_and_one_refresh_serves_a_burst(
    up: ScriptedUpstream,
) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        first = await client.get(up.url)
        assert (first.text, role(first)) == ("v1", "leader")
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        async with bounded(5):  # the upstream is held: nobody here may wait for it
            burst = await asyncio.gather(*[client.get(up.url) for _ in range(BURST)])
        assert {(r.text, role(r)) for r in burst} == {("v1", "stale")}
        await wait_until(lambda: up.hits == 2)
        assert len(front_of(transport).tasks) == 1  # one refresh for the whole burst
        gate.set()
        await refreshed(transport)
        after = await client.get(up.url)
        assert (after.text, role(after)) == ("v2", "cache")
        assert up.hits == 2
        assert transport.stats.leaders == 2  # the first call and the one refresh
    assert_idle(transport.group)


async def test_async_stale_if_error_then_the_error_after_the_window(
    up: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    caplog.set_level(logging.WARNING, logger="singleflight")
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(up.url)).text == "v1"
        clock.now = STALE
        up.answer = Answer(status=503, body="down")  # RFC 5861: an error, the stale one stays
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        assert up.hits == 2
        r = await client.get(up.url)  # within the back-off: no new refresh
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        assert up.hits == 2
        clock.now = STALE + 2  # past the back-off: the next stale caller tries again
        up.answer = Answer(drop=True)  # a transport error this time
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        assert up.hits == 3
        refresh_logs = [m for m in caplog.messages if m.startswith("refresh of")]
        assert len(refresh_logs) == 1, refresh_logs  # logged once per run of failures
        clock.now = EXPIRED  # the window is over: errors reach callers, never cached
        with pytest.raises(httpx.TransportError):
            await client.get(up.url)
        up.answer = Answer(status=503, body="down")
        r = await client.get(up.url)
        assert (r.status_code, r.text, role(r)) == (503, "down", "leader")
        assert up.hits == 5
        assert len(transport.group.cache or {}) == 0
    assert_idle(transport.group)


@pytest.mark.parametrize(
    "headers",
    [{"Cache-Control": "no-store"}, {"Cache-Control": "private, max-age=60"}],
)
async def test_async_a_refresh_answered_no_store_removes_the_entry(
    up: ScriptedUpstream, headers: dict[str, str]
) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(up.url)).text == "v1"
        clock.now = STALE
        up.answer = Answer(headers=headers)
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        assert len(transport.group.cache or {}) == 0
        r = await client.get(up.url)  # nothing stale left: a new flight
        assert (r.text, role(r)) == ("v3", "leader")
    assert_idle(transport.group)


async def test_async_an_unshareable_refresh_is_closed_and_removes_the_entry(
    up: ScriptedUpstream,
) -> None:
    inner = Recording()
    transport = AsyncSingleflightTransport(inner, ttl=T, stale_ttl=S)
    clock = clocked(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(up.url)).text == "v1"
        clock.now = STALE
        up.answer = Answer(headers={"Set-Cookie": "session=someone"})
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        assert len(inner.responses) == 2 and inner.responses[1].is_closed
        assert len(transport.group.cache or {}) == 0
        assert pool_is_idle(inner.inner)
    assert_idle(transport.group)


async def test_async_forget_during_a_refresh_wins(up: ScriptedUpstream) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(up.url)).text == "v1"
        (key,) = list(transport.group.cache or {})
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        assert role(await client.get(up.url)) == "stale"
        await wait_until(lambda: up.hits == 2)
        transport.group.forget(key)
        gate.set()
        await refreshed(transport)
        assert len(transport.group.cache or {}) == 0  # the refresh landed, and was not kept
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v3", "leader")
    assert_idle(transport.group)


async def test_async_each_credential_refreshes_with_its_own(up: ScriptedUpstream) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    up.answer = Answer(body="{hit}")
    users = ("Bearer alice", "Bearer bob")
    async with httpx.AsyncClient(transport=transport) as client:
        for user in users:
            await client.get(up.url, headers={"Authorization": user})
        clock.now = STALE
        for user in users:
            r = await client.get(up.url, headers={"Authorization": user})
            assert role(r) == "stale" and up.seen[int(r.text) - 1]["authorization"] == user
        await refreshed(transport)
        assert up.hits == 4
        for user in users:
            r = await client.get(up.url, headers={"Authorization": user})
            assert role(r) == "cache" and int(r.text) > 2
            assert up.seen[int(r.text) - 1]["authorization"] == user
    assert_idle(transport.group)


async def test_async_aclose_ends_a_refresh_in_flight(up: ScriptedUpstream) -> None:
    inner = httpx.AsyncHTTPTransport()
    transport = AsyncSingleflightTransport(inner, ttl=T, stale_ttl=S)
    clock = clocked(transport)
    client = httpx.AsyncClient(transport=transport)
    assert (await client.get(up.url)).text == "v1"
    clock.now = STALE
    up.answer = Answer(gate=up.gate())
    assert role(await client.get(up.url)) == "stale"
    await wait_until(lambda: up.hits == 2)
    (task,) = front_of(transport).tasks
    async with bounded(5):
        await client.aclose()
    assert task.done() and not front_of(transport).tasks
    assert not front_of(transport)._refreshing
    assert pool_is_idle(inner)
    assert_idle(transport.group)


def test_async_a_refresh_cancelled_by_loop_shutdown_leaves_nothing(up: ScriptedUpstream) -> None:
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    tasks: list[asyncio.Task[Any]] = []

    async def serve_stale_then_stop() -> None:
        client = httpx.AsyncClient(transport=transport)
        assert (await client.get(up.url)).text == "v1"
        clock.now = STALE
        up.answer = Answer(gate=up.gate())
        assert role(await client.get(up.url)) == "stale"
        await wait_until(lambda: up.hits == 2)
        tasks.extend(front_of(transport).tasks)
        # Return with the refresh still waiting upstream: asyncio.run cancels it.

    asyncio.run(serve_stale_then_stop())
    assert len(tasks) == 1 and tasks[0].cancelled()
    front = front_of(transport)
    assert not front.tasks and not front._refreshing
    assert_idle(transport.group)
    assert [t for t in threading.enumerate() if t.name.startswith("singleflight-refresh")] == []


# -- sync (threads) ---------------------------------------------------------------------------


def refresh_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("singleflight-refresh")]


def refreshed_sync(transport: Any) -> None:
    front = front_of(transport)
    wait_until_sync(lambda: not front._refreshing)


def test_sync_stale_answers_at_once_and_one_refresh_serves_a_burst(up: ScriptedUpstream) -> None:
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    with httpx.Client(transport=transport) as client:
        first = client.get(up.url)
        assert (first.text, role(first)) == ("v1", "leader")
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        with ThreadPoolExecutor(BURST) as pool:
            futures = [pool.submit(client.get, up.url) for _ in range(BURST)]
            burst = [f.result(timeout=5) for f in futures]  # the upstream is held meanwhile
        assert {(r.text, role(r)) for r in burst} == {("v1", "stale")}
        up.wait_for_hits(2)
        assert len(refresh_threads()) == 1
        gate.set()
        refreshed_sync(transport)
        after = client.get(up.url)
        assert (after.text, role(after)) == ("v2", "cache")
        assert up.hits == 2
    assert refresh_threads() == []  # closed with the transport
    assert_idle(transport.group)


def test_sync_stale_if_error_then_the_error_after_the_window(up: ScriptedUpstream) -> None:
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    with httpx.Client(transport=transport) as client:
        assert client.get(up.url).text == "v1"
        clock.now = STALE
        up.answer = Answer(status=503, body="down")
        r = client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        refreshed_sync(transport)
        assert up.hits == 2
        clock.now = STALE + 2
        up.answer = Answer(drop=True)
        assert client.get(up.url).text == "v1"
        refreshed_sync(transport)
        assert up.hits == 3
        clock.now = EXPIRED
        with pytest.raises(httpx.TransportError):
            client.get(up.url)
        up.answer = Answer(status=503, body="down")
        r = client.get(up.url)
        assert (r.status_code, role(r)) == (503, "leader")
        assert len(transport.group.cache or {}) == 0
    assert_idle(transport.group)


def test_sync_a_refresh_answered_no_store_removes_the_entry(up: ScriptedUpstream) -> None:
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    with httpx.Client(transport=transport) as client:
        assert client.get(up.url).text == "v1"
        clock.now = STALE
        up.answer = Answer(headers={"Cache-Control": "no-store"})
        assert role(client.get(up.url)) == "stale"
        refreshed_sync(transport)
        assert len(transport.group.cache or {}) == 0
        r = client.get(up.url)
        assert (r.text, role(r)) == ("v3", "leader")
    assert_idle(transport.group)


def test_sync_forget_during_a_refresh_wins(up: ScriptedUpstream) -> None:
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    with httpx.Client(transport=transport) as client:
        assert client.get(up.url).text == "v1"
        (key,) = list(transport.group.cache or {})
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        assert role(client.get(up.url)) == "stale"
        up.wait_for_hits(2)
        transport.group.cache_pop(key)
        gate.set()
        refreshed_sync(transport)
        assert len(transport.group.cache or {}) == 0
        r = client.get(up.url)
        assert (r.text, role(r)) == ("v3", "leader")
    assert_idle(transport.group)


def test_sync_close_ends_the_refresh_threads(up: ScriptedUpstream) -> None:
    """close() returns at once; the refresh it interrupts ends within its own read timeout."""
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    client = httpx.Client(transport=transport, timeout=0.5)
    assert client.get(up.url).text == "v1"
    clock.now = STALE
    up.answer = Answer(gate=up.gate())
    assert role(client.get(up.url)) == "stale"
    up.wait_for_hits(2)
    assert len(refresh_threads()) == 1
    with ThreadPoolExecutor(1) as pool:
        pool.submit(client.close).result(timeout=2)  # never waits for the upstream
    wait_until_sync(lambda: refresh_threads() == [])
    assert not front_of(transport)._refreshing
    assert up.hits == 2
    assert_idle(transport.group)


# -- ttl="headers" ----------------------------------------------------------------------------


async def test_async_ttl_from_headers(up: ScriptedUpstream) -> None:
    """max-age and stale-while-revalidate set each response's times; no max-age: not kept."""
    transport = AsyncSingleflightTransport(ttl="headers")
    clock = clocked(transport)
    up.answer = Answer(headers={"Cache-Control": "max-age=10, stale-while-revalidate=20"})
    async with httpx.AsyncClient(transport=transport) as client:
        assert role(await client.get(up.url)) == "leader"
        clock.now = 9.5
        assert role(await client.get(up.url)) == "cache"
        clock.now = STALE
        up.answer = Answer(headers={"Cache-Control": "max-age=10, must-revalidate"})
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v1", "stale")
        await refreshed(transport)
        clock.now = STALE + 9.5  # the refresh (at 15) is fresh for 10 s...
        assert (await client.get(up.url)).text == "v2"
        clock.now = STALE + 10.5  # ...and must-revalidate: never stale
        up.answer = Answer(headers={"Cache-Control": "public"})  # no max-age
        r = await client.get(up.url)
        assert (r.text, role(r)) == ("v3", "leader")
        assert len(transport.group.cache or {}) == 0
        assert up.hits == 3
    assert_idle(transport.group)


def test_sync_ttl_from_headers_is_capped_by_max_ttl(up: ScriptedUpstream) -> None:
    transport = SingleflightTransport(ttl="headers", max_ttl=10)
    clock = clocked(transport)
    up.answer = Answer(headers={"Cache-Control": "max-age=3600, stale-if-error=86400"})
    with httpx.Client(transport=transport) as client:
        assert role(client.get(up.url)) == "leader"
        clock.now = 9.5
        assert role(client.get(up.url)) == "cache"
        clock.now = 19.5  # capped at 10 fresh + 10 stale
        assert role(client.get(up.url)) == "stale"
        refreshed_sync(transport)
        clock.now = 29.5 + 10.5  # the refresh (at 19.5) is past both capped windows
        r = client.get(up.url)
        assert (r.text, role(r)) == ("v3", "leader")
    assert_idle(transport.group)


# -- trio -------------------------------------------------------------------------------------


def test_trio_stale_answers_at_once_and_the_refresh_lands(up: ScriptedUpstream) -> None:
    """On trio the refresh is a system task of the run; it ends with the run at the latest."""
    trio = pytest.importorskip("trio")
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    front = front_of(transport)

    async def main() -> None:
        with trio.fail_after(10):
            async with httpx.AsyncClient(transport=transport) as client:
                assert (await client.get(up.url)).text == "v1"
                clock.now = STALE
                gate = up.gate()
                up.answer = Answer(gate=gate)
                with trio.fail_after(5):  # the upstream is held
                    for _ in range(5):
                        r = await client.get(up.url)
                        assert (r.text, role(r)) == ("v1", "stale")
                await wait_until(lambda: up.hits == 2)
                gate.set()
                await wait_until(lambda: not front._refreshing)
                r = await client.get(up.url)
                assert (r.text, role(r)) == ("v2", "cache")
                # A second refresh left running when the run ends is cancelled with it.
                clock.now = STALE + T + 1
                up.answer = Answer(gate=up.gate())
                assert role(await client.get(up.url)) == "stale"
                await wait_until(lambda: up.hits == 3)

    trio.run(main)
    assert up.hits == 3 and not front._refreshing
    assert_idle(transport.group)


async def test_async_a_caller_joining_a_refresh_answered_5xx_gets_that_response(
    up: ScriptedUpstream,
) -> None:
    """Past T+S a caller may join the refresh still in flight: it gets its 503, not an error."""
    transport = AsyncSingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(up.url)).text == "v1"
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(status=503, body="down", gate=gate)
        assert role(await client.get(up.url)) == "stale"
        await wait_until(lambda: up.hits == 2)
        clock.now = EXPIRED
        late = asyncio.ensure_future(client.get(up.url))
        await wait_until(lambda: transport.stats.followers == 1)
        gate.set()
        r = await late
        assert (r.status_code, r.text, role(r)) == (503, "down", "follower")
        await refreshed(transport)
        assert up.hits == 2 and len(transport.group.cache or {}) == 0
    assert_idle(transport.group)


def test_sync_a_caller_joining_a_refresh_answered_5xx_gets_that_response(
    up: ScriptedUpstream,
) -> None:
    transport = SingleflightTransport(ttl=T, stale_ttl=S)
    clock = clocked(transport)
    with httpx.Client(transport=transport) as client, ThreadPoolExecutor(1) as pool:
        assert client.get(up.url).text == "v1"
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(status=503, body="down", gate=gate)
        assert role(client.get(up.url)) == "stale"
        up.wait_for_hits(2)
        clock.now = EXPIRED
        late = pool.submit(client.get, up.url)
        wait_until_sync(lambda: transport.stats.followers == 1)
        gate.set()
        r = late.result(timeout=10)
        assert (r.status_code, r.text, role(r)) == (503, "down", "follower")
        refreshed_sync(transport)
        assert up.hits == 2
    assert_idle(transport.group)
