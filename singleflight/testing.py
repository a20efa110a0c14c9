"""A real loopback HTTP upstream for tests and demos: counts hits, and misbehaves on request."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'singleflight.testing needs aiohttp: pip install "singleflight-http[aiohttp]"'
    ) from exc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ("LoopbackUpstream", "RecordedRequest")

#: Request headers echoed back under ``"who"`` by the default JSON body.
WHO_HEADERS: Final = ("authorization", "cookie", "x-api-key", "x-user")


@final
@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the upstream received: method, path, raw query string and headers."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """header returns the first value of ``name`` (case-insensitive), or None."""
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)


@final
class LoopbackUpstream:
    """LoopbackUpstream serves HTTP on 127.0.0.1 from a background thread with its own loop.

    Use it as a context manager (``with LoopbackUpstream() as up:``); ``up.url`` is the base URL
    (a free port, picked by the OS). Every path answers; each request counts one hit for its
    path (``up.hits("/a")``, ``up.hits()`` for all) before anything else happens, then query
    parameters shape the response:

    ===================  ==================================================================
    ``status=503``       response status (default 200); 304 and 204 have no body, 206 adds
                         ``Content-Range``; 3xx with ``redirect=`` sets ``Location``
    ``delay=0.05``       seconds to wait before answering
    ``gate=NAME``        wait until ``up.open_gate("NAME")`` (events, not sleeps, in tests)
    ``body=TEXT``        this body (``text/plain``) instead of the default JSON echo
    ``size=N``           a body of N bytes (a repeating pattern, ``application/octet-stream``)
    ``encoding=gzip``    compress the body (``gzip`` or ``deflate``) and say so in
                         ``Content-Encoding``
    ``chunked=1``        send the body in chunks without ``Content-Length``
    ``set_cookie=k=v``   add ``Set-Cookie: k=v``
    ``cache_control=``   add ``Cache-Control``; ``vary=`` adds ``Vary``
    ``header=Name:v``    add any response header (repeatable)
    ``redirect=/path``   302 (or ``status=``) to that location
    ``sse=N``            ``text/event-stream`` of N events, ``interval=`` seconds apart;
                         ``hold=NAME`` waits for that gate after the first event
    ``reset=N``          promise a larger body, send N bytes, then drop the connection
    ===================  ==================================================================

    Paths under ``/_upstream/`` control it from another process and count no hit:
    ``GET /_upstream/hits`` (``{"total": n, "paths": {path: n}}``), ``POST /_upstream/reset``,
    ``POST /_upstream/gate/NAME`` (opens the gate). ``python -m singleflight.testing`` serves
    one in the foreground and prints its URL.

    The default body is JSON: ``{"method", "path", "query", "hit", "who"}`` where ``hit`` is
    the path's hit number and ``who`` echoes the caller's ``Authorization``, ``Cookie``,
    ``X-API-Key`` and ``X-User`` headers, so a test can tell whose response a caller got.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._cond = threading.Condition()  # guards _hits, _requests and wakes waiters
        self._hits: Counter[str] = Counter()
        self._requests: list[RecordedRequest] = []
        self._gates: dict[str, asyncio.Event] = {}  # touched only on the server loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """start binds the port and serves from a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("LoopbackUpstream already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="singleflight-loopback-upstream", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/_upstream/hits", self._control_hits)
        app.router.add_post("/_upstream/reset", self._control_reset)
        app.router.add_post("/_upstream/gate/{name}", self._control_gate)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        """close stops the server, its loop and its thread (idempotent)."""
        loop, thread, self._thread = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        if self._runner is not None:
            runner, self._runner = self._runner, None
            asyncio.run_coroutine_threadsafe(self._stop(runner), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = None

    async def _stop(self, runner: web.AppRunner) -> None:
        for gate in self._gates.values():
            gate.set()  # let held handlers finish
        await runner.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests look at ------------------------------------------------------------------

    def hits(self, path: str | None = None) -> int:
        """hits returns how many requests reached ``path`` (all paths when None)."""
        with self._cond:
            return self._hits[path] if path is not None else sum(self._hits.values())

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """requests returns the recorded requests to ``path`` (all when None), oldest first."""
        with self._cond:
            return [r for r in self._requests if path is None or r.path == path]

    def reset(self) -> None:
        """reset zeroes the hit counters, forgets recorded requests and resets every gate.

        Requests still held by a gate are released first; later ones wait for a new
        ``open_gate``.
        """
        with self._cond:
            self._hits.clear()
            self._requests.clear()
        if self._loop is not None:
            self._call(self._release_gates)

    def _release_gates(self) -> None:
        """Open every gate (so no held request outlives a test), then forget them all."""
        for gate in self._gates.values():
            gate.set()
        self._gates.clear()

    def open_gate(self, name: str) -> None:
        """open_gate releases every request held by ``gate=name``, now and later."""
        self._call(lambda: self._gate(name).set())

    def wait_for_hits(self, n: int, path: str | None = None, *, timeout: float = 5.0) -> None:
        """wait_for_hits blocks until ``hits(path) >= n``; TimeoutError after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._count(path) >= n, timeout=timeout):
                raise TimeoutError(f"upstream saw {self._count(path)} hits on {path}, wanted {n}")

    async def wait_for_hits_async(
        self, n: int, path: str | None = None, *, timeout: float = 5.0
    ) -> None:
        """wait_for_hits_async is wait_for_hits for async tests (asyncio or trio).

        It polls every millisecond (the counter lives on another thread's loop), bounded by
        ``timeout``.
        """
        import anyio

        deadline = time.monotonic() + timeout
        while self.hits(path) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"upstream saw {self.hits(path)} hits on {path}, wanted {n}")
            await anyio.sleep(0.001)

    # -- internals ---------------------------------------------------------------------------

    def _count(self, path: str | None) -> int:
        return self._hits[path] if path is not None else sum(self._hits.values())

    def _call(self, fn: Any) -> None:
        """Run ``fn`` on the server loop and wait for it."""
        if self._loop is None:
            raise RuntimeError("LoopbackUpstream is not running: use it as a context manager")

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def _gate(self, name: str) -> asyncio.Event:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Event()
        return gate

    async def _control_hits(self, request: web.Request) -> web.Response:
        with self._cond:
            paths = dict(self._hits)
        return web.json_response({"total": sum(paths.values()), "paths": paths})

    async def _control_reset(self, request: web.Request) -> web.Response:
        with self._cond:
            self._hits.clear()
            self._requests.clear()
        self._release_gates()
        return web.json_response({"reset": True})

    async def _control_gate(self, request: web.Request) -> web.Response:
        self._gate(request.match_info["name"]).set()
        return web.json_response({"open": request.match_info["name"]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        record = RecordedRequest(
            request.method, request.path, request.query_string, tuple(request.headers.items())
        )
        with self._cond:
            self._hits[request.path] += 1
            hit = self._hits[request.path]
            self._requests.append(record)
            self._cond.notify_all()
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        if "gate" in q:
            await self._gate(q["gate"]).wait()
        status = int(q.get("status", "200"))
        headers: dict[str, str] = {}
        extra: list[tuple[str, str]] = []
        if "set_cookie" in q:
            extra.append(("Set-Cookie", q["set_cookie"]))
        if "cache_control" in q:
            headers["Cache-Control"] = q["cache_control"]
        if "vary" in q:
            headers["Vary"] = q["vary"]
        for h in q.getall("header", []):
            name, _, value = h.partition(":")
            extra.append((name.strip(), value.strip()))
        if "redirect" in q:
            headers["Location"] = q["redirect"]
            status = int(q.get("status", "302"))
        if "sse" in q:
            hold = self._gate(q["hold"]) if "hold" in q else None
            return await self._sse(
                request, int(q["sse"]), float(q.get("interval", "0")), hold, extra
            )
        body, content_type = self._body(request, q, hit)
        if status == 206:
            headers["Content-Range"] = f"bytes 0-{max(len(body) - 1, 0)}/{len(body) * 2}"
        encoding = q.get("encoding")
        if encoding == "gzip":
            body = gzip.compress(body, mtime=0)
        elif encoding == "deflate":
            body = zlib.compress(body)
        elif encoding is not None:
            raise web.HTTPBadRequest(text=f"unknown encoding {encoding!r}")
        if encoding:
            headers["Content-Encoding"] = encoding
        if status in (204, 304):
            body = b""
        if "reset" in q:
            return await self._reset(request, status, headers, extra, body, int(q["reset"]))
        if q.get("chunked") == "1":
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_type = content_type
            for name, value in extra:
                resp.headers.add(name, value)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 4096):
                await resp.write(body[i : i + 4096])
            await resp.write_eof()
            return resp
        resp = web.Response(status=status, body=body, headers=headers)
        if status not in (204, 304):
            resp.content_type = content_type
        for name, value in extra:
            resp.headers.add(name, value)
        return resp

    @staticmethod
    def _body(request: web.Request, q: Mapping[str, str], hit: int) -> tuple[bytes, str]:
        if "body" in q:
            return q["body"].encode(), "text/plain"
        if "size" in q:
            size = int(q["size"])
            pattern = b"0123456789abcdef"
            return (pattern * (size // len(pattern) + 1))[:size], "application/octet-stream"
        echo = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "hit": hit,
            "who": {h: request.headers.get(h) for h in WHO_HEADERS},
        }
        return json.dumps(echo, sort_keys=True).encode(), "application/json"

    @staticmethod
    async def _sse(
        request: web.Request,
        count: int,
        interval: float,
        hold: asyncio.Event | None,
        extra: list[tuple[str, str]],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        for name, value in extra:
            resp.headers.add(name, value)
        await resp.prepare(request)
        for i in range(count):
            if i == 1 and hold is not None:
                await hold.wait()
            if i and interval:
                await asyncio.sleep(interval)
            await resp.write(f"data: {i}\n\n".encode())
        await resp.write_eof()
        return resp

    @staticmethod
    async def _reset(
        request: web.Request,
        status: int,
        headers: dict[str, str],
        extra: list[tuple[str, str]],
        body: bytes,
        sent: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        for name, value in extra:
            resp.headers.add(name, value)
        resp.content_length = max(len(body), sent) + 1024
        await resp.prepare(request)
        await resp.write((body * (sent // max(len(body), 1) + 1))[:sent])
        transport = request.transport
        if transport is not None:
            transport.abort()  # the peer sees the connection drop mid-body
        return resp


def main(argv: list[str] | None = None) -> None:
    """Serve a LoopbackUpstream in the foreground until interrupted; print its URL first."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m singleflight.testing", description=main.__doc__
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    args = parser.parse_args(argv)
    with LoopbackUpstream(port=args.port) as upstream:
        print(upstream.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
