"""docs/web-services.md's examples served by real servers: a burst of requests, one upstream call.

Each example app from the page runs in the server it is written for (uvicorn, werkzeug's
threaded server, aiohttp.web) against a gated upstream: the burst is released only once every
other caller is following the first, so "one upstream call" is checked, not hoped for.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("flask")

import uvicorn  # noqa: E402
from aiohttp import web  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "web-services.md"
FENCE = re.compile(r"(?P<skip><!-- no-test -->\s*\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)
BURST = 12


class GatedUpstream:
    """A real HTTP upstream whose every answer waits for ``open()``; counts the hits."""

    def __init__(self) -> None:
        self.hits = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._gate: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> GatedUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        assert self._gate is not None
        await self._gate.wait()
        return web.json_response({"path": request.path, "hit": self.hits})

    def open(self) -> None:
        if self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.set)


class GatedFunction:
    """Stands in for the page's slow data function: counts calls, answers once opened."""

    def __init__(self, answer: Callable[[str], Any]) -> None:
        self.calls = 0
        self.opened = threading.Event()
        self.answer = answer

    def sync(self, arg: str) -> Any:
        self.calls += 1
        assert self.opened.wait(30), "never opened"
        return self.answer(arg)

    async def __call__(self, arg: str) -> Any:
        self.calls += 1
        assert await asyncio.to_thread(self.opened.wait, 30), "never opened"
        return self.answer(arg)


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, Any], GatedUpstream]]:
    """The page's blocks run in order, as a reader would, with USERS_API on a gated upstream."""
    with GatedUpstream() as upstream:
        monkeypatch.setenv("USERS_API", upstream.url)
        namespace: dict[str, Any] = {"__name__": "docs_web_services"}
        for i, m in enumerate(FENCE.finditer(PAGE.read_text())):
            if not m["skip"]:
                exec(compile(m["code"], f"web-services.md[block {i}]", "exec"), namespace)
        yield namespace, upstream


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=20)


@contextmanager
def serve_aiohttp(app: web.Application) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app, access_log=None)

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=20)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=20)
        loop.close()


def burst(url: str, followers: Callable[[], int], release: Callable[[], None]) -> list[Any]:
    """BURST concurrent GETs of url; release the upstream once BURST - 1 callers follow."""

    async def run() -> list[Any]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            calls = [asyncio.create_task(client.get(url)) for _ in range(BURST)]
            deadline = time.monotonic() + 30
            while followers() < BURST - 1:  # bounded: a burst that never meets fails here
                assert time.monotonic() < deadline, f"only {followers()} followers"
                assert not any(c.done() for c in calls), [c.result() for c in calls if c.done()]
                await asyncio.sleep(0.01)
            release()
            responses = await asyncio.gather(*calls)
        for r in responses:
            assert r.status_code == 200, r.text
        return [r.json() for r in responses]

    return asyncio.run(run())


def test_fastapi_lifespan_client_makes_one_upstream_call(page: Any) -> None:
    ns, upstream = page
    app = ns["app"]
    with serve_asgi(app) as url:
        bodies = burst(
            f"{url}/users/7",
            lambda: app.state.users_transport.stats.followers,
            upstream.open,
        )
    assert upstream.hits == 1
    assert bodies == [{"path": "/users/7", "hit": 1}] * BURST
    assert app.state.users.is_closed  # the lifespan closed the client


@pytest.mark.parametrize("route, fn", [("reports", "daily_report"), ("summary", None)])
def test_fastapi_decorated_data_function_runs_once(page: Any, route: str, fn: str | None) -> None:
    ns, _ = page
    query = GatedFunction(lambda day: {"day": day, "orders": 1234})
    ns["run_query"] = query  # the slow database, gated
    decorated = ns[fn] if fn else ns["report_summary"]
    path = "/reports/2024-05-01" if route == "reports" else "/reports/2024-05-01/summary"
    with serve_asgi(ns["app"]) as url:
        bodies = burst(f"{url}{path}", lambda: decorated.stats.followers, query.opened.set)
    assert query.calls == 1
    assert bodies == [{"day": "2024-05-01", "orders": 1234}] * BURST


def test_flask_threads_share_the_sync_transport(page: Any) -> None:
    ns, upstream = page
    transport = ns["users"]._transport
    with serve_wsgi(ns["flask_app"]) as url:
        bodies = burst(f"{url}/users/9", lambda: transport.stats.followers, upstream.open)
    assert upstream.hits == 1
    assert bodies == [{"path": "/users/9", "hit": 1}] * BURST


def test_flask_threads_share_the_decorated_function(page: Any) -> None:
    ns, _ = page
    rates = GatedFunction(lambda currency: {"EUR": 1.0, currency: 1.08})
    ns["fetch_rates"] = rates.sync
    with serve_wsgi(ns["flask_app"]) as url:
        bodies = burst(
            f"{url}/rates/USD", lambda: ns["exchange_rates"].stats.followers, rates.opened.set
        )
    assert rates.calls == 1
    assert bodies == [{"EUR": 1.0, "USD": 1.08}] * BURST


def test_aiohttp_web_cleanup_ctx_session_makes_one_upstream_call(page: Any) -> None:
    ns, upstream = page
    with serve_aiohttp(ns["aiohttp_app"]) as url:
        bodies = burst(f"{url}/users/3", lambda: ns["users_flights"].stats.followers, upstream.open)
    assert upstream.hits == 1
    assert bodies == [{"path": "/users/3", "hit": 1}] * BURST
