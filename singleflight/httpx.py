"""httpx transports that make one upstream request for identical requests in flight."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any, Final, TypeAlias, TypeVar

try:
    import anyio
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
    HTTPOptions,
    Snapshot,
    bypass_reason,
    unshareable_reason,
)

__all__ = ("DEFAULT_IGNORE_HEADERS", "AsyncSingleflightTransport", "SingleflightTransport")

_E = TypeVar("_E", bound=BaseException)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_BODY: Final = ("raw",)  # httpx shares bodies as received: content-encoding untouched
# A leader's value: a Snapshot to share, or its own live response (Unshared: never buffered).
_Value: TypeAlias = "Snapshot | Unshared[httpx.Response]"


class _Policy:
    """What both transports share: options, the Group, the key and the response builders."""

    __slots__ = ("caching", "group", "options")

    def __init__(
        self,
        methods: Iterable[str],
        ttl: float | None,
        maxsize: int,
        cache: MutableMapping[Any, Any] | None,
        key: Callable[[httpx.Request], Hashable | None] | None,
        ignore_headers: Iterable[str],
        max_body_size: int,
        group: Group[Any] | None,
        tier: Any,
    ) -> None:
        self.options = HTTPOptions.build(
            methods=methods,
            ttl=ttl,
            maxsize=maxsize,
            cache=cache,
            key=key,
            ignore_headers=ignore_headers,
            max_body_size=max_body_size,
        )
        # The leader's own timeout ends only its own attempt: a follower re-runs the request.
        self.group = self.options.make_group(
            group=group, tier=tier, reelect_on=(httpx.TimeoutException,)
        )
        # Judge cacheability only where something may store it (a cache or a tier).
        self.caching = (
            self.group.cache is not None or getattr(self.group, "_tier", None) is not None
        )

    def key(self, request: httpx.Request) -> Hashable | None:
        """The Group key of ``request``, or None when it must go straight through."""
        if request.extensions.get("singleflight", True) is False:
            return None
        raw = request.headers.raw
        if bypass_reason(request.method, raw, methods=self.options.methods) is not None:
            return None
        # httpx.URL is already normalised (lower-case scheme and host, no default port).
        url = request.url
        netloc = url.netloc.decode("ascii")
        if url.port is not None and url.port == _DEFAULT_PORTS.get(url.scheme):
            netloc = netloc.rpartition(":")[0]  # "HTTPS://h:443" keeps its port in httpx
        normal = f"{url.scheme}://{netloc}{url.raw_path.decode('ascii')}"
        userinfo = url.userinfo.decode("ascii")
        return self.options.key_for(request, request.method, normal, raw, _BODY, userinfo=userinfo)

    def unshared(self, response: httpx.Response) -> bool:
        """True if ``response`` goes to its leader only (Set-Cookie, event stream, too big)."""
        reason = unshareable_reason(response.headers.raw, max_body_size=self.options.max_body_size)
        return reason is not None

    def snapshot(self, request: httpx.Request, response: httpx.Response, body: bytes) -> Snapshot:
        status, reason, version = (
            response.status_code,
            response.reason_phrase,
            response.http_version,
        )
        if not self.caching:  # httpx's raw headers are already (bytes, bytes) pairs
            return Snapshot(status, reason, version, tuple(response.headers.raw), body)
        return Snapshot.build(
            status, reason, version, response.headers.raw, body, request_headers=request.headers.raw
        )

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
        return Snapshot.build(
            status,
            reason,
            response.http_version,
            headers,
            content,
            request_headers=request.headers.raw,
        )

    def deliver(self, request: httpx.Request, value: Any, role: str) -> httpx.Response:
        """Each caller's own Response: a fresh one built from a Snapshot, or its own live one."""
        if isinstance(value, httpx.Response):
            value.extensions["singleflight"] = role
            return value
        snap: Snapshot = value
        return httpx.Response(
            snap.status,
            headers=list(snap.headers),
            stream=httpx.ByteStream(snap.body),  # the bytes are shared, never copied
            extensions={
                "http_version": snap.http_version.encode("ascii"),
                "reason_phrase": snap.reason.encode("ascii", "replace"),
                "singleflight": role,
            },
            request=request,
        )

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


def _fresh(exc: _E, request: httpx.Request) -> _E:
    """A new exception of the same type bound to the follower's own request.

    The leader's exception object is shared by every waiter of its flight; raising it in many
    tasks grows one traceback and hands out the leader's request (research note, pitfall 22).
    """
    if isinstance(exc, httpx.RequestError):
        try:
            new = type(exc)(str(exc), request=request)
        except Exception:
            return exc
        return new
    return exc


def _read_timeout(request: httpx.Request) -> float | None:
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        read = timeout.get("read")
        return float(read) if isinstance(read, (int, float)) else None
    return None


