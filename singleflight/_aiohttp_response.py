"""aiohttp responses to and from Snapshots: buffer the leader's, build every other caller's.

The one place that writes ``ClientResponse``'s private attributes (a follower's copy, the
leader's refilled reader). ``scripts/aiohttp_matrix.sh`` runs the aiohttp tests against 3.12,
3.13 and 3.14, so a change in aiohttp is caught in CI.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import warnings
from typing import Any, Final, TypeVar, cast

from aiohttp import (
    ClientError,
    ClientRequest,
    ClientResponse,
    ClientResponseError,
    hdrs,
)
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from singleflight._group import Unshared
from singleflight._http import Snapshot, unshareable_reason

__all__ = ()

_E = TypeVar("_E", bound=BaseException)


def fresh_error(exc: _E, req: ClientRequest) -> _E:
    """A copy of the leader's error for a follower, bound to the follower's own request.

    One object raised in every caller's task would be shared by all of them (each raise rewrites
    its traceback and context) and hand out the leader's ``request_info``. aiohttp's errors copy
    cleanly (``copy.copy``); anything else, or a copy that fails, is raised as it is.
    """
    if not isinstance(exc, ClientError):
        return exc
    try:
        new = copy.copy(exc)
    except Exception:
        return exc
    if isinstance(new, ClientResponseError):
        new.request_info = req.request_info
    return new


async def read_at_most(resp: ClientResponse, limit: int) -> bytes | None:
    """Read the body of ``resp`` if it is at most ``limit`` bytes, else return None.

    Reads ``resp.content`` (not ``resp.read()``, which would fire the caller's traces for a
    read it never made). On None every byte read so far is back in ``resp.content``, so the
    leader still reads the whole body from its own response. Any error closes ``resp``: no
    connection is left held. The connection goes back to the pool when the payload ends.
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
    except BaseException:
        resp.close()
        raise
    if size > limit:
        # Hand the bytes back to the reader. unread_data() is deprecated (aiohttp #3260) but is
        # the only way to put bytes back at the head of a StreamReader; the matrix covers it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            content.unread_data(b"".join(chunks))
        return None
    return b"".join(chunks)


def alone_reason(req: ClientRequest, resp: ClientResponse, max_body_size: int) -> str | None:
    """Why the leader's response goes to the leader only (``Unshared``), or None to share it.

    A 1xx (``101 Switching Protocols``) belongs to its connection; then the shared rules, from
    the headers alone: ``Set-Cookie``, an event stream, a ``Content-Length`` too large.
    """
    if resp.status < 200:
        return "1xx"
    limit = sys.maxsize if bodyless(req, resp) else max_body_size
    return unshareable_reason(raw_headers(resp), max_body_size=limit)


