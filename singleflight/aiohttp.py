"""aiohttp client middleware: one upstream request for concurrent identical GET/HEAD requests."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, MutableMapping
from typing import Any, Final, cast

try:
    from aiohttp import ClientRequest, ClientResponse, SocketTimeoutError, hdrs
    from aiohttp.client_middlewares import ClientHandlerType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "singleflight.aiohttp needs aiohttp >= 3.12 (client middlewares): "
        "pip install singleflight-http[aiohttp]"
    ) from exc

from singleflight._aiohttp import (
    fresh_error,
    has_body,
    read_at_most,
    respond as _respond,  # benchmarks/bench_aiohttp.py uses it
    sock_read,
)
from singleflight._errors import ReentrancyError
from singleflight._group import Group, Stats, Unshared
from singleflight._http import (
    DEFAULT_IGNORE_HEADERS,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS,
    Deadline,
    HTTPOptions,
    Snapshot,
    bypass_reason,
    progress_of,
    unshareable_reason,
)
from singleflight._http.stale import RefreshError, refreshing, settle_refresh
from singleflight._observe import note_call

__all__ = ("SingleflightMiddleware", "served")

# How each response this middleware returned was served. Weak keys: the entry dies with the
# response, and nothing is added to aiohttp's objects or to the response headers.
_served: weakref.WeakKeyDictionary[ClientResponse, str] = weakref.WeakKeyDictionary()


async def _close(response: ClientResponse) -> None:
    response.close()


def served(response: ClientResponse) -> str | None:
    """served says how ``response`` was served: ``"leader"``, ``"follower"`` or ``"cache"``.

    ``stale_ttl=`` adds ``"stale"``; a Redis tier adds ``"shared"``, ``"remote"`` and
    ``"stale"``. None means the middleware let the request pass straight through (a method
    not coalesced, a request body, an upgrade...) or never saw the response.
    """
    return _served.get(response)


class SingleflightMiddleware:
    """SingleflightMiddleware sends one upstream request for concurrent identical requests.

    Use it as ``aiohttp.ClientSession(middlewares=(SingleflightMiddleware(),))``. The first
    caller of a request leads and makes it; identical requests that arrive while it is in flight
    wait for it, and each caller gets its own ``ClientResponse`` (status, headers, body, ``url``,
    its own ``request_info``; ``read()``, ``text()``, ``json()``, ``raise_for_status()`` and
    ``async with`` work as usual). ``served(response)`` tells how a response was served.

    Keys, bypass rules and what may be shared or cached are ``singleflight._http``'s, the same as
    the httpx transport's (docs/aiohttp.md): credentials separate callers, requests with a body
    pass through, a response with ``Set-Cookie``, an event stream or a body above
    ``max_body_size`` goes to its leader only. The session's ``auto_decompress`` is in the key.
    aiohttp calls a middleware once per redirect hop and per retry: each hop coalesces on its own.
    The leader's own timeout or cancellation re-elects a waiting caller; other errors and every
    status reach all the callers of the flight, and are never cached.

    Args:
        methods: methods to coalesce; others pass straight through.
        ttl: keep cacheable responses this many seconds after they complete (None: no cache).
        maxsize: how many responses the TTL cache holds.
        cache: a MutableMapping to use as the cache instead of ``ttl``/``maxsize``.
        key: ``key(request) -> hashable`` replaces the default key (None: pass through).
        ignore_headers: request headers left out of the key (default: tracing headers).
        max_body_size: larger bodies are streamed to their leader, never buffered to share.
        group: a ``singleflight.Group`` to share flights with other adapters or sessions; give it
            ``reelect_on=(asyncio.TimeoutError,)`` so a leader's socket timeout re-elects too.
        tier: a shared tier (``singleflight.redis.RedisTier``) for one flight across processes.
        stale_ttl: with ``ttl``: for this many more seconds answer at once with the expired
            response (``served`` says ``"stale"``) while one refresh per key runs in the
            background (docs/aiohttp.md); ``ttl="headers"`` takes both from Cache-Control.
        max_ttl: with ``ttl="headers"``: the most seconds either time may be.
    """

    __slots__ = ("_bypasses", "_group", "_judge_cacheable", "_options")

    def __init__(
        self,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | str | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[ClientRequest], Hashable | None] | None = None,
        ignore_headers: Collection[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
        tier: Any = None,
        stale_ttl: float | None = None,
        max_ttl: float | None = None,
    ) -> None:
        if hasattr(tier, "require"):  # sync tier (issue 14)
            tier.require(True, "SingleflightMiddleware")  # sync tier (issue 14)
        self._options = HTTPOptions.build(
            methods=methods,
            ttl=ttl,
            maxsize=maxsize,
            cache=cache,
            key=key,
            ignore_headers=ignore_headers,
            max_body_size=max_body_size,
            stale_ttl=stale_ttl,
            max_ttl=max_ttl,
        )
        # asyncio.TimeoutError covers the leader's sock_read/sock_connect timeouts
        # (ServerTimeoutError); its total timeout arrives as a cancellation, which always
        # re-elects.
        self._group = self._options.make_group(
            group=group, tier=tier, reelect_on=(asyncio.TimeoutError,)
        )
        # Only a cache or a tier reads Snapshot.cacheable; without them, skip judging it.
        self._judge_cacheable = (
            group is not None or tier is not None or self._group.cache is not None
        )
        self._bypasses = 0

    @property
    def group(self) -> Group[Any]:
        """The Group that holds this middleware's flights and cache."""
        return self._group

    @property
    def stats(self) -> Stats:
        """The Group's counters (calls, leaders, followers, cache hits...) and ``bypasses``."""
        return dataclasses.replace(self._group.stats, bypasses=self._bypasses)

    def __repr__(self) -> str:
        return f"SingleflightMiddleware(group={self._group!r})"

    async def __call__(self, req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Serve ``req``: lead its flight, follow one, hit the cache, or pass straight through."""
        key, reason = self._key_or_reason(req)
        if key is None:
            return await self._bypass(reason, req, handler)
        own: ClientResponse | None = None  # the response of our own upstream call, if we made one
        ran = False
        deadline: Deadline | None = None
        mine: SocketTimeoutError | None = None  # a follower's own timeout

        async def fetch() -> Snapshot | Unshared[ClientResponse]:
            nonlocal own, ran
            ran = True
            if deadline is not None:  # leading now: aiohttp enforces our own timeouts
                deadline.deadline = math.inf
            progress = progress_of(self._group, key)
            progress.start()
            if refreshing() and req.session.closed:  # issue 13: the session ended first
                raise RuntimeError("the session is closed: no refresh")
            own = resp = await handler(req)
            progress.advance()  # followers see the request is not silent: headers,
            progress.follow(resp.content)  # then every byte the connection feeds the body
            value = await self._share(req, resp)
            if refreshing():  # nobody reads a refresh's own response (issue 13)
                if type(value) is not Unshared:
                    resp.release()  # read to the end: its connection goes back to the pool
                return await settle_refresh(self._group, key, value, resp.status, _close)
            return value

        # A follower waits until the shared request is silent for its own sock_read: that request
        # runs on the leader's timeouts, and each re-elected leader's would add up otherwise.
        # With a tier another process may hold the flight: arm our deadline anyway (issue 14)
        budget = sock_read() if key in self._group or self._group.tier is not None else None
        try:
            if budget is None:
                value, role = await self._group.do_with_role(key, fetch)
            else:
                deadline = Deadline(budget, progress_of(self._group, key))
                try:
                    value, role = await self._group.do_with_role(key, fetch)
                except asyncio.CancelledError:
                    if not deadline.expired():
                        raise
                    mine = SocketTimeoutError(
                        f"waited {budget}s (this request's sock_read timeout) for an identical "
                        "request in flight"
                    )
                    raise mine from None
                finally:
                    deadline.deadline = math.inf
        except ReentrancyError:  # sent from inside its own flight: waiting would deadlock
            return await self._bypass("reentrant", req, handler)
        except RefreshError as exc:  # joined a refresh answered 5xx: that is our answer
            value, role = exc.snapshot, "follower"
        except BaseException as exc:
            note_call("leader" if ran else "follower", what="request")
            fresh = exc if ran or exc is mine else fresh_error(exc, req)
            if fresh is exc:
                raise
            raise fresh from exc
        note_call(role, what="request")
        # The caller that made the upstream request keeps aiohttp's own response (traces,
        # connection bookkeeping and all); everyone else gets a copy built from the Snapshot.
        resp = own if own is not None else _respond(req, value)
        _served[resp] = role
        return resp

    async def _bypass(
        self, reason: str, req: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:
        self._bypasses += 1  # plain += under the GIL, like the Group's counters
        note_call("bypass", reason, what="request")
        return await handler(req)

    def _key(self, req: ClientRequest) -> Hashable | None:
        return self._key_or_reason(req)[0]

    def _key_or_reason(self, req: ClientRequest) -> tuple[Hashable | None, str]:
        """``(key, "")`` to coalesce ``req``, or ``(None, why)`` to let it through."""
        options = self._options
        method = req.method
        headers: Any = req.headers.items()
        reason = bypass_reason(method, headers, methods=options.methods, has_body=has_body(req))
        if reason is not None:
            return None, reason
        # aiohttp decodes Content-Encoding in its parser when the session says so: a decoded
        # body must never reach a session that expects raw bytes, nor the reverse.
        extra = _DECODED if req.session.auto_decompress else _RAW
        url = req.url
        if url.raw_user or url.raw_password:  # the session moves these to Authorization first
            key = options.key_for(req, method, str(url), headers, extra)
        else:
            # yarl has normalised it already (lower-case scheme and host, no default port, no
            # fragment), except that a bare "http://host" keeps its empty path.
            text = str(url)
            if text.count("/") == 2:
                text += "/"
            key = options.key_for(req, method, text, headers, extra, userinfo="")
        return (None, "key") if key is None else (key, "")

    async def _share(
        self, req: ClientRequest, resp: ClientResponse
    ) -> Snapshot | Unshared[ClientResponse]:
        """Buffer the leader's response into a Snapshot, or keep it for the leader alone."""
        # A HEAD (or 204/304) response has no body, whatever its Content-Length announces.
        bodyless = req.method == hdrs.METH_HEAD or resp.status in (204, 304)
        limit = sys.maxsize if bodyless else self._options.max_body_size
        if unshareable_reason(resp.raw_headers, max_body_size=limit):
            return Unshared(resp)  # Set-Cookie, event stream, too large: untouched, unread
        decoded = req.session.auto_decompress and hdrs.CONTENT_ENCODING in resp.headers
        if bodyless or (resp.content_length is not None and not decoded):
            body = await resp.read()  # bounded: unshareable_reason checked Content-Length
        else:
            body_or_none = await read_at_most(resp, self._options.max_body_size)
            if body_or_none is None:
                return Unshared(resp)  # grew past max_body_size: the rest streams to the leader
            body = body_or_none
        version = resp.version
        http_version = f"HTTP/{version.major}.{version.minor}" if version else "HTTP/1.1"
        parts = (resp.status, resp.reason or "", http_version, resp.raw_headers, body)
        if not self._judge_cacheable:
            return Snapshot(*parts)
        return Snapshot.build(*parts, request_headers=cast(Any, req.headers.items()))


_DECODED: Final = ("decoded",)  # the key's ``extra``: see RequestKey
_RAW: Final = ("raw",)