def _in_flight(group: Group[Any], key: Hashable) -> bool:
    """Is ``key`` in flight now? A hint (the answer may change at once); True if unknown."""
    flights = getattr(group, "_flights", None)  # TODO(core): a public Group.__contains__
    return True if flights is None else key in flights


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio (httpx runs on it through anyio)
        return False
    return True


def _waited_too_long(request: httpx.Request, budget: float) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(
        f"waited {budget}s (this request's read timeout) for an identical request in flight",
        request=request,
    )


class _Deadline:
    """A follower's own deadline on asyncio: cancels its task at ``budget`` s unless disarmed.

    Like ``asyncio.timeout`` (3.11+ only): cancel the task, then tell our cancellation from
    anyone else's with ``uncancel``. Setting ``deadline = math.inf`` disarms it (the same
    spelling as ``anyio.CancelScope``, so ``fetch`` serves both).
    """

    __slots__ = ("_fired", "_handle", "_task")

    def __init__(self, budget: float) -> None:
        self._task = asyncio.current_task()
        self._fired = False
        self._handle = asyncio.get_running_loop().call_later(budget, self._fire)

    def _fire(self) -> None:
        if self._task is not None:
            self._fired = True
            self._task.cancel()

    @property
    def deadline(self) -> float:
        return math.inf if self._handle.cancelled() else self._handle.when()

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._handle.cancel()  # only ever disarmed

    def expired(self) -> bool:
        """True if our timer cancelled the task and nobody else did (then it is undone)."""
        if not self._fired or self._task is None:
            return False
        uncancel = getattr(self._task, "uncancel", None)
        return uncancel is None or uncancel() == 0  # Python 3.10 cannot tell: ours


class _AsyncRest(httpx.AsyncByteStream):
    """The chunks read so far, then the rest of the upstream body, which it closes."""

    def __init__(
        self, head: list[bytes], rest: AsyncIterator[bytes], upstream: httpx.Response
    ) -> None:
        self._head, self._rest, self._upstream = head, rest, upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head, self._head = self._head, []
        for chunk in head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._upstream.aclose()


class _SyncRest(httpx.SyncByteStream):
    """The chunks read so far, then the rest of the upstream body, which it closes."""

    def __init__(self, head: list[bytes], rest: Iterator[bytes], upstream: httpx.Response) -> None:
        self._head, self._rest, self._upstream = head, rest, upstream

    def __iter__(self) -> Iterator[bytes]:
        head, self._head = self._head, []
        yield from head
        yield from self._rest

    def close(self) -> None:
        self._upstream.close()


class AsyncSingleflightTransport(httpx.AsyncBaseTransport):
    """AsyncSingleflightTransport sends one upstream request for identical requests in flight.

    Wraps ``inner`` (default: a new ``httpx.AsyncHTTPTransport()``). Concurrent GET/HEAD requests
    with the same key (method, normalised URL, every header but tracing ones) share the first
    one's response; each caller gets its own ``httpx.Response`` with the raw body as received, and
    ``response.extensions["singleflight"]`` says ``"leader"``, ``"follower"`` or ``"cache"``.
    With ``ttl=`` completed cacheable responses are served from memory until they expire.

    Responses with ``Set-Cookie``, event streams and bodies above ``max_body_size`` go to their
    leader only (streamed); its followers make their own requests. The leader's own timeout or
    cancellation never fails its followers: one of them makes the request afresh. A follower
    gives up after its own read timeout with ``httpx.ReadTimeout``. Works on asyncio and trio.
    Pass ``group=other_transport.group`` to share flights (and the cache) between transports.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[httpx.Request], Hashable | None] | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
        tier: Any = None,
    ) -> None:
        if inner is not None and not isinstance(inner, httpx.AsyncBaseTransport):
            raise TypeError(
                f"inner must be an httpx.AsyncBaseTransport, got {type(inner).__name__}; "
                "pass e.g. httpx.AsyncHTTPTransport() (use SingleflightTransport for a sync one)"
            )
        self._policy = _Policy(
            methods, ttl, maxsize, cache, key, ignore_headers, max_body_size, group, tier
        )
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()

    @property
    def inner(self) -> httpx.AsyncBaseTransport:
        """The wrapped transport."""
        return self._inner

    @property
    def group(self) -> Group[Any]:
        """The Group of this transport's flights; pass it as ``group=`` to share them."""
        return self._policy.group

    @property
    def stats(self) -> Stats:
        """The Group's counters (calls, leaders, followers, cache_hits, errors)."""
        return self._policy.group.stats

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self._policy
        key = policy.key(request)
        if key is None:
            return await self._inner.handle_async_request(request)
        budget = _read_timeout(request)
        ran = False
        deadline: _Deadline | anyio.CancelScope | None = None

        async def fetch() -> _Value:
            nonlocal ran
            ran = True
            if deadline is not None:  # leading now: httpcore enforces our own timeouts
                deadline.deadline = math.inf
            return await self._fetch(request)

        try:
            if budget is None or not _in_flight(policy.group, key):
                # Nothing to wait for: this call leads at once (fetch runs before the first
                # await), so no deadline is armed. A sync thread may take the lead in between;
                # then the wait is bounded by that leader's own timeouts and re-election.
                value, role = await policy.group.do_with_role(key, fetch)
            elif _on_asyncio():
                # A timer handle, not anyio.CancelScope: ten times cheaper, and every request
                # pays for it (benchmarks/bench_httpx.py).
                deadline = _Deadline(budget)
                try:
                    value, role = await policy.group.do_with_role(key, fetch)
                except asyncio.CancelledError:
                    if not deadline.expired():
                        raise
                    raise _waited_too_long(request, budget) from None
                finally:
                    deadline.deadline = math.inf
            else:
                with anyio.CancelScope(deadline=anyio.current_time() + budget) as deadline:
                    value, role = await policy.group.do_with_role(key, fetch)
                if deadline.cancelled_caught:
                    raise _waited_too_long(request, budget)
        except ReentrancyError:
            # The request was sent from inside its own flight (a hook or an auth flow):
            # waiting would deadlock, so it goes on its own.
            return await self._inner.handle_async_request(request)
        except Exception as exc:
            if ran:
                raise
            fresh = _fresh(exc, request)
            if fresh is exc:
                raise
            raise fresh from exc
        return policy.deliver(request, value, role)

    async def _fetch(self, request: httpx.Request) -> _Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self._policy
        response = await self._inner.handle_async_request(request)
        kept = False  # True once the live response is handed on, still open
        try:
            if policy.unshared(response):
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
            try:
                async for chunk in rest:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        kept = True
                        return policy.oversized(response, _AsyncRest(chunks, rest, response))
            except httpx.StreamConsumed:
                return policy.decoded(request, response)
            return policy.snapshot(request, response, b"".join(chunks))
        finally:
            if not kept:
                await response.aclose()

    async def aclose(self) -> None:
        """Close the inner transport."""
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
        await self._inner.__aexit__(exc_type, exc_value, traceback)


