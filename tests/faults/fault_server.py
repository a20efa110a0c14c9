"""A raw asyncio TCP server on 127.0.0.1 that breaks HTTP in ways aiohttp's server will not.

``LoopbackUpstream`` is a well-behaved aiohttp server: it cannot send a malformed status line,
drop a connection before the status line, or trickle a body. ``FaultServer`` speaks just enough
HTTP/1.1 by hand to do those, from a daemon thread with its own event loop. The path picks the
fault; ``?gate=NAME`` holds the request (after it is counted) until ``open_gate(NAME)``:

==================  =========================================================================
``/malformed``      ``HTTP/1.1 OOPS\\r\\n`` then close
``/garbage``        a line that is not HTTP at all, then close
``/reset``          close with RST (SO_LINGER 0) before sending anything
``/trickle``        headers with ``Content-Length: 64``, then one byte every ``?gap=`` seconds
                    (default 0.5) until the client goes away
``/steady``         headers after ``?head=`` s (0.2), then ``?n=`` bytes (8), ``?gap=`` s apart
                    (0.15): slow, but never silent for long (then it closes)
``/hang``           never answer; wait until the client goes away
anything else       ``200`` with a small JSON body ``{"path", "hit"}`` (keep-alive)
==================  =========================================================================

``heal()`` makes every path answer ``200`` (so a test can check the next request for a key goes
upstream and succeeds), ``hits(path)`` counts requests, ``open_connections`` counts sockets the
server still holds (a client that leaks a connection keeps one open).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, urlsplit


class FaultServer:
    """FaultServer serves hand-written, misbehaving HTTP/1.1 on 127.0.0.1 (see module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._hits: Counter[str] = Counter()
        self._healed = False
        self._gates: dict[str, asyncio.Event] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FaultServer:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for gate in self._gates.values():
            gate.set()
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- controls ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero the counters, un-heal, and release (then forget) every gate."""
        with self._cond:
            self._hits.clear()
            self._healed = False

        async def release() -> None:
            for gate in self._gates.values():
                gate.set()
            self._gates.clear()

        self._run(release())

    def heal(self) -> None:
        """From now on every path answers 200 with a JSON body."""
        with self._cond:
            self._healed = True

    def open_gate(self, name: str) -> None:
        async def open_() -> None:
            self._gate(name).set()

        self._run(open_())

    def hits(self, path: str | None = None) -> int:
        with self._cond:
            return self._hits[path] if path is not None else sum(self._hits.values())

    def wait_for_hits(self, n: int, path: str | None = None, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._count(path) >= n, timeout=timeout):
                raise TimeoutError(f"fault server saw {self._count(path)} hits on {path}")

    async def wait_for_hits_async(self, n: int, path: str | None = None, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while self.hits(path) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault server saw {self.hits(path)} hits on {path}")
            await asyncio.sleep(0.001)

    @property
    def open_connections(self) -> int:
        """Connections the server still has open (the client's side may be in its pool)."""

        async def count() -> int:
            return sum(1 for w in self._writers if not w.transport.is_closing())

        return self._run(count())  # type: ignore[no-any-return]

    # -- serving -----------------------------------------------------------------------------

    def _count(self, path: str | None) -> int:
        return self._hits[path] if path is not None else sum(self._hits.values())

    def _gate(self, name: str) -> asyncio.Event:
        if name not in self._gates:
            self._gates[name] = asyncio.Event()
        return self._gates[name]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                parts = urlsplit(target)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                with self._cond:
                    self._hits[parts.path] += 1
                    hit = self._hits[parts.path]
                    healed = self._healed
                    self._cond.notify_all()
                if "gate" in query:
                    await self._gate(query["gate"]).wait()
                if healed or parts.path not in _FAULTS:
                    body = json.dumps({"path": parts.path, "hit": hit}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                    continue
                await _FAULTS[parts.path](reader, writer, query)
                return
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()  # graceful (FIN) unless the fault set SO_LINGER 0 (RST)


async def _malformed(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    writer.write(b"HTTP/1.1 OOPS\r\nContent-Length: 2\r\n\r\nhi")
    await writer.drain()


async def _garbage(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()


async def _reset(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    sock = writer.get_extra_info("socket")
    if sock is not None:  # RST, not FIN: the client sees "connection reset by peer"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _trickle(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    gap = float(query.get("gap", "0.5"))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n")
    await writer.drain()
    for _ in range(64):
        try:
            await asyncio.wait_for(reader.read(1), gap)  # b"" (EOF): the client went away
            return
        except asyncio.TimeoutError:
            pass
        writer.write(b"x")
        await writer.drain()


async def _steady(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    n = int(query.get("n", "8"))
    await asyncio.sleep(float(query.get("head", "0.2")))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % n)
    for _ in range(n):
        await writer.drain()
        await asyncio.sleep(float(query.get("gap", "0.15")))
        writer.write(b"s")
    await writer.drain()


async def _hang(reader, writer, query) -> None:  # type: ignore[no-untyped-def]
    await reader.read(1)  # until the client closes its end


_FAULTS = {
    "/malformed": _malformed,
    "/garbage": _garbage,
    "/reset": _reset,
    "/trickle": _trickle,
    "/steady": _steady,
    "/hang": _hang,
}
