"""A loopback HTTPS upstream that tells each caller who it saw: client cert, SNI, source address.

``TLSUpstream`` serves ``https://127.0.0.1:<port>/...`` with a certificate for ``localhost`` and
``127.0.0.1`` from a test CA (trustme). It asks for a client certificate (optional) and echoes,
as JSON, the hit number, the client certificate's common name, the SNI name the client sent and
the address the connection came from. ``?gate=NAME`` holds the response until ``open_gate``;
``?delay=1`` thinks for 30 ms.
``TunnelProxy`` is an HTTP CONNECT proxy whose upstream connections come from its own loopback
source address (``127.0.0.2``...), so the echo shows which proxy a request went through.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import trustme
from aiohttp import web

__all__ = ("TLSUpstream", "TunnelProxy", "client_context")

CA = trustme.CA()  # the CA the server's certificate chains to, and the client certs' issuer
OTHER_CA = trustme.CA()  # trusted by nobody here: verifying against it must fail
SERVER_CERT = CA.issue_cert("localhost", "127.0.0.1")
CLIENT_CERTS = {
    name: CA.issue_cert(f"{name}@example.org", common_name=name) for name in ("alice", "bob")
}


def client_context(cert: str | None = None, verify: str = "ca") -> ssl.SSLContext | bool:
    """An httpx ``verify=`` value: trust ``CA`` (or ``OTHER_CA``, or nothing), with ``cert``."""
    if verify == "off" and cert is None:
        return False
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if verify == "off":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        (CA if verify == "ca" else OTHER_CA).configure_trust(ctx)
    if cert is not None:
        CLIENT_CERTS[cert].configure_cert(ctx)
    return ctx


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _common_name(peercert: Any) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class TLSUpstream:
    """The HTTPS echo server, in its own thread (use as a context manager)."""

    def __init__(self) -> None:
        self.hits = 0
        self.url = ""
        self._lt = _LoopThread()
        self._gates: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        SERVER_CERT.configure_cert(ctx)
        CA.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, if any, must chain to CA

        def sni(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            obj.sni_seen = name  # the SSLObject of this connection: read back by the handler
            return None

        ctx.sni_callback = sni
        return ctx

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def _echo(self, request: web.Request) -> web.Response:
        self.hits += 1
        transport = request.transport
        assert transport is not None  # read what we saw before waiting: the peer may go
        obj = transport.get_extra_info("ssl_object")
        body = {
            "hit": self.hits,
            "cert": _common_name(transport.get_extra_info("peercert")),
            "sni": getattr(obj, "sni_seen", None),
            "peer": transport.get_extra_info("peername")[0],
        }
        gate = request.query.get("gate")
        if gate:
            await self._gate(gate).wait()
        if request.query.get("delay"):  # think time: a burst's callers overlap
            await asyncio.sleep(0.03)
        return web.json_response(body)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context())
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"

    def open_gate(self, name: str) -> None:
        self._lt.loop.call_soon_threadsafe(lambda: self._gate(name).set())

    def __enter__(self) -> TLSUpstream:
        self._lt.start()
        self._lt.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._lt.run(self._runner.cleanup())
        self._lt.stop()


class TunnelProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that dials out from ``source`` (its identity)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.tunnels = 0
        self.url = ""
        self._lt = _LoopThread()
        self._server: asyncio.AbstractServer | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(
            host, int(port), local_addr=(self.source, 0)
        )
        self.tunnels += 1
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def __enter__(self) -> TunnelProxy:
        self._lt.start()
        self._lt.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._lt.run(self._stop())
        self._lt.stop()


@contextlib.contextmanager
def tls_world() -> Iterator[tuple[TLSUpstream, dict[str, TunnelProxy]]]:
    """The HTTPS echo server and two tunnel proxies (sources 127.0.0.2 and 127.0.0.3)."""
    with TLSUpstream() as server, TunnelProxy("127.0.0.2") as p1, TunnelProxy("127.0.0.3") as p2:
        yield server, {"p1": p1, "p2": p2}