class SingleflightTransport(httpx.BaseTransport):
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
        ttl: float | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: Callable[[httpx.Request], Hashable | None] | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        group: Group[Any] | None = None,
    ) -> None:
        if inner is not None and not isinstance(inner, httpx.BaseTransport):
            raise TypeError(
                f"inner must be an httpx.BaseTransport, got {type(inner).__name__}; pass e.g. "
                "httpx.HTTPTransport() (use AsyncSingleflightTransport for an async one)"
            )
        self._policy = _Policy(
            methods, ttl, maxsize, cache, key, ignore_headers, max_body_size, group, None
        )
        self._inner = inner if inner is not None else httpx.HTTPTransport()

    @property
    def inner(self) -> httpx.BaseTransport:
        """The wrapped transport."""
        return self._inner

    @property
    def group(self) -> Group[Any]:
        """The Group of this transport's flights; pass it as ``group=`` to share them."""
        return self._policy.group

    @property
    def stats(self) -> Stats:
        """The Group's counters (calls, leaders, followers, cache_hits, errors)."""
        return self._policy.group.stats

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` once per key in flight; return this caller's own Response."""
        policy = self._policy
        key = policy.key(request)
        if key is None:
            return self._inner.handle_request(request)
        ran = False

        def fetch() -> _Value:
            nonlocal ran
            ran = True
            return self._fetch(request)

        try:
            value, role = policy.group.do_sync_with_role(key, fetch)
        except ReentrancyError:
            return self._inner.handle_request(request)
        except Exception as exc:
            if ran:
                raise
            fresh = _fresh(exc, request)
            if fresh is exc:
                raise
            raise fresh from exc
        return policy.deliver(request, value, role)

    def _fetch(self, request: httpx.Request) -> _Value:
        """The leader's work: send, then buffer the raw body into a Snapshot (or don't)."""
        policy = self._policy
        response = self._inner.handle_request(request)
        kept = False
        try:
            if policy.unshared(response):
                kept = True
                return Unshared(response)
            limit = policy.options.max_body_size
            chunks: list[bytes] = []
            size = 0
            if response.is_stream_consumed and not isinstance(response.stream, httpx.ByteStream):
                return policy.decoded(request, response)  # a one-shot stream, read elsewhere
            rest = iter(response.stream)  # type: ignore[arg-type]
            try:
                for chunk in rest:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        kept = True
                        return policy.oversized(response, _SyncRest(chunks, rest, response))
            except httpx.StreamConsumed:
                return policy.decoded(request, response)
            return policy.snapshot(request, response, b"".join(chunks))
        finally:
            if not kept:
                response.close()

    def close(self) -> None:
        """Close the inner transport."""
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
        self._inner.__exit__(exc_type, exc_value, traceback)
