"""Live bodies: a lone caller keeps aiohttp's own response; a flight's callers share the stream.

Against a real aiohttp.web server streaming NDJSON (chunked, one line at a time, as a watch or a
log tail does).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from _aiohttp_servers import serve
from _aiohttp_support import bounded, joined, wait_until
from aiohttp import web
from aiohttp.streams import StreamReader

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


class Stream:
    """``/watch?lines=N&every=S``: N NDJSON lines (0: endless), S seconds apart; after the first
    line it waits for gate ``hold`` if set. Counts hits; notes when a client went away."""

    def __init__(self) -> None:
        self.hits = 0
        self.gone = asyncio.Event()
        self.hold = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/watch", self.watch)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        lines = int(request.query.get("lines", "0"))
        every = float(request.query.get("every", "0.05"))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        i = 0
        try:
            while lines == 0 or i < lines:
                await resp.write(json.dumps({"n": i}).encode() + b"\n")
                if i == 0 and "hold" in request.query:
                    await asyncio.wait_for(self.hold.wait(), 30)
                i += 1
                await asyncio.sleep(every)
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError, asyncio.CancelledError):
            self.gone.set()  # the client went away: nothing more to send
            return resp
        return resp


async def _first_line(
    session: aiohttp.ClientSession, url: str
) -> tuple[float, aiohttp.ClientResponse]:
    start = time.perf_counter()
    resp = await session.get(url)
    line = await resp.content.readline()
    assert json.loads(line) == {"n": 0}
    return time.perf_counter() - start, resp


async def test_a_long_ndjson_stream_reaches_five_callers_live_through_one_request():
    up = Stream()
    async with serve(up.app) as base:
        url = base + "/watch?lines=0&every=0.05"  # endless
        async with aiohttp.ClientSession() as plain:
            plain_latency, resp = await bounded(_first_line(plain, url))
            resp.close()
        await bounded(up.gone.wait())
        up.hits, up.gone = 0, asyncio.Event()
        mw = SingleflightMiddleware()
        async with aiohttp.ClientSession(middlewares=(mw,)) as session:
            results = await bounded(asyncio.gather(*(_first_line(session, url) for _ in range(5))))
            latencies = [t for t, _ in results]
            responses = [r for _, r in results]
            assert up.hits == 1  # one upstream request for the five
            assert sorted(served(r) for r in responses) == ["follower"] * 4 + ["leader"]
            assert max(latencies) < plain_latency + 0.1, (plain_latency, latencies)
            # Each reads on at its own pace: the next lines reach every one of them.
            for r in responses:
                assert json.loads(await bounded(r.content.readline())) == {"n": 1}
            # One leaves; the others keep streaming.
            responses[0].close()
            for r in responses[1:]:
                assert json.loads(await bounded(r.content.readline())) == {"n": 2}
            assert not up.gone.is_set()
            for r in responses[1:]:
                r.close()
            await bounded(up.gone.wait())  # the last one out closed the upstream request
        assert not mw._live and not mw._waiting and mw.group.in_flight == 0


async def test_a_lone_caller_gets_aiohttps_own_response():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        # An endless body: get() returns at the headers, as plain aiohttp does.
        resp = await bounded(session.get(base + "/watch?lines=0"), timeout=5)
        assert served(resp) == "leader"
        assert type(resp.content) is StreamReader and resp.content._protocol is not None
        assert resp.connection is not None and resp.connection.protocol is not None
        assert json.loads(await bounded(resp.content.readline())) == {"n": 0}
        resp.content.set_exception(ValueError("mine"))  # the caller's own reader, as plain
        with pytest.raises(ValueError, match="mine"):
            await resp.content.readline()
        resp.close()
        await bounded(up.gone.wait())
    assert not mw._live and mw.group.in_flight == 0


async def test_a_slow_reader_never_stalls_a_fast_one():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=3000&every=0"
        fast, slow = await bounded(asyncio.gather(session.get(url), session.get(url)))
        lines = [line async for line in fast.content]  # the whole body, slow reads nothing
        assert len(lines) == 3000
        assert b"".join([line async for line in slow.content]) == b"".join(lines)
        assert up.hits == 1
    assert not mw._live and mw.group.in_flight == 0


async def test_a_caller_that_comes_while_the_body_streams_joins_it():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=5&every=0&hold=1"
        first, second = await bounded(asyncio.gather(session.get(url), session.get(url)))
        assert json.loads(await bounded(first.content.readline())) == {"n": 0}
        late = await bounded(session.get(url))  # the body is held after its first line
        assert served(late) == "follower" and up.hits == 1
        up.hold.set()
        bodies = [await bounded(r.read()) for r in (second, late)]
        assert bodies[0] == bodies[1] and bodies[0].count(b"\n") == 5  # from the first byte
        assert (await first.read()).count(b"\n") == 4  # the rest after its readline
    assert mw.stats.followers == 2 and not mw._live


async def test_past_max_body_size_a_late_caller_makes_its_own_request():
    up = Stream()
    mw = SingleflightMiddleware(max_body_size=100)
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=40&every=0.01"
        first, second = await bounded(asyncio.gather(session.get(url), session.get(url)))
        while first.content.total_bytes <= 100:  # more than the flight keeps for joiners
            await bounded(first.content.readline())
        late = await bounded(session.get(url))
        assert served(late) == "leader" and up.hits == 2
        for r in (first, second, late):  # everyone still gets a whole body
            rest = await bounded(r.read())
            assert rest.endswith(b'{"n": 39}\n')
        await wait_until(lambda: not mw._live, "the flights to end")


async def test_each_caller_keeps_its_own_total_timeout():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=20&every=0.05"  # about one second in all
        short = aiohttp.ClientTimeout(total=0.3)
        quick, patient = await bounded(
            asyncio.gather(session.get(url, timeout=short), session.get(url))
        )
        assert served(quick) == "leader" and served(patient) == "follower"
        with pytest.raises(asyncio.TimeoutError):
            await bounded(quick.read())
        assert (await bounded(patient.read())).count(b"\n") == 20
        assert up.hits == 1
    await joined(mw, 1)


@pytest.mark.parametrize("impatient", ["leader", "follower"])
async def test_each_caller_keeps_its_own_sock_read(impatient):
    """A stall longer than one caller's sock_read fails that caller alone, leader or not."""
    up = Stream()
    mw = SingleflightMiddleware()
    short = aiohttp.ClientTimeout(sock_read=0.3)
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=3&every=0&hold=1"  # stalls after the first line
        timeouts = [short, None] if impatient == "leader" else [None, short]
        responses = await bounded(
            asyncio.gather(
                *(session.get(url, timeout=t or aiohttp.ClientTimeout()) for t in timeouts)
            )
        )
        assert [served(r) for r in responses] == ["leader", "follower"]
        quick = responses[0] if impatient == "leader" else responses[1]
        patient = responses[1] if impatient == "leader" else responses[0]
        with pytest.raises(aiohttp.SocketTimeoutError):
            await bounded(quick.read())
        up.hold.set()
        assert (await bounded(patient.read())).count(b"\n") == 3
        assert up.hits == 1


