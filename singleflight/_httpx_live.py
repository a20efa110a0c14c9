"""Each httpx caller's own live response over one flight's Log: one upstream read, many readers.

A leader whose response body has no announced length (chunked: an NDJSON watch, a log tail)
does not buffer it: its flight's value is a ``Live`` (status, headers, a ``_http.live.Log``, and a
puller of the upstream body). Every caller gets its own ``httpx.Response`` whose stream is a
cursor into the Log: it replays what arrived, then follows new chunks as they come, at its own
pace. One pull of the upstream at a time, on behalf of whichever reader needs the next chunk:
on asyncio in a task of its own that no reader's cancellation reaches (httpcore's body
iterators close the response on any cancellation: truncation posing as EOF), on trio in a
system task, in threads by the thread that lacks a chunk, outside the lock. Each reader waits
within its own read timeout; an upstream error reaches each reader where it reads. When the
last reader leaves before the end, the upstream response is closed; at the end it is closed
(its connection pooled) and, if the group caches and the body is complete and cacheable,
stored as a Snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import Any, final

import httpx

from singleflight._http import Snapshot
from singleflight._http.invalidation import Ticket, flights_of
from singleflight._http.live import Log, Reader, unpublish

__all__ = ("AsyncCursor", "Live", "SyncCursor", "where")


def where(sync: bool) -> object:
    """Where a reader runs: threads (``None``: a sync transport, whatever loop its thread may
    be running), or the asyncio loop (trio: the run's token) of an async one. A Live body is
    read in one place only."""
    if sync:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio, through anyio
        import trio

        return trio.lowlevel.current_trio_token()


def fresh(exc: BaseException) -> BaseException:
    """A new exception of the same type for this reader (httpx binds it to the reader's request)."""
    if isinstance(exc, httpx.HTTPError):
        try:
            return type(exc)(str(exc))
        except Exception:
            return exc
    return exc


@final
class Live:
    """A flight's live response: what every caller's own Response is built from.

    ``store``: the Group to cache the whole body in at its end (None: no cache); ``ticket``:
    the write-invalidation ticket of the flight (a write meanwhile: never stored).
    """

    __slots__ = (
        "_ended",
        "_pulling",
        "_scope",
        "_task",
        "_trio",
        "context",
        "extensions",
        "group",
        "headers",
        "http_version",
        "it",
        "key",
        "log",
        "reason",
        "request_headers",
        "status",
        "store",
        "ticket",
        "upstream",
    )

    def __init__(
        self,
        upstream: httpx.Response,
        log: Log,
        *,
        group: Any,
        key: Hashable,
        store: bool,
        ticket: Ticket | None,
        request_headers: list[tuple[bytes, bytes]],
        extensions: dict[str, Any],
        context: object,
    ) -> None:
        self.status = upstream.status_code
        self.reason = upstream.reason_phrase
        self.http_version = upstream.http_version
        self.headers = tuple(upstream.headers.raw)
        self.extensions = extensions
        self.upstream = upstream
        self.log = log
        self.group, self.key, self.store, self.ticket = group, key, store, ticket
        self.request_headers = request_headers
        self.context = context  # where() of the leader: its loop, or None for threads
        if self.context is None:
            self.it: Any = iter(upstream.stream)  # type: ignore[arg-type]
        else:
            self.it = upstream.stream.__aiter__()  # type: ignore[union-attr]
        self._task: Any = None  # the pull in progress: an asyncio Task (trio: its done Event)
        self._trio = context is not None and not isinstance(context, asyncio.AbstractEventLoop)
        self._scope: Any = None  # trio: the pull's cancel scope, while one runs
        self._pulling = False
        self._ended = False

    def respond(
        self,
        request: httpx.Request,
        role: str,
        timeout: float | None,
        own: dict[str, Any] | None,
        context: object,
    ) -> httpx.Response | None:
        """This caller's own Response, reading from byte 0; None if it can no longer join.

        ``context``: ``where()`` of this caller; another loop, or threads for an async body
        (and the reverse), cannot read it: None, and the caller makes its own request.
        """
        if context is not self.context:
            return None  # another loop, or threads: it makes its own request
        reader = self.log.join()
        if reader is None:
            return None
        stream: Any = (
            SyncCursor(self, reader, timeout)
            if self.context is None
            else AsyncCursor(self, reader, timeout)
        )
        extensions = {
            **self.extensions,
            "http_version": self.http_version.encode("ascii"),
            "reason_phrase": self.reason.encode("ascii", "replace"),
        }
        if own:
            extensions.update(own)
        extensions["singleflight"] = role
        return httpx.Response(
            self.status,
            headers=list(self.headers),
            stream=stream,
            extensions=extensions,
            request=request,
        )

    # -- the upstream's end (once) -------------------------------------------------------

    def _finish(self) -> None:
        """Bookkeeping at the end: unpublish, end the ticket, cache the whole body if allowed."""
        if self._ended:
            return
        self._ended = True
        unpublish(self.group, self.key, self)
        if self.ticket is not None:
            flights_of(self.group).end(self.key, self.ticket)
            if self.ticket.stale:
                return
        body = self.log.body()
        cache = self.group.cache
        if not self.store or body is None or cache is None:
            return
        snap = Snapshot.build(
            self.status,
            self.reason,
            self.http_version,
            self.headers,
            body,
            request_headers=self.request_headers,
        )
        if snap.cacheable:
            snap = dataclasses.replace(snap, extensions=self.extensions)
            self.group.cache_put(self.key, snap)  # under the Group's own cache lock

    # -- asyncio -------------------------------------------------------------------------

    async def _pull(self) -> None:
        try:
            chunk = await self.it.__anext__()
        except StopAsyncIteration:
            self.log.finish()
        except asyncio.CancelledError:  # the last reader left: the log is closed already
            await self.upstream.aclose()
            self._finish()
            raise
        except Exception as exc:
            self.log.finish(exc)
        else:
            if chunk:
                self.log.append(chunk)
            return
        finally:
            self._task = None
        await self.upstream.aclose()  # read to its end (pooled) or failed (closed)
        self._finish()

    async def more(self, timeout: float | None) -> None:
        """Wait (within ``timeout``) until the next chunk arrived or the body ended."""
        if self._trio:
            return await self._more_trio(timeout)
        task = self._task
        if task is None:
            task = self._task = asyncio.get_running_loop().create_task(self._pull())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(
                f"no new bytes of the shared response in {timeout}s (this request's read timeout)"
            ) from None

    async def leave(self, reader: Reader) -> None:
        if not self.log.leave(reader):
            return  # others read on, or the body ended: nothing to close here
        # The last reader left before the end: stop the pull, close the upstream.
        if self._trio:
            if self._scope is not None:
                self._scope.cancel()  # the pull closes the upstream
                return
        else:
            task = self._task
            if task is not None:
                task.cancel()  # its handler closes the upstream
                await asyncio.gather(task, return_exceptions=True)
                return
        await self.upstream.aclose()
        self._finish()

    # -- trio: the pull is a system task (no reader's cancel scope reaches it) ------------

    async def _pull_trio(self, done: Any) -> None:
        import trio

        ended = True
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    chunk = await self.it.__anext__()
                except StopAsyncIteration:
                    self.log.finish()
                except Exception as exc:
                    self.log.finish(exc)
                else:
                    ended = False
                    if chunk:
                        self.log.append(chunk)
        finally:
            self._scope = None
            self._task = None
            done.set()
        if ended or scope.cancelled_caught:  # read to its end, failed, or nobody is left
            try:
                await self.upstream.aclose()
            except Exception:  # a system task must not fail the run
                pass
            self._finish()

    async def _more_trio(self, timeout: float | None) -> None:
        import trio

        done = self._task
        if done is None:
            done = self._task = trio.Event()
            trio.lowlevel.spawn_system_task(self._pull_trio, done)
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            await done.wait()
        if scope.cancelled_caught:
            raise httpx.ReadTimeout(
                f"no new bytes of the shared response in {timeout}s (this request's read timeout)"
            )

    # -- threads -------------------------------------------------------------------------

    def more_sync(self, timeout: float | None) -> None:
        log = self.log
        with log.cond:
            mark = log.mark()
            if self._pulling:  # another reader pulls: wait for what it brings
                if not log.cond.wait_for(
                    lambda: log.mark() != mark or log.ended or not self._pulling, timeout
                ):
                    raise httpx.ReadTimeout(
                        f"no new bytes of the shared response in {timeout}s "
                        "(this request's read timeout)"
                    )
                return
            self._pulling = True
        ended = False
        try:
            chunk = next(self.it)
        except StopIteration:
            log.finish()
            ended = True
        except Exception as exc:
            log.finish(exc)
            ended = True
        else:
            if chunk:
                log.append(chunk)
        finally:
            with log.cond:
                self._pulling = False
                log.cond.notify_all()
        if ended:
            self.upstream.close()
            self._finish()

    def leave_sync(self, reader: Reader) -> None:
        if self.log.leave(reader):
            self.upstream.close()
            self._finish()


class _Cursor:
    __slots__ = ("_live", "_reader", "_timeout")

    def __init__(self, live: Live, reader: Reader, timeout: float | None) -> None:
        self._live, self._reader, self._timeout = live, reader, timeout

    def _next(self) -> bytes | None:
        """The next chunk, None to wait for more; raises the upstream's error, b"" at the end."""
        log = self._live.log
        chunk = log.take(self._reader)
        if chunk is not None:
            return chunk
        if log.error is not None:
            raise fresh(log.error)
        if log.done:
            return b""
        if log.closed:
            raise httpx.StreamClosed()
        return None


@final
class AsyncCursor(_Cursor, httpx.AsyncByteStream):
    """One asyncio caller's view of a Live body."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = self._next()
            if chunk is None:
                await self._live.more(self._timeout)
            elif chunk:
                yield chunk
            else:
                return

    async def aclose(self) -> None:
        await self._live.leave(self._reader)


@final
class SyncCursor(_Cursor, httpx.SyncByteStream):
    """One thread's view of a Live body."""

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._next()
            if chunk is None:
                self._live.more_sync(self._timeout)
            elif chunk:
                yield chunk
            else:
                return

    def close(self) -> None:
        self._live.leave_sync(self._reader)
