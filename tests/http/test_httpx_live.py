"""Live streams: a body of unknown length reaches the leader and every follower as it arrives.

Against a real loopback server streaming NDJSON (chunked, one line every ``gap`` seconds): one
upstream request, each caller its own response that replays what arrived and follows the rest
at its own pace; errors reach each reader where it reads; the last reader to leave closes the
upstream; late joiners replay from byte 0 while the body is within ``max_body_size``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from http_helpers import bounded, pool_is_idle, wait_until, wait_until_sync

from singleflight._http.live import live_of
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

pytestmark = pytest.mark.timeout(60)


class NDJSONUpstream:
    """An aiohttp server in its own thread: ``/s?n=&gap=&fail_after=&pad=`` streams NDJSON."""

    def __init__(self) -> None:
        self.hits = 0
        self.finished = 0  # streams written to the end
        self.aborted = 0  # streams whose client went away
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        n = int(request.query.get("n", "5"))
        gap = float(request.query.get("gap", "0.3"))
        fail_after = int(request.query.get("fail_after", "-1"))
        pad = int(request.query.get("pad", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for i in range(n):
                if i == fail_after:
                    assert request.transport is not None
                    request.transport.abort()  # mid-body: the connection breaks
                    return resp
                line = json.dumps({"i": i, "hit": self.hits, "pad": "x" * pad}) + "\n"
                await resp.write(line.encode())
                if i < n - 1:
                    await asyncio.sleep(gap)
            await resp.write_eof()
            self.finished += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        return resp

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._stream)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> NDJSONUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def nd() -> Iterator[NDJSONUpstream]:
    with NDJSONUpstream() as server:
        yield server


_paths = iter(range(10**6))


def path(query: str) -> str:
    return f"/s{next(_paths)}?{query}"


async def first_line_async(client: httpx.AsyncClient, url: str) -> tuple[float, list[Any], str]:
    """Seconds from send to the first line, every line, and the role."""
    started = time.monotonic()
    first = 0.0
    lines: list[Any] = []
    async with client.stream("GET", url) as r:
        async for line in r.aiter_lines():
            if not lines:
                first = time.monotonic() - started
            lines.append(json.loads(line))
        role = str(r.extensions.get("singleflight"))
    return first, lines, role


def first_line_sync(client: httpx.Client, url: str) -> tuple[float, list[Any], str]:
    started = time.monotonic()
    first = 0.0
    lines: list[Any] = []
    with client.stream("GET", url) as r:
        for line in r.iter_lines():
            if not lines:
                first = time.monotonic() - started
            lines.append(json.loads(line))
        role = str(r.extensions.get("singleflight"))
    return first, lines, role


async def test_first_line_reaches_5_async_callers_as_soon_as_the_plain_clients(nd):
    query = "n=6&gap=0.3"
    async with httpx.AsyncClient(timeout=10) as plain:
        plain_first, plain_lines, _ = await first_line_async(plain, nd.url + path(query))
    t = AsyncSingleflightTransport()
    url = nd.url + path(query)
    hits = nd.hits
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        results = await asyncio.gather(*[first_line_async(c, url) for _ in range(5)])
        assert pool_is_idle(t.inner)
        assert live_of(t.group, t._policy.key(c.build_request("GET", url))) is None
    assert nd.hits == hits + 1  # one upstream request
    for first, lines, _ in results:
        assert first <= plain_first + 0.1, (first, plain_first)  # live, not after 1.5 s
        assert [x["i"] for x in lines] == [x["i"] for x in plain_lines]
    assert sorted(r for *_, r in results) == ["follower"] * 4 + ["leader"]
    assert t.group.in_flight == 0


def test_first_line_reaches_5_threads_as_soon_as_the_plain_clients(nd):
    query = "n=6&gap=0.3"
    with httpx.Client(timeout=10) as plain:
        plain_first, plain_lines, _ = first_line_sync(plain, nd.url + path(query))
    t = SingleflightTransport()
    url = nd.url + path(query)
    hits = nd.hits
    results: list[Any] = []
    with httpx.Client(transport=t, timeout=10) as c:
        threads = [
            threading.Thread(target=lambda: results.append(first_line_sync(c, url)))
            for _ in range(5)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert pool_is_idle(t.inner)
    assert nd.hits == hits + 1
    assert len(results) == 5
    for first, lines, _ in results:
        assert first <= plain_first + 0.1, (first, plain_first)
        assert [x["i"] for x in lines] == [x["i"] for x in plain_lines]
    assert sorted(r for *_, r in results) == ["follower"] * 4 + ["leader"]


async def test_a_slow_reader_never_stalls_the_others(nd):
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=5&gap=0.1")
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:

        async def slow() -> list[Any]:
            out = []
            async with c.stream("GET", url) as r:
                async for line in r.aiter_lines():
                    out.append(json.loads(line))
                    await asyncio.sleep(0.4)  # far slower than the upstream
            return out

        slow_task = asyncio.ensure_future(slow())
        await wait_until(lambda: t.stats.leaders == 1)
        started = time.monotonic()
        fast_first, fast_lines, role = await first_line_async(c, url)
        fast_done = time.monotonic() - started
        assert role == "follower" and len(fast_lines) == 5
        assert fast_done < 1.0  # the stream's own pace (0.4 s), not the slow reader's (2 s)
        assert not slow_task.done()
        assert len(await slow_task) == 5


async def test_a_reader_that_leaves_leaves_the_others_streaming_and_the_last_closes_upstream(nd):
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=50&gap=0.05")
    aborted = nd.aborted
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        quitter = await c.send(c.build_request("GET", url), stream=True)
        stayer = await c.send(c.build_request("GET", url), stream=True)
        assert quitter.extensions["singleflight"] == "leader"
        assert stayer.extensions["singleflight"] == "follower"
        lines = quitter.aiter_lines()
        assert json.loads(await lines.__anext__())["i"] == 0
        await quitter.aclose()  # leaves early
        got = [json.loads(line)["i"] async for line in stayer.aiter_lines()]
        assert got == list(range(50))  # the other one streamed to the end
        await stayer.aclose()
        # And when the last reader leaves early, the upstream is closed.
        again = nd.url + path("n=50&gap=0.05")
        first = await c.send(c.build_request("GET", again), stream=True)
        await first.aiter_lines().__anext__()
        await first.aclose()
        await wait_until(lambda: nd.aborted == aborted + 1)
        await wait_until(lambda: pool_is_idle(t.inner))
        assert live_of(t.group, t._policy.key(first.request)) is None


async def test_an_error_mid_body_reaches_each_reader_where_it_reads(nd):
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=5&gap=0.1&fail_after=2")
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:

        async def read() -> tuple[int, list[int], BaseException | None, str]:
            seen: list[int] = []
            async with c.stream("GET", url) as r:
                status, role = r.status_code, r.extensions["singleflight"]
                try:
                    async for line in r.aiter_lines():
                        seen.append(json.loads(line)["i"])
                except httpx.HTTPError as exc:
                    return status, seen, exc, role
            return status, seen, None, role

        results = await asyncio.gather(*[read() for _ in range(3)])
    errors = [exc for _, _, exc, _ in results]
    for status, seen, exc, _ in results:
        assert status == 200 and seen == [0, 1]  # headers and the lines that came, then...
        assert isinstance(exc, httpx.RemoteProtocolError)  # ...the error, at read time
    assert len({id(e) for e in errors}) == 3  # each reader its own exception object
    assert len({id(e.request) for e in errors if e is not None}) == 3  # bound to its own request


async def test_late_joiners_replay_from_byte_0_within_max_body_size_then_go_alone(nd):
    t = AsyncSingleflightTransport(max_body_size=200)
    url = nd.url + path("n=8&gap=0.15&pad=40")  # each line ~70 bytes
    hits = nd.hits
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        early = await c.send(c.build_request("GET", url), stream=True)
        lines = early.aiter_lines()
        await lines.__anext__()  # ~70 bytes in: still admitting
        late = await c.send(c.build_request("GET", url), stream=True)
        assert late.extensions["singleflight"] == "follower"
        assert [json.loads(x)["i"] async for x in late.aiter_lines()] == list(range(8))
        await late.aclose()
        # Past 200 bytes a new caller makes its own request; the early one keeps streaming.
        assert nd.hits == hits + 1
        alone = await c.get(url)
        assert alone.extensions["singleflight"] == "leader" and nd.hits == hits + 2
        assert [json.loads(x)["i"] async for x in lines] == list(range(1, 8))
        await early.aclose()


async def test_a_complete_streamed_body_is_cached(nd):
    t = AsyncSingleflightTransport(ttl=60)
    url = nd.url + path("n=3&gap=0.05")
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        first = await c.get(url)
        again = await c.get(url)
    assert first.extensions["singleflight"] == "leader"
    assert again.extensions["singleflight"] == "cache" and again.content == first.content


async def test_a_followers_own_read_timeout_while_the_stream_is_silent(nd):
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=3&gap=0.6")
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        patient = asyncio.ensure_future(first_line_async(c, url))
        await wait_until(lambda: t.stats.leaders == 1)
        with pytest.raises(httpx.ReadTimeout):
            await c.get(url, timeout=httpx.Timeout(10, read=0.3))
        _, lines, _ = await patient
        assert len(lines) == 3  # the others keep streaming


def test_sync_reader_leaving_early_and_errors(nd):
    t = SingleflightTransport()
    url = nd.url + path("n=5&gap=0.1&fail_after=3")
    out: dict[str, Any] = {}
    with httpx.Client(transport=t, timeout=10) as c:

        def read(name: str) -> None:
            seen: list[int] = []
            try:
                with c.stream("GET", url) as r:
                    for line in r.iter_lines():
                        seen.append(json.loads(line)["i"])
            except httpx.HTTPError as exc:
                out[name] = (seen, exc)

        threads = [threading.Thread(target=read, args=(f"t{i}",)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        wait_until_sync(lambda: pool_is_idle(t.inner))
    assert len(out) == 3
    for seen, exc in out.values():
        assert seen == [0, 1, 2] and isinstance(exc, httpx.RemoteProtocolError)


async def test_a_reader_cancelled_while_waiting_leaves_the_others_whole(nd):
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=6&gap=0.15")
    async with bounded(20), httpx.AsyncClient(transport=t, timeout=10) as c:
        got_one = asyncio.Event()

        async def reader_to_cancel() -> None:
            async with c.stream("GET", url) as r:
                async for _line in r.aiter_lines():
                    got_one.set()

        victim = asyncio.ensure_future(reader_to_cancel())
        await wait_until(lambda: t.stats.leaders == 1)
        other = asyncio.ensure_future(first_line_async(c, url))
        await got_one.wait()
        victim.cancel()  # blocked waiting for the next chunk: the pull goes on for the others
        await asyncio.gather(victim, return_exceptions=True)
        _, lines, role = await other
        assert role == "follower" and [x["i"] for x in lines] == list(range(6))
        await wait_until(lambda: pool_is_idle(t.inner))


async def test_an_async_live_flight_and_a_sync_caller_of_the_same_key(nd):
    # The sync transport shares the group (the same default sender) but cannot read a body
    # pulled on an event loop: it makes its own request, and gets every line.
    a = AsyncSingleflightTransport()
    s = SingleflightTransport(group=a.group)
    url = nd.url + path("n=4&gap=0.15")
    hits = nd.hits
    async with bounded(20), httpx.AsyncClient(transport=a, timeout=10) as c:
        leader = asyncio.ensure_future(first_line_async(c, url))
        key = a._policy.key(c.build_request("GET", url))
        await wait_until(lambda: live_of(a.group, key) is not None)  # streaming now
        with httpx.Client(transport=s, timeout=10) as sc:
            _, lines, role = await asyncio.to_thread(first_line_sync, sc, url)
        assert role == "leader" and [x["i"] for x in lines] == list(range(4))
        _, lines, _ = await leader
        assert [x["i"] for x in lines] == list(range(4))
    assert nd.hits == hits + 2


async def test_a_sync_client_called_inside_a_running_loop_streams_with_threads(nd):
    # A sync client used (blocking) from a coroutine: its thread runs a loop, yet it reads
    # as threads do; the body is read whole, every line, and its upstream goes back.
    t = SingleflightTransport()
    url = nd.url + path("n=3&gap=0.05")
    with httpx.Client(transport=t, timeout=10) as c:
        _, lines, role = first_line_sync(c, url)  # blocking, on purpose
        assert role == "leader" and [x["i"] for x in lines] == [0, 1, 2]
        assert pool_is_idle(t.inner)


# Breaking out of aiter_lines() on trio leaves httpx's generator chain to the GC, which trio
# reports (a plain client does the same); the responses themselves are closed by the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_trio_first_line_reaches_5_callers_live_and_a_quitter_closes_nothing_else(nd):
    trio = pytest.importorskip("trio")
    t = AsyncSingleflightTransport()
    url = nd.url + path("n=6&gap=0.3")
    hits = nd.hits
    results: list[Any] = []

    async def main() -> None:
        with trio.fail_after(20):
            async with httpx.AsyncClient(transport=t, timeout=10) as c:

                async def one() -> None:
                    results.append(await first_line_async(c, url))

                async def quitter() -> None:
                    async with c.stream("GET", url) as r:
                        async for _line in r.aiter_lines():
                            break  # leaves after one line

                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(one)
                    nursery.start_soon(quitter)
                assert pool_is_idle(t.inner)

    trio.run(main)
    assert nd.hits == hits + 1
    for first, lines, _ in results:
        assert first < 0.25  # live: the first line, not the whole 1.5 s body
        assert [x["i"] for x in lines] == list(range(6))


# Breaking out of aiter_lines() on trio leaves httpx's generator chain to the GC, which trio
# reports (a plain client does the same); the responses themselves are closed by the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_trio_last_reader_leaving_closes_the_upstream_and_a_reader_times_out_alone(nd):
    trio = pytest.importorskip("trio")
    t = AsyncSingleflightTransport()
    aborted = nd.aborted

    async def main() -> None:
        with trio.fail_after(20):
            async with httpx.AsyncClient(transport=t, timeout=10) as c:
                url = nd.url + path("n=50&gap=0.05")
                r = await c.send(c.build_request("GET", url), stream=True)
                await r.aiter_lines().__anext__()
                await r.aclose()
                while nd.aborted != aborted + 1:
                    await trio.sleep(0.01)
                slow = nd.url + path("n=3&gap=0.6")
                got: list[Any] = []

                async def patient() -> None:
                    got.append(await first_line_async(c, slow))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(patient)
                    while t.stats.leaders < 2:
                        await trio.sleep(0.01)
                    with pytest.raises(httpx.ReadTimeout):
                        await c.get(slow, timeout=httpx.Timeout(10, read=0.3))
                assert [x["i"] for x in got[0][1]] == [0, 1, 2]
                while not pool_is_idle(t.inner):
                    await trio.sleep(0.01)

    trio.run(main)
