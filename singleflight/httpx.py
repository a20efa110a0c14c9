"""httpx transports that make one upstream request for identical requests in flight."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from types import TracebackType
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "singleflight.httpx needs httpx: pip install singleflight-http[httpx]"
    ) from exc

from singleflight._errors import ReentrancyError
from singleflight._group import Group, Stats, Unshared
from singleflight._http import (
    DEFAULT_IGNORE_HEADERS,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS,
    Progress,
    Snapshot,
    progress_of,
)
from singleflight._http.stale import (
    RefreshError,
    aclose_refreshes,
    close_refreshes,
    refreshing,
    settle_refresh,
    settle_refresh_sync,
)
from singleflight._httpx import (
    Policy,
    Rest,
    Value,
    in_flight,
    read_timeout,
    waited_too_long,
)

__all__ = ("DEFAULT_IGNORE_HEADERS", "AsyncSingleflightTransport", "SingleflightTransport")


async def _aclose(response: httpx.Response) -> None:
    await response.aclose()


def _status(value: Value) -> int:
    return value.status if isinstance(value, Snapshot) else value.value.status_code


class _Shared:
    """The read-only surface both transports share."""

    _policy: Policy

    @property
    def group(self) -> Group[Any]:
        """The Group of this transport's flights; pass it as ``group=`` to share them."""
        return self._policy.group

    @property
    def stats(self) -> Stats:
        """The Group's counters (calls, leaders, followers, cache hits...) and ``bypasses``."""
        return self._policy.stats


