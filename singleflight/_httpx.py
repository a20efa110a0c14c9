"""The httpx side of the policy: a Request's key, a response's Snapshot, each caller's Response."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import sys
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    MutableMapping,
)
from typing import Any, Final, TypeAlias, TypeVar

import httpx

from singleflight._group import Group, Stats, Unshared
from singleflight._http import (
    ClientClosed,
    HTTPOptions,
    Snapshot,
    bypass_reason,
    invalidated_urls,
    unshareable_reason,
)
from singleflight._http.invalidation import Ticket, flights_of, invalidate
from singleflight._http.live import Log
from singleflight._httpx_live import Live, where
from singleflight._observe import note_call

__all__ = ()

_E = TypeVar("_E", bound=BaseException)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_READS: Final = frozenset({"GET", "HEAD"})
_BODY: Final = ("raw",)  # httpx shares bodies as received: content-encoding untouched
# A leader's value: a Snapshot to share, or its own live response (Unshared: never buffered).
Value: TypeAlias = "Snapshot | Live | Unshared[httpx.Response]"


class Policy:
    """What both transports share: options, the Group, the key and the response builders."""

    __slots__ = ("bypasses", "caching", "extra", "group", "joined", "options", "rejoins")

    def __init__(
        self,
        methods: Iterable[str],
        ttl: float | str | None,
        maxsize: int,
        cache: MutableMapping[Any, Any] | None,
        key: Callable[[httpx.Request], Hashable | None] | None,
        ignore_headers: Iterable[str],
        max_body_size: int,
        group: Group[Any] | None,
        tier: Any,
        identity: str,
        stale_ttl: float | None = None,  # stale-while-revalidate (issue 13)
        max_ttl: float | None = None,
    ) -> None:
        # The key's adapter facts: raw bodies, and who sends (sender_identity).
        self.extra: tuple[Hashable, ...] = (*_BODY, identity)
        self.options = HTTPOptions.build(
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
        # The leader's own timeout ends only its own attempt: a follower re-runs the request.
        self.group = self.options.make_group(
            group=group, tier=tier, reelect_on=(httpx.TimeoutException,)
        )
        # Judge cacheability only where something may store it (a cache or a tier).
        self.caching = self.group.cache is not None or self.group.tier is not None
        self.bypasses = 0  # plain += under the GIL, like the Group's counters
        self.rejoins = 0  # followers that joined their flight again (sync, trio): counted twice
        self.joined = 0  # followers that joined a live body after its flight landed: uncounted

    @property
    def stats(self) -> Stats:
        """The Group's counters, plus the requests this transport let straight through."""
        stats = self.group.stats
        extra = self.joined - self.rejoins
        return dataclasses.replace(
            stats,
            calls=stats.calls + extra,
            followers=stats.followers + extra,
            bypasses=self.bypasses,
        )

    def bypassed(self, reason: str) -> None:
        """Count and note a request that goes straight through, and why."""
        self.bypasses += 1
        note_call("bypass", reason, what="request")

    def key(self, request: httpx.Request) -> Hashable | None:
        """The Group key of ``request``, or None when it must go straight through."""
        return self.key_or_reason(request)[0]

    def key_or_reason(self, request: httpx.Request) -> tuple[Hashable | None, str]:
        """``(key, "")`` to coalesce ``request``, or ``(None, why)`` to let it through."""
        if request.extensions.get("singleflight", True) is False:
            return None, "opt-out"
        raw = request.headers.raw
        reason = bypass_reason(request.method, raw, methods=self.options.methods)
        if reason is not None:
            return None, reason
        # httpx.URL is already normalised (lower-case scheme and host, no default port).
        url = request.url
        netloc = url.netloc.decode("ascii")
        if url.port is not None and url.port == _DEFAULT_PORTS.get(url.scheme):
            netloc = netloc.rpartition(":")[0]  # "HTTPS://h:443" keeps its port in httpx
        normal = f"{url.scheme}://{netloc}{url.raw_path.decode('ascii')}"
        userinfo = url.userinfo.decode("ascii")
        extra = self.extra
        sni = request.extensions.get("sni_hostname")
        if sni is not None:  # the TLS name sent and checked: who the server sees us ask for
            extra = (*extra, ("sni", sni))
        key = self.options.key_for(request, request.method, normal, raw, extra, userinfo=userinfo)
        return (None, "key") if key is None else (key, "")

    def unshared(self, request: httpx.Request, response: httpx.Response) -> bool:
        """True if ``response`` goes to its leader only (1xx, Set-Cookie, event stream, too big)."""
        status = response.status_code
        # A HEAD (or 204/304) response has no body, whatever its Content-Length announces.
        bodyless = request.method == "HEAD" or status in (204, 304)
        limit = sys.maxsize if bodyless else self.options.max_body_size
        reason = unshareable_reason(response.headers.raw, max_body_size=limit, status=status)
        return reason is not None

    def snapshot(self, request: httpx.Request, response: httpx.Response, body: bytes) -> Snapshot:
        """The shared copy of ``response``: its raw body, and extensions any caller may see."""
        status, reason = response.status_code, response.reason_phrase
        version = response.http_version
        shared = shared_extensions(response)
        if not self.caching:  # httpx's raw headers are already (bytes, bytes) pairs
            headers = tuple(response.headers.raw)
            return Snapshot(status, reason, version, headers, body, extensions=shared)
        snap = Snapshot.build(
            status, reason, version, response.headers.raw, body, request_headers=request.headers.raw
        )
        return dataclasses.replace(snap, extensions=shared)

    def decoded(self, request: httpx.Request, response: httpx.Response) -> Snapshot:
        """A Snapshot of a response whose one-shot stream another wrapper already read.

        Only its decoded ``content`` is left, so the encoding headers go (hishel does the
        same); otherwise every caller's client would decode it a second time.
        """
        content = response.content  # httpx.ResponseNotRead if nobody read it: nothing to share
        drop = (b"content-encoding", b"content-length", b"transfer-encoding")
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in drop]
        headers.append((b"Content-Length", str(len(content)).encode("ascii")))
        status, reason = response.status_code, response.reason_phrase
        snap = Snapshot.build(
            status,
            reason,
            response.http_version,
            headers,
            content,
            request_headers=request.headers.raw,
        )
        return dataclasses.replace(snap, extensions=shared_extensions(response))

    def failed(self, exc: BaseException, request: httpx.Request, ran: bool) -> BaseException:
        """Note a request that ended in ``exc``; return the exception its caller gets."""
        note_call("leader" if ran else "follower", what="request")
        if ran and isinstance(exc, ClientClosed) and exc.__cause__ is not None:
            return exc.__cause__  # its followers went on without it; it gets its own error
        return exc if ran else fresh_error(exc, request)

    def deliver(
        self,
        request: httpx.Request,
        value: Any,
        role: str,
        own: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """Each caller's own Response: a fresh one built from a Snapshot, or its own live one.

        ``own``: the extensions of the response this caller received itself (its leader's
        work ran), kept whole, ``network_stream`` included; other callers get the Snapshot's.
        """
        note_call(role, what="request")
        if isinstance(value, httpx.Response):
            value.extensions["singleflight"] = role
            return value
        snap: Snapshot = value
        extensions = {
            **snap.extensions,
            "http_version": snap.http_version.encode("ascii"),
            "reason_phrase": snap.reason.encode("ascii", "replace"),
            "singleflight": role,
        }
        if own:
            extensions.update(own)
            extensions["singleflight"] = role
        return httpx.Response(
            snap.status,
            headers=list(snap.headers),
            stream=httpx.ByteStream(snap.body),  # the bytes are shared, never copied
            extensions=extensions,
            request=request,
        )

    def wrote(self, request: httpx.Request, response: httpx.Response) -> None:
        """A request went straight through: if it wrote, drop the cached reads it changed.

        RFC 9111 §4.4 (``invalidated_urls``): the target URL, its ``Location`` and
        ``Content-Location``, for every transport sharing the group.
        """
        if self.caching and request.method not in _READS:
            url = str(request.url)
            urls = invalidated_urls(request.method, response.status_code, url, response.headers.raw)
            invalidate(self.group, urls)

    def ticket(self, key: Hashable) -> Ticket | None:
        """A leader's ticket for its flight of ``key``: a write meanwhile makes it stale."""
        return flights_of(self.group).start(key) if self.caching else None

    def live(
        self,
        request: httpx.Request,
        response: httpx.Response,
        key: Hashable,
        ticket: Ticket | None,
        sync: bool,
    ) -> Live | None:
        """A Live value for ``response`` if its body is shared live, else None (buffer it).

        Live: a body of unknown length (no ``Content-Length``: chunked, an endless NDJSON
        watch), read from a real stream (not one another wrapper already read), on asyncio or
        in threads, without a tier (a tier stores whole values only). A body of announced length
        is buffered and shared whole, as before: its errors reach ``get()`` and the leader's
        timeout re-elects until it is complete.
        """
        stream_type = httpx.SyncByteStream if sync else httpx.AsyncByteStream
        if (
            self.group.tier is not None
            or request.method == "HEAD"
            or response.status_code in (204, 304)
            or isinstance(response.stream, httpx.ByteStream)
            or not isinstance(response.stream, stream_type)
            or "content-length" in response.headers
        ):
            return None
        return Live(
            response,
            Log(self.options.max_body_size),
            group=self.group,
            key=key,
            store=self.caching,
            ticket=ticket,
            request_headers=list(request.headers.raw),
            extensions=shared_extensions(response),
            context=where(sync),
        )

    def end(self, key: Hashable, ticket: Ticket | None) -> None:
        """The leader's flight of ``key`` is over: a write can no longer reach it."""
        if ticket is not None:
            flights_of(self.group).end(key, ticket)

    @staticmethod
    def landed(ticket: Ticket | None, value: Value) -> Value:
        """The leader's value as the Group may store it: never if a write landed meanwhile."""
        if ticket is not None and ticket.stale and isinstance(value, Snapshot) and value.cacheable:
            return dataclasses.replace(value, cacheable=False)  # its callers still get it
        return value

    def oversized(self, response: httpx.Response, stream: Any) -> Unshared[httpx.Response]:
        """The leader's response whose body outgrew ``max_body_size``: stream the rest."""
        return Unshared(
            httpx.Response(
                response.status_code,
                headers=response.headers.raw,
                stream=stream,
                extensions={**response.extensions, "singleflight": "leader"},
            )
        )


_DEFAULT_TLS_ENV: Final = ("SSL_CERT_FILE", "SSL_CERT_DIR")
_IDENTITIES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def sender_identity(inner: object, built: bool) -> str:
    """Who the server sees and what the caller checks, as decided by the inner transport.

    ``built``: the wrapper made ``inner`` itself (``httpx.[Async]HTTPTransport()``), so it is
    known in full: the default TLS checks against the default CA store (``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` when set), no client certificate, no proxy. Such transports share flights,
    also across processes (a Redis tier). Any other inner transport may hold a client
    certificate, its own CA or ``verify=False``, a proxy, a local address or a mock, and
    ``ssl.SSLContext`` cannot tell us which: it gets a token of its own, so only wrappers of the
    very same inner transport share flights and cache entries.
    """
    if built:
        env = [os.environ.get(name, "") for name in _DEFAULT_TLS_ENV]
        if not any(env):
            return "httpx"
        digest = hashlib.blake2b("\n".join(env).encode("utf-8", "surrogateescape"), digest_size=8)
        return f"httpx:{digest.hexdigest()}"
    try:
        token = _IDENTITIES.get(inner)
    except TypeError:  # not weak-referenceable: this wrapper alone
        return f"transport:{secrets.token_hex(8)}"
    if token is None:
        token = _IDENTITIES.setdefault(inner, f"transport:{secrets.token_hex(8)}")
    return token


_LEADER_ONLY: Final = frozenset({"network_stream", "singleflight"})


def shared_extensions(response: httpx.Response) -> dict[str, Any]:
    """The response's extensions any caller may get: all but the leader's ``network_stream``.

    The connection's stream (``get_extra_info("server_addr")``, ``ssl_object``, an upgrade's
    socket) belongs to the leader's own request; the rest (``http_version``,
    ``reason_phrase``, a wrapped transport's own, e.g. hishel's) describe the response.
    """
    return {k: v for k, v in response.extensions.items() if k not in _LEADER_ONLY}


def fresh_error(exc: _E, request: httpx.Request) -> _E:
    """A new exception of the same type bound to the follower's own request.

    The leader's exception object is shared by every waiter of its flight; raising it in many
    tasks grows one traceback and hands out the leader's request (research note, pitfall 22).
    """
    if isinstance(exc, httpx.RequestError) and getattr(exc, "_request", None) is not request:
        try:
            new = type(exc)(str(exc), request=request)
        except Exception:
            return exc
        return new
    return exc


def read_timeout(request: httpx.Request) -> float | None:
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        read = timeout.get("read")
        return float(read) if isinstance(read, (int, float)) else None
    return None


def waited_too_long(request: httpx.Request, budget: float) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(
        f"waited {budget}s (this request's read timeout) for an identical request in flight",
        request=request,
    )


class Rest(httpx.AsyncByteStream, httpx.SyncByteStream):
    """The chunks read so far, then the rest of the upstream body, which closing closes."""

    def __init__(self, head: list[bytes], rest: Any, upstream: httpx.Response) -> None:
        self._head, self._rest, self._upstream = head, rest, upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    async def aclose(self) -> None:
        await self._upstream.aclose()

    def close(self) -> None:
        self._upstream.close()
