"""Real aiohttp.web servers on loopback, in the test's own loop: bodies, gates, TLS, a proxy."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

LINES = 6000
# ~110 KB of JSON, one short line each: bigger than aiohttp's read buffer (64 KiB on 3.12/3.13),
# so readers cross buffer boundaries; JSON, so json() reads it too.
DOC = [f"line {i:05d} of the body" for i in range(LINES)]
BODY = json.dumps(DOC, indent=0).encode()
GZIPPED = gzip.compress(BODY)
KINDS = ("length", "chunked", "gzip-length", "gzip-chunked")


class WebUpstream:
    """An aiohttp.web app: counts hits per path, holds requests at gates, answers each kind."""

    def __init__(self, via: str | None = None) -> None:
        self.via = via  # says which server answered (a stand-in proxy answers itself)
        self.hits: Counter[str] = Counter()
        self.gates: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.url = ""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def arrival(self, name: str) -> asyncio.Event:
        return self.arrived.setdefault(name, asyncio.Event())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        hit = self.hits[request.path]
        name = request.query.get("gate")
        if name:
            self.arrival(name).set()
            await asyncio.wait_for(self.gate(name).wait(), 30)
        kind = request.query.get("kind")
        if kind is not None:
            return await self.body(request, kind)
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        who = "none"
        if peer:
            who = dict(x[0] for x in peer["subject"]).get("commonName", "?")
        echo = {
            "hit": hit,
            "path": request.path,
            "client_cert": who,
            "proxy_authorization": request.headers.get("Proxy-Authorization"),
            "via": self.via,
            "version": f"{request.version.major}.{request.version.minor}",
        }
        return web.json_response(echo)

    async def body(self, request: web.Request, kind: str) -> web.StreamResponse:
        encoded = kind.startswith("gzip")
        data = GZIPPED if encoded else BODY
        headers = {"Content-Type": "application/json"}
        if encoded:
            headers["Content-Encoding"] = "gzip"
        if kind.endswith("length"):
            return web.Response(body=data, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        mid = request.query.get("mid")  # hold the body after its first piece at this gate
        for i in range(0, len(data), 7000):
            await resp.write(data[i : i + 7000])
            if i == 0 and mid:
                await asyncio.wait_for(self.gate(mid).wait(), 30)
        await resp.write_eof()
        return resp


@asynccontextmanager
async def serve(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in this loop; yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class RawUpstream:
    """A raw asyncio server: answers each request with ``answer`` bytes, then closes.

    For responses aiohttp.web will not send: a body delimited by the connection's close, a
    ``101 Switching Protocols`` to a plain GET, an oversized header. Holds each request at
    ``gate`` (if set) until it is opened.
    """

    def __init__(self, answer: bytes, *, gated: bool = False) -> None:
        self.answer = answer
        self.hits = 0
        self.arrived = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            self.arrived.set()
            await asyncio.wait_for(self.gate.wait(), 30)
            writer.write(self.answer)
            await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def serve_raw(upstream: RawUpstream) -> AsyncIterator[str]:
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
