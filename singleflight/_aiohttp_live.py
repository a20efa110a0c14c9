"""Live fan-out for aiohttp: one upstream body, read once by a pump, fed to every caller's reader.

When followers wait on a flight as its response's headers arrive, the leader's own response
(``orig``) stays private and every caller of the flight, the leader too, gets its own
``ClientResponse`` whose ``content`` is a *tap*: a ``StreamReader`` that is handed what has
arrived so far and then each new chunk as it comes. One pump task reads ``orig.content``: it is
the one task of the library that outlives a call (a cancelled mid-body read would end the body
silently for everyone, see research/live-fanout.md), and it ends when the body ends or the last
caller lets go of its response.

- Each caller reads at its own pace. A tap never stalls the others: the pump reads while any
  tap wants more (its reader is below its high-water mark) and pauses only when all are full,
  which pauses the upstream socket as plain aiohttp does.
- Bytes are kept for callers that join late (``Live.join``) up to ``max_body_size``; past it
  nothing is kept and new callers make their own request.
- An upstream error reaches each reader where it reads it (a copy of it, bound to nobody else),
  after every byte that came before it; the body's end is each reader's EOF.
- Each caller's own timeouts hold on its own reader: ``total`` (the reader's ``timer``) and
  ``sock_read`` (its tap's timer); the upstream read itself runs on no caller's clock.
- Each response's ``connection`` is a ``Lease``: releasing or closing the response lets go of
  the flight; the last one closes the upstream response (or returns its connection, if whole).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Final

from aiohttp import ClientConnectionError, ClientRequest, ClientResponse, SocketTimeoutError
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpVersion11
from aiohttp.streams import StreamReader

from singleflight._aiohttp_response import blank, raw_headers

__all__ = ()


class _Tap:
    """One caller's demand: stands in for the connection's protocol under its reader.

    The reader pauses it above its high-water mark and resumes it as it is read (aiohttp 3.14
    calls ``resume_reading(resume_parser=False)``, and on most reads: act on a real resume only).
    It also keeps the caller's own ``sock_read``, as aiohttp's protocol does for a socket: the
    timer restarts with every chunk fed, stops while the reader is full, and on expiry puts
    ``SocketTimeoutError`` on the reader.
    """

    __slots__ = ("_handle", "_live", "_reading_paused", "connected", "reader", "sock_read")

    def __init__(self, live: Live, sock_read: float | None) -> None:
        self._live = live
        self._reading_paused = False
        self.connected = True
        self.sock_read = sock_read
        self._handle: asyncio.TimerHandle | None = None
        self.reader: StreamReader

    def pause_reading(self, *args: object, **kwargs: object) -> None:
        self._reading_paused = True
        self.disarm()

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.arm()
            self._live._want.set()

    def arm(self) -> None:
        """(Re)start the caller's read timeout: the caller waits for more of the body."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.sock_read and not self._reading_paused:
            self._handle = asyncio.get_running_loop().call_later(self.sock_read, self._expired)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expired(self) -> None:
        self._handle = None
        if self.reader.exception() is None and not self.reader.is_eof():
            self.reader.set_exception(SocketTimeoutError("Timeout on reading data from socket"))


class Lease:
    """A caller's hold on the flight, in the place of a response's ``connection``.

    ``ClientSession`` hands it the request's total-timeout cancel (``add_callback``); the
    response calls ``release()`` (whole body read, ``release()``, ``async with`` exit) or
    ``close()``: either lets go of the flight once.
    """

    __slots__ = ("_callbacks", "_live", "_tap", "closed")
    protocol: Final = None  # never the upstream's: a caller cannot upgrade or detach it
    transport: Final = None

    def __init__(self, live: Live, tap: _Tap) -> None:
        self._live = live
        self._tap = tap
        self._callbacks: list[Callable[[], None]] = []
        self.closed = False

    def add_callback(self, callback: Callable[[], None]) -> None:
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        self._live.leave(self._tap)

    close = release