def raw_headers(resp: ClientResponse) -> tuple[tuple[bytes, bytes], ...]:
    """The response's header pairs as received; rebuilt from ``headers`` when a custom
    ``response_class`` left ``raw_headers`` None."""
    raw = resp.raw_headers
    if raw is not None:
        return raw
    return tuple(
        (n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for n, v in resp.headers.items()
    )


def bodyless(req: ClientRequest, resp: ClientResponse) -> bool:
    """A HEAD (or 204/304) response has no body, whatever its Content-Length announces."""
    return req.method == hdrs.METH_HEAD or resp.status in (204, 304)


async def share(
    req: ClientRequest,
    resp: ClientResponse,
    *,
    max_body_size: int,
    decoded: bool,
    bufsize: int,
    judge_cacheable: bool,
) -> Snapshot | Unshared[ClientResponse]:
    """Buffer the leader's response into a Snapshot (or, grown too large, keep it unshared).

    ``decoded``: aiohttp's parser decodes Content-Encoding for this request, so Content-Length
    does not bound the body read. The leader keeps its own response, whose reader is refilled
    with the body (``content.read()``, ``iter_chunked()``... work as for any caller).
    """
    # Content-Length (checked by alone_reason) bounds a body read as it came; a chunked or a
    # decoded one may grow past max_body_size.
    known = resp.content_length is not None and not decoded
    bound = sys.maxsize if bodyless(req, resp) or known else max_body_size
    body_or_none = await read_at_most(resp, bound)
    if body_or_none is None:
        return Unshared(resp)  # grew past max_body_size: the rest streams to the leader
    body = body_or_none
    # The leader's own response gets its body back in a fresh reader; its read() reads it
    # from there (traces and all), as if it had come from the socket.
    resp.content = _fed(body, bufsize, asyncio.get_running_loop())
    version = resp.version
    http_version = f"HTTP/{version.major}.{version.minor}" if version else "HTTP/1.1"
    parts = (resp.status, resp.reason or "", http_version, raw_headers(resp), body)
    if not judge_cacheable:
        return Snapshot(*parts)
    return Snapshot.build(*parts, request_headers=cast(Any, req.headers.items()))


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


def _fed(body: bytes, bufsize: int, loop: asyncio.AbstractEventLoop) -> StreamReader:
    """A fresh reader holding the whole of ``body``, with the caller's ``read_bufsize`` limit
    (readline's "Chunk too big" comes at the same length as plain). One per response:
    release() sets an exception on it."""
    content = StreamReader(cast(Any, _NO_FLOW_CONTROL), bufsize, loop=loop)
    if body:
        content.feed_data(body)
    content.feed_eof()
    return content


def respond(req: ClientRequest, snap: Snapshot, bufsize: int = 2**16) -> ClientResponse:
    """Build the caller's own complete ``ClientResponse`` for ``snap``, bound to ``req``.

    Its body is in memory (``read()``, ``text()``, ``json()`` and every ``content`` reader
    answer at once) and it holds no connection.
    """
    version = _VERSIONS.get(snap.http_version, HttpVersion11)
    resp = blank(req, snap.status, snap.reason, version, snap.headers)
    resp.content = _fed(snap.body, bufsize, resp._loop)
    resp._body = snap.body
    resp._connection = None
    resp._closed = True  # body complete, no connection: nothing for __del__ to warn about
    resp._released = False  # read() may still be called until the caller releases it
    return resp


def blank(
    req: ClientRequest,
    status: int,
    reason: str | None,
    version: HttpVersion,
    raw_headers: tuple[tuple[bytes, bytes], ...],
) -> ClientResponse:
    """A ``ClientResponse`` for ``req`` with this status line and headers, and no body yet.

    ``ClientResponse(...)`` is never called: its constructor is internal and changed in 3.14 (a
    required ``stream_writer``), which broke mocks that called it (aioresponses #289). Instead the
    instance is created without ``__init__`` and given the state that ``__init__`` and
    ``start()`` leave; the caller sets ``content``, ``_body``, ``_connection``, ``_closed`` and
    ``_released``. These private attributes are the same in aiohttp 3.12, 3.13 and 3.14, and
    ``scripts/aiohttp_matrix.sh`` runs the tests against each of them, so a change is caught in CI.
    """
    cls = req.response_class
    resp = cls.__new__(cls)
    session = req.session
    # What __init__ sets; request_info, url and session are the caller's own.
    resp.method = req.method
    resp._real_url = url = req.original_url
    resp._url = url.with_fragment(None) if url.raw_fragment else url
    resp._request_info = req.request_info
    resp._timer = TimerNoop()
    resp._cache = {}  # reify's cache (url, headers, history...): one per response
    resp._traces = []
    resp._loop = asyncio.get_running_loop()
    resp._session = session
    resp._resolve_charset = session._resolve_charset
    # What start() sets.
    resp.version = version
    resp.status = status
    resp.reason = reason
    resp._raw_headers = raw_headers
    resp._headers = CIMultiDictProxy(
        CIMultiDict(
            # aiohttp's parser decodes header bytes the same way.
            [
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in raw_headers
            ]
        )
    )
    cookies = resp._headers.getall(hdrs.SET_COOKIE, ())
    resp._raw_cookie_headers = tuple(cookies) if cookies else None
    return resp
