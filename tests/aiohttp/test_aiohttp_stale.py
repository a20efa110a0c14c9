"""SingleflightMiddleware with stale_ttl= (issue 13) against a real loopback upstream.

The middleware's ttl cache runs on the test's clock: stored at 0, fresh until 10, stale
until 30. The upstream is gated with events, so a stale answer cannot have waited for it.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from singleflight._stale import StaleFront
from singleflight.aiohttp import SingleflightMiddleware, served
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


def front_of(mw: SingleflightMiddleware) -> StaleFront:
    front = mw.group._front
    assert isinstance(front, StaleFront)
    return front


def clocked(mw: SingleflightMiddleware) -> Clock:
    clock = Clock()
    front_of(mw)._timer = clock
    return clock


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def refreshed(mw: SingleflightMiddleware) -> None:
    front = front_of(mw)
    await until(lambda: not front.tasks and not front._refreshing)


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[str, str | None]:
    async with session.get(url, **kwargs) as r:
        return await r.text(), served(r)


def session_with(mw: SingleflightMiddleware) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(middlewares=(mw,))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"stale_ttl": 5}, ValueError, ["stale_ttl=", "needs ttl="]),
        ({"ttl": 5, "stale_ttl": -1}, ValueError, ["stale_ttl", "-1"]),
        ({"ttl": 5, "stale_ttl": "5"}, TypeError, ["stale_ttl", "'5'"]),
        ({"ttl": 5, "max_ttl": 9}, ValueError, ["max_ttl=", 'ttl="headers"']),
        ({"ttl": "headers", "stale_ttl": 5}, ValueError, ["stale_ttl=", "Cache-Control"]),
        ({"ttl": "Headers"}, TypeError, ["ttl", 'ttl="headers"']),
    ],
)
def test_bad_stale_options_fail_at_construction_naming_the_fix(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        SingleflightMiddleware(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


async def test_stale_answers_at_once_and_one_refresh_serves_a_burst(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        # The upstream is held: nobody here may wait for it.
        burst = await asyncio.wait_for(
            asyncio.gather(*[get(session, up.url) for _ in range(BURST)]), 5
        )
        assert set(burst) == {("v1", "stale")}
        await until(lambda: up.hits == 2)
        assert len(front_of(mw).tasks) == 1
        gate.set()
        await refreshed(mw)
        assert await get(session, up.url) == ("v2", "cache")
        assert up.hits == 2
    assert_idle(mw.group)


async def test_stale_if_error_then_the_error_after_the_window(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        up.answer = Answer(status=502, body="bad gateway")
        assert await get(session, up.url) == ("v1", "stale")
        await refreshed(mw)
        assert up.hits == 2
        clock.now = STALE + 2  # past the back-off
        up.answer = Answer(drop=True)
        assert await get(session, up.url) == ("v1", "stale")
        await refreshed(mw)
        assert up.hits == 3
        clock.now = EXPIRED
        with pytest.raises(aiohttp.ClientError):
            await get(session, up.url)
        up.answer = Answer(status=502, body="bad gateway")
        async with session.get(up.url) as r:
            assert (r.status, await r.text(), served(r)) == (502, "bad gateway", "leader")
        assert len(mw.group.cache or {}) == 0
    assert_idle(mw.group)


@pytest.mark.parametrize(
    "headers",
    [{"Cache-Control": "no-store"}, {"Set-Cookie": "session=someone"}],
)
async def test_a_refresh_that_may_not_be_kept_removes_the_entry(
    up: ScriptedUpstream, headers: dict[str, str]
) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    connector = aiohttp.TCPConnector()
    async with aiohttp.ClientSession(middlewares=(mw,), connector=connector) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        up.answer = Answer(headers=headers)
        assert await get(session, up.url) == ("v1", "stale")
        await refreshed(mw)
        assert len(mw.group.cache or {}) == 0
        assert not connector._acquired  # the refresh's response was closed or released
        assert await get(session, up.url) == ("v3", "leader")
    assert_idle(mw.group)


async def test_forget_during_a_refresh_wins(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        (key,) = list(mw.group.cache or {})
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(gate=gate)
        assert await get(session, up.url) == ("v1", "stale")
        await until(lambda: up.hits == 2)
        mw.group.forget(key)
        gate.set()
        await refreshed(mw)
        assert len(mw.group.cache or {}) == 0
        assert await get(session, up.url) == ("v3", "leader")
    assert_idle(mw.group)


async def test_each_credential_refreshes_with_its_own(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    up.answer = Answer(body="{hit}")
    users = ("Bearer alice", "Bearer bob")
    async with session_with(mw) as session:
        for user in users:
            await get(session, up.url, headers={"Authorization": user})
        clock.now = STALE
        for user in users:
            text, how = await get(session, up.url, headers={"Authorization": user})
            assert how == "stale" and up.seen[int(text) - 1]["authorization"] == user
        await refreshed(mw)
        assert up.hits == 4
        for user in users:
            text, how = await get(session, up.url, headers={"Authorization": user})
            assert how == "cache" and int(text) > 2
            assert up.seen[int(text) - 1]["authorization"] == user
    assert_idle(mw.group)


async def test_session_close_ends_a_refresh_in_flight(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    session = session_with(mw)
    assert await get(session, up.url) == ("v1", "leader")
    clock.now = STALE
    up.answer = Answer(gate=up.gate())
    assert await get(session, up.url) == ("v1", "stale")
    await until(lambda: up.hits == 2)
    (task,) = front_of(mw).tasks
    await session.close()  # its connector drops the connection the refresh reads from
    await refreshed(mw)
    assert task.done()
    assert_idle(mw.group)
    clock.now = STALE + 2  # a stale caller of a closed session starts nothing
    with pytest.raises(RuntimeError, match="Session is closed"):
        await get(session, up.url)
    assert not front_of(mw).tasks and up.hits == 2


async def test_group_close_cancels_a_refresh(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        up.answer = Answer(gate=up.gate())
        assert await get(session, up.url) == ("v1", "stale")
        await until(lambda: up.hits == 2)
        (task,) = front_of(mw).tasks
        mw.group.close()
        await refreshed(mw)
        assert task.cancelled()
        assert_idle(mw.group)


def test_a_refresh_cancelled_by_loop_shutdown_leaves_nothing(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    tasks: list[asyncio.Task[Any]] = []
    sessions: list[aiohttp.ClientSession] = []

    async def serve_stale_then_stop() -> None:
        session = session_with(mw)
        sessions.append(session)
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        up.answer = Answer(gate=up.gate())
        assert await get(session, up.url) == ("v1", "stale")
        await until(lambda: up.hits == 2)
        tasks.extend(front_of(mw).tasks)
        # Return with the refresh waiting upstream: asyncio.run cancels it.

    asyncio.run(serve_stale_then_stop())
    assert len(tasks) == 1 and tasks[0].cancelled()
    assert not front_of(mw).tasks and not front_of(mw)._refreshing
    assert_idle(mw.group)
    with warnings.catch_warnings():  # the session left open on purpose, with its loop gone
        warnings.simplefilter("ignore", ResourceWarning)
        sessions.clear()
        tasks.clear()  # the refresh task's frame held the request, and so the session
        gc.collect()


async def test_ttl_from_headers(up: ScriptedUpstream) -> None:
    mw = SingleflightMiddleware(ttl="headers", max_ttl=60)
    clock = clocked(mw)
    up.answer = Answer(headers={"Cache-Control": "max-age=10, stale-while-revalidate=20"})
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = 9.5
        assert await get(session, up.url) == ("v1", "cache")
        clock.now = STALE
        up.answer = Answer(headers={"Cache-Control": "s-maxage=60"})  # private cache: ignored
        assert await get(session, up.url) == ("v1", "stale")
        await refreshed(mw)
        assert len(mw.group.cache or {}) == 0  # the refresh had no max-age: nothing kept
        assert await get(session, up.url) == ("v3", "leader")
    assert_idle(mw.group)


async def test_a_caller_joining_a_refresh_answered_5xx_gets_that_response(
    up: ScriptedUpstream,
) -> None:
    mw = SingleflightMiddleware(ttl=T, stale_ttl=S)
    clock = clocked(mw)
    async with session_with(mw) as session:
        assert await get(session, up.url) == ("v1", "leader")
        clock.now = STALE
        gate = up.gate()
        up.answer = Answer(status=503, body="down", gate=gate)
        assert await get(session, up.url) == ("v1", "stale")
        await until(lambda: up.hits == 2)
        clock.now = EXPIRED
        late = asyncio.ensure_future(get(session, up.url))
        await until(lambda: mw.stats.followers == 1)
        gate.set()
        assert await late == ("down", "follower")
        await refreshed(mw)
        assert up.hits == 2 and len(mw.group.cache or {}) == 0
    assert_idle(mw.group)