class Live:
    """One streaming flight: the upstream response, its pump, and the readers it feeds."""

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_grace",
        "_kept",
        "_keep",
        "_pump",
        "_taps",
        "_want",
        "on_end",
        "orig",
    )

    def __init__(self, orig: ClientResponse, keep: int, on_end: Callable[[Live], None]) -> None:
        self.orig = orig
        self.on_end = on_end  # called once the body ended or the last caller left
        self._keep = keep  # bytes kept for late joiners, at most
        self._chunks: list[bytes] | None = []  # None: past ``keep``, nothing kept any more
        self._kept = 0
        self._taps: set[_Tap] = set()
        self._want = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None
        # The upstream read runs on no caller's clock: each caller's own total timeout applies
        # to its own reader (``timer=``), its own sock_read to its own tap.
        orig.content._timer = TimerNoop()
        connection = orig.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None:
            protocol.read_timeout = None
            getattr(protocol, "_reschedule_timeout", lambda: None)()  # drop the armed one
        # The flight's callers join in the loop turn after it lands (their futures' wake-ups);
        # until two turns have passed, a flight nobody reads yet is not over.
        self._grace = True
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._grace_over)
        self._pump: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._run())

    @property
    def joinable(self) -> bool:
        """True while a caller of the flight can still get the whole body from here.

        Never from another event loop (a Group may serve several): that caller makes its own
        request.
        """
        return self._chunks is not None and self.orig._loop is asyncio.get_running_loop()

    @property
    def admits(self) -> bool:
        """True while a caller that arrives late may join: the body is still coming."""
        return self.joinable and not self._ended and self._pump is not None

    def join(
        self,
        req: ClientRequest,
        bufsize: int,
        sock_read: float | None,
        traces: bool = False,
    ) -> ClientResponse:
        """The caller's own response: what has arrived so far, then the rest as it comes.

        Only while ``joinable``. ``traces``: the leader's response keeps aiohttp's traces.
        """
        assert self._chunks is not None, "join() after the flight stopped admitting"
        orig = self.orig
        version = orig.version or HttpVersion11
        resp = blank(req, orig.status, orig.reason, version, raw_headers(orig))
        tap = _Tap(self, sock_read)
        tap.reader = reader = StreamReader(
            tap,  # type: ignore[arg-type]
            bufsize,
            timer=req._timer,  # the caller's own total timeout cancels its reads, as plain
            loop=resp._loop,
        )
        self._taps.add(tap)
        for chunk in self._chunks:
            reader.feed_data(chunk)
        if self._ended:
            self._finish(tap)
        else:
            tap.arm()
        resp.content = reader
        resp._body = None
        resp._connection = Lease(self, tap)  # type: ignore[assignment]
        resp._closed = False
        resp._released = False
        if traces:
            resp._traces = orig._traces
        reader.on_eof(resp._response_eof)  # the whole body read: release, as plain
        return resp

    def leave(self, tap: _Tap) -> None:
        """A caller let go of its response; the last one, mid-body, ends the upstream read."""
        tap.disarm()
        self._taps.discard(tap)
        if self._taps or self._ended or self._grace:  # ended: the pump let go already
            return
        self._stop()

    def _grace_over(self) -> None:
        self._grace = False  # every caller of the flight has joined: keep no more than keep
        if self._kept > self._keep and not self._ended:
            self._chunks = None
        if not self._taps and not self._ended and self._pump is not None:
            self._stop()  # every caller left (or none came) before the body ended

    def _stop(self) -> None:
        pump, self._pump = self._pump, None
        self._chunks = None  # callers of the flight yet to join make their own request
        if pump is not None:
            pump.cancel()
        self.orig.close()  # mid-body: the connection cannot be reused
        self.on_end(self)

    def _finish(self, tap: _Tap) -> None:
        tap.disarm()
        reader = tap.reader
        error = self._error
        if error is None:
            reader.feed_eof()
        else:  # a copy per reader: one object raised in many tasks would be shared by all
            try:
                mine = copy.copy(error)
            except Exception:
                mine = error
            reader.set_exception(mine, error)

    async def _run(self) -> None:
        content = self.orig.content
        try:
            while True:
                while self._taps and all(t._reading_paused for t in self._taps):
                    self._want.clear()
                    await self._want.wait()
                chunk = await content.readany()
                if not chunk:
                    break
                if self._chunks is not None:
                    self._kept += len(chunk)
                    self._chunks.append(chunk)
                    if self._kept > self._keep and not self._grace:
                        self._chunks = None  # late joiners make their own request now
                for tap in list(self._taps):
                    tap.reader.feed_data(chunk)
                    tap.arm()
        except asyncio.CancelledError:
            if self._pump is None:  # the last reader left: nobody to tell
                raise
            self._error = ClientConnectionError("the shared response was cancelled")
            self._chunks = None
        except Exception as exc:  # the upstream failed mid-body: each reader gets it in turn
            self._error = exc
            self._chunks = None  # a caller yet to join makes its own request
        self._ended = True  # the chunks stay for the flight's callers that have yet to join
        self.on_end(self)
        for tap in list(self._taps):
            self._finish(tap)
        if self._error is None:
            self.orig.release()
        else:
            self.orig.close()