async def test_a_reader_cancelled_mid_read_leaves_the_others_whole():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        url = base + "/watch?lines=4&every=0&hold=1"  # stalls after the first line
        a, b, c = await bounded(asyncio.gather(*(session.get(url) for _ in range(3))))
        for r in (a, b, c):
            assert json.loads(await bounded(r.content.readline())) == {"n": 0}
        stuck = asyncio.create_task(a.content.readline())  # waits on the stall
        await asyncio.sleep(0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        up.hold.set()
        for r in (b, c):
            assert (await bounded(r.read())).count(b"\n") == 3
        assert json.loads(await bounded(a.content.readline())) == {"n": 1}  # a reads on too
        a.close()
        assert up.hits == 1
        # Every upstream connection is back in the pool or closed: nothing held.
        await wait_until(lambda: not session.connector._acquired, "connections released")
    assert not mw._live and not mw._waiting


async def test_callers_that_all_leave_before_reading_close_the_upstream():
    up = Stream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base, aiohttp.ClientSession(middlewares=(mw,)) as session:
        responses = await bounded(
            asyncio.gather(*(session.get(base + "/watch?lines=0") for _ in range(3)))
        )
        assert sorted(served(r) for r in responses) == ["follower", "follower", "leader"]
        for r in responses:
            r.release()
        await bounded(up.gone.wait())  # the endless body's upstream request ended
        await wait_until(lambda: not session.connector._acquired, "connections released")
    assert not mw._live and mw.group.in_flight == 0


async def test_a_lone_callers_body_error_comes_where_it_reads(upstream, make_session):
    """As plain aiohttp: get() gives the status and headers; the broken body fails read()."""
    mw = SingleflightMiddleware()
    session = make_session(mw)
    resp = await bounded(session.get(upstream.url + "/broken?reset=100"))
    assert resp.status == 200 and served(resp) == "leader"
    with pytest.raises(aiohttp.ClientPayloadError):
        await bounded(resp.read())
    assert not session.connector._acquired
