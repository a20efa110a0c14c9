"""aiohttp client middleware: one upstream request for concurrent identical GET/HEAD requests."""

from __future__ import annotations

import asyncio
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, MutableMapping
from types import FrameType
from typing import Any, Final, cast

try:
    from aiohttp import ClientRequest, ClientResponse, ClientSession, SocketTimeoutError, hdrs
    from aiohttp.client_middlewares import ClientHandlerType
    from aiohttp.helpers import TimerNoop
    from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
    from aiohttp.streams import StreamReader
    from multidict import CIMultiDict, CIMultiDictProxy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "singleflight.aiohttp needs aiohttp >= 3.12 (client middlewares): "
        "pip install singleflight-http[aiohttp]"
    ) from exc

from singleflight._group import Group, Stats, Unshared
from singleflight._http import (
    DEFAULT_IGNORE_HEADERS,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS,
    Deadline,
    HTTPOptions,
    Snapshot,
    bypass_reason,
    unshareable_reason,
)

__all__ = ("SingleflightMiddleware", "served")

# How each response this middleware returned was served. Weak keys: the entry dies with the
# response, and nothing is added to aiohttp's objects or to the response headers.
_served: weakref.WeakKeyDictionary[ClientResponse, str] = weakref.WeakKeyDictionary()


