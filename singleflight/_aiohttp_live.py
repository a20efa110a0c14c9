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
- Each response's ``connection`` is a ``Lease``: releasing or closing the response lets go of
  the flight; the last one closes the upstream response (or returns its connection, if whole).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Final

from aiohttp import ClientConnectionError, ClientRequest, ClientResponse
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpVersion11
from aiohttp.streams import StreamReader

from singleflight._aiohttp_response import blank

__all__ = ()


class _Gate:
    """Stands in for the connection's protocol under one caller's reader: that caller's demand.

    The reader pauses it above its high-water mark and resumes it as it is read (aiohttp 3.14
    calls ``resume_reading(resume_parser=False)``, and on most reads: act on a real resume only).
    """

    __slots__ = ("_reading_paused", "_wake", "connected")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._reading_paused = False
        self._wake = wake
        self.connected = True

    def pause_reading(self, *args: object, **kwargs: object) -> None:
        self._reading_paused = True

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._wake()


class Lease:
    """A caller's hold on the flight, in the place of a response's ``connection``.

    ``ClientSession`` hands it the request's total-timeout cancel (``add_callback``); the
    response calls ``release()`` (whole body read, ``release()``, ``async with`` exit) or
    ``close()``: either lets go of the flight once.
    """

    __slots__ = ("_callbacks", "_live", "_reader", "closed")
    protocol: Final = None  # never the upstream's: a caller cannot upgrade or detach it
    transport: Final = None

    def __init__(self, live: Live, reader: StreamReader) -> None:
        self._live = live
        self._reader = reader
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
        self._live.leave(self._reader)

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
        "_readers",
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
        self._readers: dict[StreamReader, _Gate] = {}
        self._want = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None
        # The upstream read runs on no caller's clock: each caller's own total timeout applies
        # to its own reader (``timer=``). The leader's sock_read still guards the socket.
        orig.content._timer = TimerNoop()
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

    def join(self, req: ClientRequest, bufsize: int, traces: bool = False) -> ClientResponse:
        """The caller's own response: what has arrived so far, then the rest as it comes.

        Only while ``admits``. ``traces``: the leader's response keeps aiohttp's traces.
        """
        assert self._chunks is not None, "join() after the flight stopped admitting"
        orig = self.orig
        resp = blank(req, orig.status, orig.reason, orig.version or HttpVersion11, orig.raw_headers)
        gate = _Gate(self._want.set)
        reader = StreamReader(
            gate,  # type: ignore[arg-type]
            bufsize,
            timer=req._timer,  # the caller's own total timeout cancels its reads, as plain
            loop=resp._loop,
        )
        self._readers[reader] = gate
        for chunk in self._chunks:
            reader.feed_data(chunk)
        if self._ended:
            self._finish(reader)
        resp.content = reader
        resp._body = None
        resp._connection = Lease(self, reader)  # type: ignore[assignment]
        resp._closed = False
        resp._released = False
        if traces:
            resp._traces = orig._traces
        reader.on_eof(resp._response_eof)  # the whole body read: release, as plain
        return resp

    def leave(self, reader: StreamReader) -> None:
        """A caller let go of its response; the last one, mid-body, ends the upstream read."""
        self._readers.pop(reader, None)
        if self._readers or self._ended or self._grace:  # ended: the pump let go already
            return
        self._stop()

    def _grace_over(self) -> None:
        self._grace = False
        if not self._readers and not self._ended and self._pump is not None:
            self._stop()  # every caller left (or none came) before the body ended

    def _stop(self) -> None:
        pump, self._pump = self._pump, None
        self._chunks = None  # callers of the flight yet to join make their own request
        if pump is not None:
            pump.cancel()
        self.orig.close()  # mid-body: the connection cannot be reused
        self.on_end(self)

    def _finish(self, reader: StreamReader) -> None:
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
                while self._readers and all(g._reading_paused for g in self._readers.values()):
                    self._want.clear()
                    await self._want.wait()
                chunk = await content.readany()
                if not chunk:
                    break
                if self._chunks is not None:
                    self._kept += len(chunk)
                    if self._kept > self._keep:
                        self._chunks = None  # late joiners make their own request now
                    else:
                        self._chunks.append(chunk)
                for reader in list(self._readers):
                    reader.feed_data(chunk)
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
        for reader in list(self._readers):
            self._finish(reader)
        if self._error is None:
            self.orig.release()
        else:
            self.orig.close()
