"""Internals of singleflight.httpx: the httpx side of the policy, deadlines, stream plumbing."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    MutableMapping,
)
from typing import Any, Final, TypeAlias, TypeVar

import anyio
import httpx

from singleflight._group import Group, Role, Stats, Unshared
from singleflight._http import (
    Deadline,
    HTTPOptions,
    Progress,
    Snapshot,
    bypass_reason,
    progress_of,
    unshareable_reason,
)
from singleflight._observe import note_call

__all__ = ()

_E = TypeVar("_E", bound=BaseException)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_BODY: Final = ("raw",)  # httpx shares bodies as received: content-encoding untouched
# A leader's value: a Snapshot to share, or its own live response (Unshared: never buffered).
Value: TypeAlias = "Snapshot | Unshared[httpx.Response]"


class Policy:
    """What both transports share: options, the Group, the key and the response builders."""

    __slots__ = ("bypasses", "caching", "group", "options", "rejoins")

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
        stale_ttl: float | None = None,  # stale-while-revalidate (issue 13)
        max_ttl: float | None = None,
    ) -> None:
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

    @property
    def stats(self) -> Stats:
        """The Group's counters, plus the requests this transport let straight through."""
        stats = self.group.stats
        rejoins = self.rejoins
        return dataclasses.replace(
            stats,
            calls=stats.calls - rejoins,
            followers=stats.followers - rejoins,
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
        key = self.options.key_for(request, request.method, normal, raw, _BODY, userinfo=userinfo)
        return (None, "key") if key is None else (key, "")

    def unshared(self, request: httpx.Request, response: httpx.Response) -> bool:
        """True if ``response`` goes to its leader only (Set-Cookie, event stream, too big)."""
        # A HEAD (or 204/304) response has no body, whatever its Content-Length announces.
        bodyless = request.method == "HEAD" or response.status_code in (204, 304)
        limit = sys.maxsize if bodyless else self.options.max_body_size
        return unshareable_reason(response.headers.raw, max_body_size=limit) is not None

    def snapshot(self, request: httpx.Request, response: httpx.Response, body: bytes) -> Snapshot:
        status, reason = response.status_code, response.reason_phrase
        version = response.http_version
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

    async def follow(
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
        progress = progress_of(self.group, key)
        if on_asyncio():
            # A timer handle, not anyio.CancelScope: ten times cheaper (bench_httpx.py).
            deadline = Deadline(budget, progress)
            armed.append(deadline)
            try:
                return await self.group.do_with_role(key, fetch)
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
                result = await self.group.do_with_role(key, fetch)
            if not scope.cancelled_caught:
                return result
            if progress.mark() == mark:
                raise waited_too_long(request, budget)
            self.rejoins += 1

    def follow_sync(
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
                return self.group.do_sync_bounded(budget, key, fetch)
            except TimeoutError:
                if ran() or progress.mark() == mark:
                    raise
                # Not silent for a whole read timeout: the flight goes on, and we rejoin it.
                self.rejoins += 1

    def failed(self, exc: _E, request: httpx.Request, ran: bool) -> _E:
        """Note a request that ended in ``exc``; return the exception its caller gets."""
        note_call("leader" if ran else "follower", what="request")
        return exc if ran else fresh_error(exc, request)

    def deliver(self, request: httpx.Request, value: Any, role: str) -> httpx.Response:
        """Each caller's own Response: a fresh one built from a Snapshot, or its own live one."""
        note_call(role, what="request")
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


def in_flight(group: Group[Any], key: Hashable) -> bool:
    """Is ``key`` in flight now? A hint (the answer may change at once); True if unknown."""
    return key in group


def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio (httpx runs on it through anyio)
        return False
    return True


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