class AsyncSingleflightTransport(_Shared, httpx.AsyncBaseTransport):
    """AsyncSingleflightTransport sends one upstream request for identical requests in flight.

    Wraps ``inner`` (default: a new ``httpx.AsyncHTTPTransport()``). Concurrent GET/HEAD requests
    with the same key (method, normalised URL, every header but tracing ones) share the first
    one's response; each caller gets its own ``httpx.Response`` with the raw body as received, and
    ``response.extensions["singleflight"]`` says ``"leader"``, ``"follower"`` or ``"cache"``.
    With ``ttl=`` completed cacheable responses are served from memory until they expire;
    ``stale_ttl=`` serves them ``"stale"`` at once for that much longer while one background
    refresh per key runs (``ttl="headers"``: both times from Cache-Control, capped by
    ``max_ttl``; docs/httpx.md). ``aclose()`` ends the refreshes.

    Responses with ``Set-Cookie``, event streams and bodies above ``max_body_size`` go to their
    leader only (streamed); its followers make their own requests. The leader's own timeout or
    cancellation never fails its followers: one of them makes the request afresh. A follower
    gives up (``httpx.ReadTimeout``) once the shared response has been silent for its own read
    timeout, as a lone request would. Works on asyncio and trio.
    Pass ``group=other_transport.group`` to share flights (and the cache) between transports,
    and ``tier=`` (``singleflight.redis.RedisTier``) to share them between processes.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | str | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[httpx.Request], Hashable | None] | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
        tier: Any = None,
        stale_ttl: float | None = None,
        max_ttl: float | None = None,
    ) -> None:
        if inner is not None and not isinstance(inner, httpx.AsyncBaseTransport):
            raise TypeError(
                f"inner must be an httpx.AsyncBaseTransport, got {type(inner).__name__}; "
                "pass e.g. httpx.AsyncHTTPTransport() (use SingleflightTransport for a sync one)"
            )
        if hasattr(tier, "require"):  # sync tier (issue 14)
            tier.require(True, "AsyncSingleflightTransport")  # sync tier (issue 14)
        self._policy = Policy(
            methods,
            ttl,
            maxsize,
            cache,
            key,
            ignore_headers,
            max_body_size,
            group,
            tier,
            stale_ttl,
            max_ttl,
        )
        self._owns_group = group is None  # its refreshes end with this transport (issue 13)
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()

    @property
    def inner(self) -> httpx.AsyncBaseTransport:
        """The wrapped transport."""
        return self._inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self._policy
        key, reason = policy.key_or_reason(request)
        if key is None:
            policy.bypassed(reason)
            return await self._inner.handle_async_request(request)
        budget = read_timeout(request)
        ran = False
        armed: list[Any] = []  # this caller's deadline while it follows: disarmed if it leads

        async def fetch() -> Value:
            nonlocal ran
            ran = True
            for deadline in armed:  # leading now: httpcore enforces our own timeouts
                deadline.deadline = math.inf
            value = await self._fetch(request, progress_of(policy.group, key))
            if refreshing():  # nobody reads a refresh's own response (issue 13)
                return await settle_refresh(policy.group, key, value, _status(value), _aclose)
            return value

        try:
            # With a tier another process may hold the flight: arm our deadline (issue 14)
            if budget is None or (not in_flight(policy.group, key) and policy.group.tier is None):
                # Nothing to wait for: this call leads at once (fetch runs before the first
                # await), so no deadline is armed. A sync thread may take the lead in between;
                # then the wait is bounded by that leader's own timeouts and re-election.
                value, role = await policy.group.do_with_role(key, fetch)
            else:
                value, role = await policy.follow(request, key, fetch, budget, armed)
        except ReentrancyError:
            # The request was sent from inside its own flight (a hook or an auth flow):
            # waiting would deadlock, so it goes on its own.
            policy.bypassed("reentrant")
            return await self._inner.handle_async_request(request)
        except RefreshError as exc:  # joined a refresh answered 5xx: that is our answer
            value, role = exc.snapshot, "follower"
        except BaseException as exc:
            fresh = policy.failed(exc, request, ran)
            if fresh is exc:
                raise
            raise fresh from exc
        return policy.deliver(request, value, role)

    async def _fetch(self, request: httpx.Request, progress: Progress) -> Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self._policy
        progress.start()  # each step tells waiting followers the request is not silent
        response = await self._inner.handle_async_request(request)
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

    async def aclose(self) -> None:
        """End the background refreshes (``stale_ttl``), then close the inner transport."""
        if self._owns_group:
            await aclose_refreshes(self._policy.group)
        await self._inner.aclose()

    async def __aenter__(self) -> AsyncSingleflightTransport:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        if self._owns_group:
            await aclose_refreshes(self._policy.group)
        await self._inner.__aexit__(exc_type, exc_value, traceback)


class SingleflightTransport(_Shared, httpx.BaseTransport):
    """SingleflightTransport is the thread-safe sync twin of ``AsyncSingleflightTransport``.

    Wraps ``inner`` (default: a new ``httpx.HTTPTransport()``); identical requests from many
    threads share one upstream request; same options and rules. A follower thread waits for its
    leader, whose own timeouts bound the wait (and re-elect a follower when they fire).
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | str | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[httpx.Request], Hashable | None] | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
        tier: Any = None,  # sync tier (issue 14)
        stale_ttl: float | None = None,
        max_ttl: float | None = None,
    ) -> None:
        if hasattr(tier, "require"):  # sync tier (issue 14)
            tier.require(False, "SingleflightTransport")  # sync tier (issue 14)
        if inner is not None and not isinstance(inner, httpx.BaseTransport):
            raise TypeError(
                f"inner must be an httpx.BaseTransport, got {type(inner).__name__}; pass e.g. "
                "httpx.HTTPTransport() (use AsyncSingleflightTransport for an async one)"
            )
        self._policy = Policy(
            methods,
            ttl,
            maxsize,
            cache,
            key,
            ignore_headers,
            max_body_size,
            group,
            tier,
            stale_ttl,
            max_ttl,
        )  # sync tier (issue 14): tier, was None
        self._owns_group = group is None  # its refreshes end with this transport (issue 13)
        self._inner = inner if inner is not None else httpx.HTTPTransport()

    @property
    def inner(self) -> httpx.BaseTransport:
        """The wrapped transport."""
        return self._inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self._policy
        key, reason = policy.key_or_reason(request)
        if key is None:
            policy.bypassed(reason)
            return self._inner.handle_request(request)
        ran = False
        progress = progress_of(policy.group, key)

        def fetch() -> Value:
            nonlocal ran
            ran = True
            value = self._fetch(request, progress)
            if refreshing():  # nobody reads a refresh's own response (issue 13)
                status = _status(value)
                return settle_refresh_sync(policy.group, key, value, status, httpx.Response.close)
            return value

        budget = read_timeout(request)  # a follower keeps its own, as on the async side
        try:
            value, role = policy.follow_sync(key, fetch, budget, progress, lambda: ran)
        except ReentrancyError:
            policy.bypassed("reentrant")
            return self._inner.handle_request(request)
        except RefreshError as exc:  # joined a refresh answered 5xx: that is our answer
            value, role = exc.snapshot, "follower"
        except BaseException as exc:
            fresh = policy.failed(exc, request, ran)
            if isinstance(exc, TimeoutError) and not ran:  # our own wait: do_sync_bounded
                raise waited_too_long(request, budget or 0.0) from exc
            if fresh is exc:
                raise
            raise fresh from exc
        return policy.deliver(request, value, role)

    def _fetch(self, request: httpx.Request, progress: Progress) -> Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self._policy
        progress.start()
        response = self._inner.handle_request(request)
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

    def close(self) -> None:
        """End the background refreshes (``stale_ttl``), then close the inner transport."""
        if self._owns_group:
            close_refreshes(self._policy.group)
        self._inner.close()

    def __enter__(self) -> SingleflightTransport:
        self._inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        if self._owns_group:
            close_refreshes(self._policy.group)
        self._inner.__exit__(exc_type, exc_value, traceback)