def served(response: ClientResponse) -> str | None:
    """served says how ``response`` was served: ``"leader"``, ``"follower"`` or ``"cache"``.

    A Redis tier adds ``"shared"``, ``"remote"`` and ``"stale"``. None means the middleware let
    the request pass straight through (a method not coalesced, a request body, an upgrade...) or
    never saw the response.
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
    """

    __slots__ = ("_group", "_judge_cacheable", "_options")

    def __init__(
        self,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[ClientRequest], Hashable | None] | None = None,
        ignore_headers: Collection[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
        tier: Any = None,
    ) -> None:
        self._options = HTTPOptions.build(
            methods=methods,
            ttl=ttl,
            maxsize=maxsize,
            cache=cache,
            key=key,
            ignore_headers=ignore_headers,
            max_body_size=max_body_size,
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

    @property
    def group(self) -> Group[Any]:
        """The Group that holds this middleware's flights and cache."""
        return self._group

    @property
    def stats(self) -> Stats:
        """A snapshot of the Group's counters (calls, leaders, followers, cache hits, errors)."""
        return self._group.stats

    def __repr__(self) -> str:
        return f"SingleflightMiddleware(group={self._group!r})"

    async def __call__(self, req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Serve ``req``: lead its flight, follow one, hit the cache, or pass straight through."""
        key = self._key(req)
        if key is None:
            return await handler(req)
        own: ClientResponse | None = None  # the response of our own upstream call, if we made one
        deadline: Deadline | None = None

        async def fetch() -> Snapshot | Unshared[ClientResponse]:
            nonlocal own
            if deadline is not None:  # leading now: aiohttp enforces our own timeouts
                deadline.deadline = math.inf
            own = resp = await handler(req)
            return await self._share(req, resp)

        # A follower waits at most its own sock_read: the shared request runs on the leader's
        # timeouts, and each re-elected leader's would add up otherwise.
        budget = _sock_read() if key in self._group else None
        if budget is None:
            value, role = await self._group.do_with_role(key, fetch)
        else:
            deadline = Deadline(budget)
            try:
                value, role = await self._group.do_with_role(key, fetch)
            except asyncio.CancelledError:
                if not deadline.expired():
                    raise
                raise SocketTimeoutError(
                    f"waited {budget}s (this request's sock_read timeout) for an identical "
                    "request in flight"
                ) from None
            finally:
                deadline.deadline = math.inf
        # The caller that made the upstream request keeps aiohttp's own response (traces,
        # connection bookkeeping and all); everyone else gets a copy built from the Snapshot.
        resp = own if own is not None else _respond(req, value)
        _served[resp] = role
        return resp

    def _key(self, req: ClientRequest) -> Hashable | None:
        options = self._options
        method = req.method
        headers: Any = req.headers.items()
        if bypass_reason(method, headers, methods=options.methods, has_body=_has_body(req)):
            return None
        # aiohttp decodes Content-Encoding in its parser when the session says so: a decoded
        # body must never reach a session that expects raw bytes, nor the reverse.
        extra = _DECODED if req.session.auto_decompress else _RAW
        url = req.url
        if url.raw_user or url.raw_password:  # the session moves these to Authorization first
            return options.key_for(req, method, str(url), headers, extra)
        # yarl has normalised it already (lower-case scheme and host, no default port, no
        # fragment), except that a bare "http://host" keeps its empty path.
        text = str(url)
        if text.count("/") == 2:
            text += "/"
        return options.key_for(req, method, text, headers, extra, userinfo="")

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
            body_or_none = await _read_at_most(resp, self._options.max_body_size)
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


def _sock_read() -> float | None:
    """The ``sock_read`` timeout of the request being sent, or None (none, or not found).

    aiohttp does not hand a request's timeouts to middlewares: ``ClientSession._request`` keeps
    them in its local ``real_timeout`` (3.12 to 3.14), and every middleware runs a few frames
    below it, so that is where this reads them. Found nowhere (the middleware called some other
    way), a follower is bounded by its ``total`` timeout alone, which aiohttp enforces itself.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        if frame.f_code is _SESSION_REQUEST:
            read = getattr(frame.f_locals.get("real_timeout"), "sock_read", None)
            return float(read) if isinstance(read, (int, float)) and read > 0 else None
        frame = frame.f_back
    return None


_SESSION_REQUEST: Final = getattr(ClientSession._request, "__code__", None)
_FRAMES: Final = 16  # middlewares between ours and ClientSession._request, at most


def _has_body(req: ClientRequest) -> bool:
    body = req.body  # b"" when there is none, else an aiohttp Payload
    if isinstance(body, bytes):
        return bool(body)
    return getattr(body, "size", None) != 0  # size None: a stream of unknown length


async def _read_at_most(resp: ClientResponse, limit: int) -> bytes | None:
    """Read the body of ``resp`` if it is at most ``limit`` bytes, else return None.

    On None every byte read so far is back in ``resp.content``, so the leader still reads the
    whole body from its own response. Used when the size is not known from the headers (chunked,
    or decoded from gzip/deflate). Any error closes ``resp``: no connection is left held.
    """
    content = resp.content
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await content.readany():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        # Hand the bytes back to the reader; read() then takes them from memory and releases the
        # connection as usual (it is already back in the pool once the payload ended).
        # unread_data() is deprecated (aiohttp #3260) but is the only way to put bytes back at
        # the head of a StreamReader; the matrix run covers it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            content.unread_data(b"".join(chunks))
        if size > limit:
            return None
        return await resp.read()
    except BaseException:
        resp.close()
        raise


# ---------------------------------------------------------------------------------------------
# The one place that knows ClientResponse's private attributes.


class _FedOnce:
    """Stands in for a connection's protocol under a StreamReader fed once: nothing to pause.

    The signatures take ``*args, **kwargs`` because aiohttp 3.14 calls
    ``resume_reading(resume_parser=False)`` from ``feed_eof()``.
    """

    _reading_paused: Final = False

    def pause_reading(self, *args: object, **kwargs: object) -> None:
        pass

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        pass


_NO_FLOW_CONTROL: Final = _FedOnce()
# Snapshot.http_version -> aiohttp's version; a Snapshot from an httpx leader may say HTTP/2.
_VERSIONS: Final = {
    "HTTP/1.1": HttpVersion11,
    "HTTP/1.0": HttpVersion10,
    "HTTP/2": HttpVersion(2, 0),
    "HTTP/3": HttpVersion(3, 0),
}


def _respond(req: ClientRequest, snap: Snapshot) -> ClientResponse:
    """Build the caller's own complete ``ClientResponse`` for ``snap``, bound to ``req``.

    ``ClientResponse(...)`` is never called: its constructor is internal and changed in 3.14 (a
    required ``stream_writer``), which broke mocks that called it (aioresponses #289). Instead the
    instance is created without ``__init__`` and given exactly the state that ``__init__`` and
    ``start()`` leave on a response whose body has been read and whose connection is released.
    These private attributes are the same in aiohttp 3.12, 3.13 and 3.14, and
    ``scripts/aiohttp_matrix.sh`` runs the tests against each of them, so a change is caught in CI.
    """
    cls = req.response_class
    resp = cls.__new__(cls)
    loop = asyncio.get_running_loop()
    session = req.session
    # What __init__ sets; request_info, url and session are the caller's own.
    resp.method = req.method
    resp._real_url = url = req.original_url
    resp._url = url.with_fragment(None) if url.raw_fragment else url
    resp._request_info = req.request_info
    resp._timer = TimerNoop()
    resp._cache = {}  # reify's cache (url, headers, history...): one per response
    resp._traces = []
    resp._loop = loop
    resp._session = session
    resp._resolve_charset = session._resolve_charset
    # What start() and reading the body set.
    resp.version = _VERSIONS.get(snap.http_version, HttpVersion11)
    resp.status = snap.status
    resp.reason = snap.reason
    resp._raw_headers = snap.headers
    resp._headers = CIMultiDictProxy(
        CIMultiDict(
            # aiohttp's parser decodes header bytes the same way.
            [
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in snap.headers
            ]
        )
    )
    cookies = resp._headers.getall(hdrs.SET_COOKIE, ())
    resp._raw_cookie_headers = tuple(cookies) if cookies else None
    # A fresh reader per response: release() sets an exception on it.
    content = StreamReader(cast(Any, _NO_FLOW_CONTROL), 2**16, loop=loop)
    content.feed_data(snap.body)
    content.feed_eof()
    resp.content = content
    resp._body = snap.body
    resp._connection = None
    resp._closed = True  # body complete, no connection: nothing for __del__ to warn about
    resp._released = False  # read() may still be called until the caller releases it
    return resp
