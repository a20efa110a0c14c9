"""One request's way through its flight (httpx): lead (send, read the body) or follow in time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio
import httpx

from singleflight._errors import ReentrancyError
from singleflight._group import Group, Role, Unshared
from singleflight._http import ClientClosed, Deadline, Progress, progress_of
from singleflight._http.invalidation import Ticket
from singleflight._http.live import live_of, publish
from singleflight._http.snapshot import Snapshot
from singleflight._http.stale import (
    RefreshError,
    refreshing,
    settle_refresh,
    settle_refresh_sync,
)
from singleflight._httpx import Policy, Rest, Value, read_timeout, waited_too_long
from singleflight._httpx_live import Live, where
from singleflight._observe import note_call

__all__ = ("AsyncSender", "SyncSender")


class AsyncSender:
    """AsyncSender sends one request through ``policy``'s Group with ``inner``, for asyncio/trio.

    ``send`` is the whole path: the key (or straight through), lead or follow, this caller's
    own Response, returned once. The leader's work (``_lead``) sends with ``inner`` and reads
    the raw body into a Snapshot; a follower waits within its own read timeout (``_follow``).
    ``closed`` is set when the transport closes: a leader failing after that ends only itself.
    """

    __slots__ = ("closed", "inner", "policy")

    def __init__(self, policy: Policy, inner: httpx.AsyncBaseTransport) -> None:
        self.policy = policy
        self.inner = inner
        self.closed = False

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self.policy
        key, reason = policy.key_or_reason(request)
        if key is None:
            policy.bypassed(reason)
            response = await self.inner.handle_async_request(request)
            policy.wrote(request, response)
            return response
        budget = read_timeout(request)
        live: Live | None = live_of(policy.group, key)
        if live is not None:  # a live body still admitting joiners: follow it from byte 0
            late = live.respond(request, "follower", budget, None, here())
            if late is not None:
                policy.joined += 1
                note_call("follower", what="request")
                return late
        ran = False
        armed: list[Any] = []  # this caller's deadline while it follows: disarmed if it leads
        mine: dict[str, Any] = {}  # the extensions of the response this caller received itself

        async def fetch() -> Value:
            nonlocal ran
            ran = True
            for deadline in armed:  # leading now: httpcore enforces our own timeouts
                deadline.deadline = math.inf
            value = await self._lead(request, key, progress_of(policy.group, key), mine)
            if refreshing():  # nobody reads a refresh's own response (issue 13)
                return await settle_refresh(policy.group, key, value, _status(value), _aclose)
            return value

        try:
            # With a tier another process may hold the flight: arm our deadline (issue 14).
            if budget is None or (not in_flight(policy.group, key) and policy.group.tier is None):
                # Nothing to wait for: this call leads at once (fetch runs before the first
                # await), so no deadline is armed. A sync thread may take the lead in between;
                # then the wait is bounded by that leader's own timeouts and re-election.
                value, role = await policy.group.do_with_role(key, fetch)
            else:
                value, role = await self._follow(request, key, fetch, budget, armed)
        except ReentrancyError:
            # The request was sent from inside its own flight (a hook or an auth flow):
            # waiting would deadlock, so it goes on its own.
            policy.bypassed("reentrant")
            return await self.inner.handle_async_request(request)
        except RefreshError as exc:  # joined a refresh answered 5xx: that is our answer
            return policy.deliver(request, exc.snapshot, "follower", mine)
        except BaseException as exc:
            fresh = policy.failed(exc, request, ran)
            if fresh is exc:
                raise
            if fresh is not exc.__cause__:
                raise fresh from exc
            own = fresh  # a closed client's leader: its own error, raised below, unchained
        else:
            if type(value) is Live:
                own_response = value.respond(request, role, budget, mine, here())
                if own_response is None:  # too late to join (or another loop): its own request
                    policy.bypassed("late")
                    return await self.inner.handle_async_request(request)
                note_call(role, what="request")
                return own_response
            return policy.deliver(request, value, role, mine)
        raise own

    async def _lead(
        self, request: httpx.Request, key: Hashable, progress: Progress, mine: dict[str, Any]
    ) -> Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self.policy
        ticket = policy.ticket(key) if policy.caching else None  # for write invalidation
        try:
            value = await self._read(request, key, ticket, progress, mine)
        except Exception as exc:
            policy.end(key, ticket)
            if self.closed:  # our client closed under us: only our own attempt ends
                raise ClientClosed("the leader's client was closed") from exc
            raise
        except BaseException:
            policy.end(key, ticket)
            raise
        if ticket is None or type(value) is Live:
            return value  # (a Live value's ticket ends with its body)
        policy.end(key, ticket)
        return policy.landed(ticket, value)

    async def _read(
        self,
        request: httpx.Request,
        key: Hashable,
        ticket: Ticket | None,
        progress: Progress,
        mine: dict[str, Any],
    ) -> Value:
        policy = self.policy
        progress.start()  # each step tells waiting followers the request is not silent
        response = await self.inner.handle_async_request(request)
        mine.update(response.extensions)  # this caller's own response: every extension kept
        progress.advance()
        kept = False  # True once the live response is handed on, still open
        try:
            if policy.unshared(request, response):
                kept = True
                return Unshared(response)
            limit = policy.options.max_body_size
            chunks: list[bytes] = []
            size = 0
            # Iterate .stream itself: aiter_raw() refuses pre-read (MockTransport) responses,
            # and aread() decodes, which would make every caller's client decode twice.
            if response.is_stream_consumed and not isinstance(response.stream, httpx.ByteStream):
                return policy.decoded(request, response)  # a one-shot stream, read elsewhere
            # A refresh buffers its body (issue 13): nobody would read a live one.
            live = None if refreshing() else policy.live(request, response, key, ticket, sync=False)
            if live is not None:
                kept = True
                publish(policy.group, key, live)  # late joiners find it
                return live
            rest = response.stream.__aiter__()  # type: ignore[union-attr]
            async for chunk in rest:
                chunks.append(chunk)
                size += len(chunk)
                progress.advance(len(chunk))
                if size > limit:
                    kept = True
                    return policy.oversized(response, Rest(chunks, rest, response))
            return policy.snapshot(request, response, b"".join(chunks))
        finally:
            if not kept:
                await response.aclose()

    async def _follow(
        self,
        request: httpx.Request,
        key: Hashable,
        fetch: Callable[[], Awaitable[Value]],
        budget: float,
        armed: list[Any],
    ) -> tuple[Value, Role]:
        """Follow the flight of ``key`` until it has been silent for ``budget`` seconds.

        Then ``httpx.ReadTimeout``, bound to ``request``. The deadline goes into ``armed`` for
        ``fetch`` to disarm should this caller be handed the lead.
        """
        progress = progress_of(self.policy.group, key)
        if on_asyncio():
            # A timer handle, not anyio.CancelScope: ten times cheaper (bench_httpx.py).
            deadline = Deadline(budget, progress)
            armed.append(deadline)
            try:
                return await self.policy.group.do_with_role(key, fetch)
            except asyncio.CancelledError:
                if not deadline.expired():
                    raise
                raise waited_too_long(request, budget) from None
            finally:
                deadline.deadline = math.inf
        while True:  # trio: a cancel scope per read timeout; rejoin while the response moves
            mark = progress.mark()
            with anyio.CancelScope(deadline=anyio.current_time() + budget) as scope:
                armed[:] = [scope]
                result = await self.policy.group.do_with_role(key, fetch)
            if not scope.cancelled_caught:
                return result
            if progress.mark() == mark:
                raise waited_too_long(request, budget)
            self.policy.rejoins += 1


class SyncSender:
    """SyncSender is AsyncSender for threads: a follower thread waits within its read timeout."""

    __slots__ = ("closed", "inner", "policy")

    def __init__(self, policy: Policy, inner: httpx.BaseTransport) -> None:
        self.policy = policy
        self.inner = inner
        self.closed = False

    def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self.policy
        key, reason = policy.key_or_reason(request)
        if key is None:
            policy.bypassed(reason)
            response = self.inner.handle_request(request)
            policy.wrote(request, response)
            return response
        budget = read_timeout(request)  # a follower keeps its own, as on the async side
        live: Live | None = live_of(policy.group, key)
        if live is not None:  # a live body still admitting joiners: follow it from byte 0
            late = live.respond(request, "follower", budget, None, None)
            if late is not None:
                policy.joined += 1
                note_call("follower", what="request")
                return late
        ran = False
        progress = progress_of(policy.group, key)
        mine: dict[str, Any] = {}  # the extensions of the response this caller received itself

        def fetch() -> Value:
            nonlocal ran
            ran = True
            value = self._lead(request, key, progress, mine)
            if refreshing():  # nobody reads a refresh's own response (issue 13)
                status = _status(value)
                return settle_refresh_sync(policy.group, key, value, status, httpx.Response.close)
            return value

        try:
            value, role = self._follow(key, fetch, budget, progress, lambda: ran)
        except ReentrancyError:
            policy.bypassed("reentrant")
            return self.inner.handle_request(request)
        except RefreshError as exc:  # joined a refresh answered 5xx: that is our answer
            return policy.deliver(request, exc.snapshot, "follower", mine)
        except BaseException as exc:
            fresh = policy.failed(exc, request, ran)
            if isinstance(exc, TimeoutError) and not ran:  # our own wait: do_sync_bounded
                raise waited_too_long(request, budget or 0.0) from exc
            if fresh is exc:
                raise
            if fresh is not exc.__cause__:
                raise fresh from exc
            own = fresh  # a closed client's leader: its own error, raised below, unchained
        else:
            if type(value) is Live:
                own_response = value.respond(request, role, budget, mine, None)
                if own_response is None:  # too late to join (or an async flight): its own request
                    policy.bypassed("late")
                    return self.inner.handle_request(request)
                note_call(role, what="request")
                return own_response
            return policy.deliver(request, value, role, mine)
        raise own

    def _lead(
        self, request: httpx.Request, key: Hashable, progress: Progress, mine: dict[str, Any]
    ) -> Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self.policy
        ticket = policy.ticket(key) if policy.caching else None  # for write invalidation
        try:
            value = self._read(request, key, ticket, progress, mine)
        except Exception as exc:
            policy.end(key, ticket)
            if self.closed:  # our client closed under us: only our own attempt ends
                raise ClientClosed("the leader's client was closed") from exc
            raise
        except BaseException:
            policy.end(key, ticket)
            raise
        if ticket is None or type(value) is Live:
            return value  # (a Live value's ticket ends with its body)
        policy.end(key, ticket)
        return policy.landed(ticket, value)

    def _read(
        self,
        request: httpx.Request,
        key: Hashable,
        ticket: Ticket | None,
        progress: Progress,
        mine: dict[str, Any],
    ) -> Value:
        policy = self.policy
        progress.start()
        response = self.inner.handle_request(request)
        mine.update(response.extensions)
        progress.advance()
        kept = False
        try:
            if policy.unshared(request, response):
                kept = True
                return Unshared(response)
            limit = policy.options.max_body_size
            chunks: list[bytes] = []
            size = 0
            if response.is_stream_consumed and not isinstance(response.stream, httpx.ByteStream):
                return policy.decoded(request, response)  # a one-shot stream, read elsewhere
            live = None if refreshing() else policy.live(request, response, key, ticket, sync=True)
            if live is not None:
                kept = True
                publish(policy.group, key, live)  # late joiners find it
                return live
            rest = iter(response.stream)  # type: ignore[arg-type]
            for chunk in rest:
                chunks.append(chunk)
                size += len(chunk)
                progress.advance(len(chunk))
                if size > limit:
                    kept = True
                    return policy.oversized(response, Rest(chunks, rest, response))
            return policy.snapshot(request, response, b"".join(chunks))
        finally:
            if not kept:
                response.close()

    def _follow(
        self,
        key: Hashable,
        fetch: Callable[[], Value],
        budget: float | None,
        progress: Progress,
        ran: Callable[[], bool],
    ) -> tuple[Value, Role]:
        """``do_sync_bounded`` for a thread; a follower rejoins while the response moves."""
        while True:
            mark = progress.mark()
            try:
                return self.policy.group.do_sync_bounded(budget, key, fetch)
            except TimeoutError:
                if ran() or progress.mark() == mark:
                    raise
                # Not silent for a whole read timeout: the flight goes on, and we rejoin it.
                self.policy.rejoins += 1


async def _aclose(response: httpx.Response) -> None:
    await response.aclose()


def _status(value: Value) -> int:
    """The status of a refresh's response (a Snapshot, or an unshared live response)."""
    if isinstance(value, Snapshot):
        return value.status
    return value.status if isinstance(value, Live) else value.value.status_code


def in_flight(group: Group[Any], key: Hashable) -> bool:
    """Is ``key`` in flight now? A hint (the answer may change at once); True if unknown."""
    return key in group


def here() -> object:
    """Where this async caller reads a Live body: its asyncio loop, or its trio run."""
    return where(False)


def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio (httpx runs on it through anyio)
        return False
    return True
