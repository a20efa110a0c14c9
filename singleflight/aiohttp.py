"""aiohttp client middleware: one upstream request for concurrent identical GET/HEAD requests."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import sys
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, MutableMapping
from typing import Any

try:
    from aiohttp import ClientRequest, ClientResponse, SocketTimeoutError
    from aiohttp.client_middlewares import ClientHandlerType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "singleflight.aiohttp needs aiohttp >= 3.12 (client middlewares): "
        'pip install "singleflight-http[aiohttp]"'
    ) from exc

from singleflight._aiohttp_live import Live
from singleflight._aiohttp_request import (
    LeaderGone,
    Settings,
    request_key,
    session_gone,
    settings,
)
from singleflight._aiohttp_response import (
    alone_reason,
    bodyless,
    fresh_error,
    respond as _respond,  # benchmarks/bench_aiohttp.py uses it
    share,
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
    progress_of,
)
from singleflight._http.options import http_group as http_group  # public: group= builder
from singleflight._http.stale import RefreshError, refreshing, settle_refresh
from singleflight._observe import note_call

__all__ = ("SingleflightMiddleware", "http_group", "served")

# How each response this middleware returned was served. Weak keys: the entry dies with the
# response, and nothing is added to aiohttp's objects or to the response headers.
_served: weakref.WeakKeyDictionary[ClientResponse, str] = weakref.WeakKeyDictionary()


async def _close(response: ClientResponse) -> None:
    response.close()


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
    its own ``request_info``; ``read()``, ``text()``, ``json()``, every ``content`` reader,
    ``raise_for_status()`` and ``async with`` work as usual). A caller nobody waited for keeps
    aiohttp's own response; a flight's callers share its body live, as it arrives (joiners are
    welcome while it streams, up to ``max_body_size``); with a cache or a tier the body is
    buffered so it can be stored. ``served(response)`` tells how a response was served.

    Keys, bypass rules and what may be shared or cached are ``singleflight._http``'s, the same as
    the httpx transport's (docs/aiohttp.md): credentials separate callers, requests with a body
    pass through, a response with ``Set-Cookie``, an event stream or a body above
    ``max_body_size`` goes to its leader only. The route (connector, ``ssl=``,
    ``server_hostname``, proxy) and the read settings (``auto_decompress``, ``read_until_eof``,
    the parser's limits) are in the key too (``singleflight._aiohttp_request``).
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
        group: a Group to share flights with other adapters or sessions: another adapter's
            ``.group``, or one built with ``http_group(ttl=..., tier=...)``.
        tier: a shared tier (``singleflight.redis.RedisTier``) for one flight across processes.
    """

    __slots__ = (
        "_buffers",
        "_bypasses",
        "_group",
        "_judge_cacheable",
        "_late",
        "_live",
        "_options",
        "_waiting",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> SingleflightMiddleware:
        # Every option is keyword-only, so positional arguments mean aiohttp is calling the
        # class itself as a middleware, with (request, handler): it was given the class.
        if args:
            raise TypeError(
                "SingleflightMiddleware was called with positional arguments "
                f"({', '.join(type(a).__name__ for a in args)}): if the session was given the "
                "class itself, pass an instance instead: "
                "aiohttp.ClientSession(middlewares=(SingleflightMiddleware(),)); "
                "its options are keyword-only, e.g. SingleflightMiddleware(ttl=5.0)"
            )
        return super().__new__(cls)

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
        # Responses are buffered into Snapshots when they may be stored (a cache, a tier) or
        # when the Group may be shared with other adapters, which know Snapshots only; else
        # a body with callers waiting streams live to all of them (singleflight._aiohttp_live).
        self._buffers = self._judge_cacheable
        self._waiting: dict[Hashable, int] = {}  # key -> callers of ours waiting on its flight
        self._live: dict[Hashable, Live] = {}  # key -> a body streaming now, open to joiners
        self._late = 0  # callers that joined a live body after its flight landed

    @property
    def group(self) -> Group[Any]:
        """The Group that holds this middleware's flights and cache."""
        return self._group

    @property
    def stats(self) -> Stats:
        """The Group's counters (calls, leaders, followers, cache hits...) and ``bypasses``."""
        stats = self._group.stats
        late = self._late
        return dataclasses.replace(
            stats,
            calls=stats.calls + late,
            followers=stats.followers + late,
            bypasses=self._bypasses,
        )

    def __repr__(self) -> str:
        return f"SingleflightMiddleware(group={self._group!r})"

    async def __call__(self, req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Serve ``req``: lead its flight, follow one, hit the cache, or pass straight through."""
        how = settings(req)
        key, reason = request_key(self._options, req, how)  # _key_or_reason, one call less
        if key is None:
            return await self._bypass(reason, req, handler)
        live = self._live.get(key)
        if live is not None and live.admits:  # a body streaming to a flight's callers: join it
            self._late += 1
            note_call("follower", what="request")
            return self._served(live.join(req, how.read_bufsize, how.sock_read), "follower")
        own: ClientResponse | None = None  # the response of our own upstream call, if we made one
        ran = False
        deadline: Deadline | None = None
        mine: SocketTimeoutError | None = None  # a follower's own timeout
        follows = key in self._group  # then we wait, and count as a caller the flight serves

        async def fetch() -> Snapshot | Unshared[ClientResponse] | Live:
            nonlocal own, ran
            ran = True
            if deadline is not None:  # leading now: aiohttp enforces our own timeouts
                deadline.deadline = math.inf
            progress = progress_of(self._group, key)
            progress.start()
            if refreshing() and req.session.closed:  # issue 13: the session ended first
                raise RuntimeError("the session is closed: no refresh")
            try:
                own = resp = await handler(req)
                progress.advance()  # followers see the request is not silent: headers,
                progress.follow(resp.content)  # then every byte the connection feeds the body
                others = self._waiting.get(key, 0) - follows
                try:
                    value = await self._settle(key, req, resp, how, others)
                    if refreshing():  # nobody reads a refresh's own response (issue 13)
                        if type(value) is not Unshared:
                            resp.release()  # read to the end: its connection goes back
                        return await settle_refresh(self._group, key, value, resp.status, _close)
                    return value
                except BaseException:
                    resp.close()  # handed to nobody: its connection must not leak
                    raise
            except Exception as exc:
                if session_gone(req):
                    # Our own session closed under the flight: like a cancelled leader, a
                    # waiting caller (another session's) takes the flight over.
                    raise LeaderGone(exc) from exc
                raise

        # A follower waits until the shared request is silent for its own sock_read: that request
        # runs on the leader's timeouts, and each re-elected leader's would add up otherwise.
        # With a tier another process may hold the flight: arm our deadline anyway (issue 14)
        budget = how.sock_read if follows or self._group.tier is not None else None
        if follows:
            self._waiting[key] = self._waiting.get(key, 0) + 1
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
            value, role, own = exc.snapshot, "follower", None
        except LeaderGone as gone:  # ours; or a given group= that does not re-elect on it
            note_call("leader" if ran else "follower", what="request")
            error = gone.error if ran else fresh_error(gone.error, req)
            raise error from gone.error.__cause__
        except BaseException as exc:
            note_call("leader" if ran else "follower", what="request")
            fresh = exc if ran or exc is mine else fresh_error(exc, req)
            if fresh is exc:
                raise
            raise fresh from exc
        finally:
            if follows:
                left = self._waiting[key] - 1
                if left:
                    self._waiting[key] = left
                else:
                    del self._waiting[key]
        if type(value) is Live:  # a live body: every caller, the leader too, gets its own reader
            if not value.joinable:  # it failed, or every reader left, before we could join:
                note_call("leader", what="request")  # make our own request
                return self._served(await handler(req), "leader")
            note_call(role, what="request")
            resp = value.join(req, how.read_bufsize, how.sock_read, traces=own is not None)
            return self._served(resp, role)
        note_call(role, what="request")
        # The caller that made the upstream request keeps aiohttp's own response (traces,
        # connection bookkeeping and all); everyone else gets a copy built from the Snapshot.
        resp = own if own is not None else _respond(req, value, how.read_bufsize)
        return self._served(resp, role)

    async def _settle(
        self, key: Hashable, req: ClientRequest, resp: ClientResponse, how: Settings, others: int
    ) -> Snapshot | Unshared[ClientResponse] | Live:
        """What the leader's response becomes for its flight, now that its headers are here.

        Alone (1xx, ``Set-Cookie``, event stream, too large) or nobody waiting (a lone caller
        pays for nothing): the leader's own, untouched. With a cache or a tier, or a body that
        is empty or already whole: buffered into a Snapshot (which can be stored). Otherwise a
        Live body, read once and streamed to every caller of the flight as it arrives.
        """
        if alone_reason(req, resp, self._options.max_body_size):
            return Unshared(resp)
        if others <= 0 and not self._buffers:
            return Unshared(resp)
        # The whole body already here with the headers (a small response, the usual case): a
        # Snapshot costs each caller a copy, where a live body would cost a reader and a wake-up.
        if self._buffers or bodyless(req, resp) or resp.content.is_eof():
            return await share(
                req,
                resp,
                # Without a cache the limit bounds late joiners only, as for a live body.
                max_body_size=self._options.max_body_size if self._buffers else sys.maxsize,
                decoded=how.auto_decompress,
                bufsize=how.read_bufsize,
                judge_cacheable=self._judge_cacheable,
            )
        live = Live(resp, self._options.max_body_size, functools.partial(self._ended, key))
        self._live[key] = live
        return live

    def _ended(self, key: Hashable, live: Live) -> None:
        if self._live.get(key) is live:
            del self._live[key]

    @staticmethod
    def _served(resp: ClientResponse, role: str) -> ClientResponse:
        _served[resp] = role
        return resp

    async def _bypass(
        self, reason: str, req: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:
        self._bypasses += 1  # plain += under the GIL, like the Group's counters
        note_call("bypass", reason, what="request")
        return await handler(req)

    def _key(self, req: ClientRequest) -> Hashable | None:
        return self._key_or_reason(req, settings(req))[0]

    def _key_or_reason(self, req: ClientRequest, how: Settings) -> tuple[Hashable | None, str]:
        return request_key(self._options, req, how)
