"""Drivers that fire one leader and many followers through each adapter, and time every caller.

Every driver holds the *first* request that reaches the upstream side of the adapter (an inner
transport or an inner middleware) until ``release()``: the leader is then known to be in flight,
the followers join it (``stats.followers``), and only then does the request meet the fault. The
hold never touches the network, so the fault itself is the real thing on a real socket.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from singleflight import Group, Stats
from singleflight.aiohttp import SingleflightMiddleware, served
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

ADAPTERS = ("httpx-async", "httpx-sync", "aiohttp")


@dataclass
class Outcome:
    """How one caller ended: ``kind`` is the status (``"200"``) or the exception class name."""

    kind: str
    role: str | None  # how a response was served; None for an error
    started: float
    ended: float
    body: bytes = b""
    error: BaseException | None = None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll cheap in-process state every millisecond, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def bounded(aw: Awaitable[Any], timeout: float = 20.0) -> Any:
    return await asyncio.wait_for(aw, timeout)


def httpx_pool_is_idle(transport: Any) -> bool:
    """No request queued and no connection busy in an httpx HTTP transport's pool."""
    pool = transport._pool
    return not pool._requests and all(c.is_idle() or c.is_closed() for c in pool.connections)


class Driver:
    """One adapter under test: ``call(url, timeout)`` starts a caller and returns its Outcome."""

    name: str
    adapter: AsyncSingleflightTransport | SingleflightTransport | SingleflightMiddleware

    @property
    def group(self) -> Group[Any]:
        return self.adapter.group

    @property
    def stats(self) -> Stats:
        return self.adapter.stats

    @property
    def reached(self) -> int:
        """Requests that reached the hold, i.e. went (or are about to go) upstream."""
        raise NotImplementedError

    def hold_again(self) -> None:
        """Hold the next request that goes upstream again, until the next ``release()``."""
        raise NotImplementedError

    def call(self, url: str, timeout: float) -> asyncio.Future[Outcome]:
        raise NotImplementedError

    def release(self) -> None:
        """Let held requests (and every later one) through."""
        raise NotImplementedError

    def idle(self) -> bool:
        """True if no pooled connection is held (checked out or queued for)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


# -- httpx, async ------------------------------------------------------------------------------


class _AsyncHold(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncHTTPTransport) -> None:
        self.inner = inner
        self.reached = 0
        self.released = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.reached += 1
        await self.released.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class HttpxAsync(Driver):
    name = "httpx-async"

    def __init__(self, **options: Any) -> None:
        self.hold = _AsyncHold(httpx.AsyncHTTPTransport())
        self.adapter = AsyncSingleflightTransport(self.hold, **options)
        self.client = httpx.AsyncClient(transport=self.adapter)

    @property
    def reached(self) -> int:
        return self.hold.reached

    def hold_again(self) -> None:
        self.hold.released.clear()

    def call(self, url: str, timeout: float) -> asyncio.Future[Outcome]:
        async def one() -> Outcome:
            t0 = time.monotonic()
            try:
                r = await self.client.get(url, timeout=httpx.Timeout(5.0, read=timeout))
            except Exception as exc:
                return Outcome(type(exc).__name__, None, t0, time.monotonic(), error=exc)
            role = r.extensions.get("singleflight")
            return Outcome(str(r.status_code), role, t0, time.monotonic(), r.content)

        return asyncio.ensure_future(one())

    def release(self) -> None:
        self.hold.released.set()

    def idle(self) -> bool:
        return httpx_pool_is_idle(self.hold.inner)

    async def aclose(self) -> None:
        await self.client.aclose()


# -- httpx, sync (threads) ---------------------------------------------------------------------


class _SyncHold(httpx.BaseTransport):
    def __init__(self, inner: httpx.HTTPTransport) -> None:
        self.inner = inner
        self.reached = 0
        self._lock = threading.Lock()
        self.released = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.reached += 1
        if not self.released.wait(timeout=20):
            raise AssertionError("the test never released the hold")
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class HttpxSync(Driver):
    name = "httpx-sync"

    def __init__(self, **options: Any) -> None:
        self.hold = _SyncHold(httpx.HTTPTransport())
        self.adapter = SingleflightTransport(self.hold, **options)
        self.client = httpx.Client(transport=self.adapter)
        self.pool = ThreadPoolExecutor(max_workers=100, thread_name_prefix="fault-caller")

    @property
    def reached(self) -> int:
        return self.hold.reached

    def hold_again(self) -> None:
        self.hold.released.clear()

    def call(self, url: str, timeout: float) -> asyncio.Future[Outcome]:
        def one() -> Outcome:
            t0 = time.monotonic()
            try:
                r = self.client.get(url, timeout=httpx.Timeout(5.0, read=timeout))
            except Exception as exc:
                return Outcome(type(exc).__name__, None, t0, time.monotonic(), error=exc)
            role = r.extensions.get("singleflight")
            return Outcome(str(r.status_code), role, t0, time.monotonic(), r.content)

        return asyncio.get_running_loop().run_in_executor(self.pool, one)

    def release(self) -> None:
        self.hold.released.set()

    def idle(self) -> bool:
        return httpx_pool_is_idle(self.hold.inner)

    async def aclose(self) -> None:
        self.hold.released.set()  # never strand a thread, even when a test failed early
        await asyncio.get_running_loop().run_in_executor(None, self.pool.shutdown)
        self.client.close()


# -- aiohttp -----------------------------------------------------------------------------------


class Aiohttp(Driver):
    name = "aiohttp"

    def __init__(self, **options: Any) -> None:
        self.adapter = SingleflightMiddleware(**options)
        self._reached = 0
        self.released = asyncio.Event()
        self.connector = aiohttp.TCPConnector()
        self.session = aiohttp.ClientSession(
            connector=self.connector,
            middlewares=(self.adapter, self._hold),  # the first one is the outermost
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )

    async def _hold(self, req: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
        self._reached += 1
        await self.released.wait()
        return await handler(req)  # type: ignore[no-any-return]

    @property
    def reached(self) -> int:
        return self._reached

    def hold_again(self) -> None:
        self.released.clear()

    def call(self, url: str, timeout: float) -> asyncio.Future[Outcome]:
        # sock_read is the caller's own read timeout, like httpx's read=; no total, so a
        # follower is bounded by what the middleware does, not by aiohttp's overall deadline.
        own = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout)

        async def one() -> Outcome:
            t0 = time.monotonic()
            try:
                async with self.session.get(url, timeout=own) as r:
                    body = await r.read()
            except Exception as exc:
                return Outcome(type(exc).__name__, None, t0, time.monotonic(), error=exc)
            return Outcome(str(r.status), served(r), t0, time.monotonic(), body)

        return asyncio.ensure_future(one())

    def release(self) -> None:
        self.released.set()

    def idle(self) -> bool:
        return not self.connector._acquired

    async def aclose(self) -> None:
        await self.session.close()


def make_driver(name: str, **options: Any) -> Driver:
    return {"httpx-async": HttpxAsync, "httpx-sync": HttpxSync, "aiohttp": Aiohttp}[name](**options)
