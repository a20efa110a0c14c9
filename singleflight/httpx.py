"""httpx transports that make one upstream request for identical requests in flight."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, MutableMapping
from types import TracebackType
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'singleflight.httpx needs httpx: pip install "singleflight-http[httpx]"'
    ) from exc

from singleflight._group import Group, Stats
from singleflight._http import (
    DEFAULT_IGNORE_HEADERS,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS,
    http_group,
)
from singleflight._http.stale import aclose_refreshes, close_refreshes
from singleflight._httpx import Policy, sender_identity
from singleflight._httpx_flight import AsyncSender, SyncSender

__all__ = (
    "DEFAULT_IGNORE_HEADERS",
    "AsyncSingleflightTransport",
    "SingleflightTransport",
    "http_group",
)


def _wrong_twin(this: str, client: str, twin: str) -> TypeError:
    return TypeError(
        f"{this} is for httpx.{'AsyncClient' if client == 'httpx.Client' else 'Client'}, "
        f"but it was given to {client}: pass {client}(transport={twin}(...)) instead"
    )


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
    With ``ttl=`` completed cacheable responses are served from memory until they expire.

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
        identity = sender_identity(inner, built=inner is None)
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
            identity,
            stale_ttl,
            max_ttl,
        )
        self._owns_group = group is None  # its refreshes end with this transport (issue 13)
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._sender = AsyncSender(self._policy, self._inner)
        # httpx calls handle_async_request: go straight to the Sender, no coroutine in between.
        self.handle_async_request = self._sender.send  # type: ignore[method-assign]

    @property
    def inner(self) -> httpx.AsyncBaseTransport:
        """The wrapped transport."""
        return self._inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        return await self._sender.send(request)

    def __enter__(self) -> None:
        """An async transport inside ``httpx.Client``: say which twin to use."""
        raise _wrong_twin("AsyncSingleflightTransport", "httpx.Client", "SingleflightTransport")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """An async transport inside ``httpx.Client``: say which twin to use."""
        raise _wrong_twin("AsyncSingleflightTransport", "httpx.Client", "SingleflightTransport")

    async def aclose(self) -> None:
        """End the background refreshes (``stale_ttl``), then close the inner transport."""
        self._sender.closed = True
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
        self._sender.closed = True
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
        identity = sender_identity(inner, built=inner is None)
        self._policy = Policy(
            methods,
            ttl,
            maxsize,
            cache,
            key,
            ignore_headers,
            max_body_size,
            group,
            tier,  # sync tier (issue 14)
            identity,
            stale_ttl,
            max_ttl,
        )
        self._owns_group = group is None  # its refreshes end with this transport (issue 13)
        # A group= brings its own tier: it must serve sync work (issue 14).
        shared_tier = self._policy.group.tier
        require = getattr(shared_tier, "require", None)
        if require is not None:
            require(False, "SingleflightTransport(group=...)")
        elif shared_tier is not None and not hasattr(shared_tier, "run_sync"):
            raise ValueError(
                "group= has a tier, which serves async work only: SingleflightTransport cannot "
                "use it; use AsyncSingleflightTransport(tier=...), a sync tier "
                "(RedisTier(redis.Redis(...))), or a group built without tier="
            )
        self._inner = inner if inner is not None else httpx.HTTPTransport()
        self._sender = SyncSender(self._policy, self._inner)
        self.handle_request = self._sender.send  # type: ignore[method-assign]

    @property
    def inner(self) -> httpx.BaseTransport:
        """The wrapped transport."""
        return self._inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        return self._sender.send(request)

    async def __aenter__(self) -> None:
        """A sync transport inside ``httpx.AsyncClient``: say which twin to use."""
        raise _wrong_twin(
            "SingleflightTransport", "httpx.AsyncClient", "AsyncSingleflightTransport"
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """A sync transport inside ``httpx.AsyncClient``: say which twin to use."""
        raise _wrong_twin(
            "SingleflightTransport", "httpx.AsyncClient", "AsyncSingleflightTransport"
        )

    def close(self) -> None:
        """End the background refreshes (``stale_ttl``), then close the inner transport."""
        self._sender.closed = True
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
        self._sender.closed = True
        if self._owns_group:
            close_refreshes(self._policy.group)
        self._inner.__exit__(exc_type, exc_value, traceback)
