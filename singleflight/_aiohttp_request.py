"""An aiohttp request in the shared policy's terms: its key (URL, headers, route, read settings).

Two requests share one response only if the server would see the same request from the same
client identity and each caller would read the same bytes. Headers say part of that (the shared
policy in ``singleflight._http.key``); the rest lives on aiohttp's objects, which this module
reads and turns into the key's ``extra``:

- the **route**: which connector sends it (its TLS context, resolver, local address, or Unix
  socket), the per-request ``ssl=`` (verify / ``False`` / an ``SSLContext`` / a
  ``Fingerprint``), ``server_hostname``, ``proxy`` / ``proxy_auth`` / ``proxy_headers`` and the
  HTTP version: the fields of aiohttp's own ``ClientRequest.connection_key``, plus the connector;
- the **read settings** ``ClientSession._request`` resolved for it (``auto_decompress``,
  ``read_until_eof``, the header parser's limits), which aiohttp never puts on the request: they
  are read from that frame's locals, like the request's ``sock_read`` timeout.

Objects that cannot be described the same way in every process (an ``SSLContext``, a custom
resolver) are named by a token unique to the object and the process: such requests still share
with each other in this process, never with another process's, and never with a request whose
object differs. The defaults (a plain ``TCPConnector``, ``ssl=True``) add nothing to the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import sys
import uuid
import weakref
from collections.abc import Hashable
from types import FrameType
from typing import Any, Final, NamedTuple

from aiohttp import ClientRequest, ClientSession, Fingerprint, TCPConnector, UnixConnector

from singleflight._http import HTTPOptions, bypass_reason

__all__ = ()


class Settings(NamedTuple):
    """How ``ClientSession._request`` will read this request's response (None: not found)."""

    sock_read: float | None
    auto_decompress: bool
    read_until_eof: bool
    read_bufsize: int
    limits: tuple[Any, ...]  # (max_line_size, max_field_size, max_headers): the head's parser


_SESSION_REQUEST: Final = getattr(ClientSession._request, "__code__", None)
_FRAMES: Final = 16  # middlewares between ours and ClientSession._request, at most
_LIMIT_NAMES: Final = ("max_line_size", "max_field_size", "max_headers")
_SESSION_DEFAULTS: Final = inspect.signature(ClientSession.__init__).parameters
# aiohttp's own defaults (3.12 has no max_headers): limits equal to them add nothing to the key.
DEFAULT_LIMITS: Final = tuple(
    _SESSION_DEFAULTS[n].default if n in _SESSION_DEFAULTS else None for n in _LIMIT_NAMES
)


def _session_settings(session: ClientSession) -> Settings:
    limits = tuple(getattr(session, "_" + n, None) for n in _LIMIT_NAMES)
    return Settings(
        None, session.auto_decompress, True, getattr(session, "_read_bufsize", 2**16), limits
    )


def settings(req: ClientRequest) -> Settings:
    """The settings ``ClientSession._request`` resolved for ``req`` (per request or session).

    aiohttp hands none of them to middlewares: ``_request`` keeps them in locals (3.12 to 3.14:
    ``real_timeout``, ``auto_decompress``, ``read_until_eof``, ``read_bufsize``,
    ``max_line_size``, ``max_field_size``, ``max_headers``, resolved from the session's values
    before the middlewares run), and every middleware runs a few frames below it. Found nowhere
    (the middleware called some other way), the session's values stand.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            break
        if frame.f_code is _SESSION_REQUEST:
            get = frame.f_locals.get  # f_locals copies every local: read it once
            read = getattr(get("real_timeout"), "sock_read", None)
            bufsize = get("read_bufsize")
            decompress = get("auto_decompress")
            return Settings(
                float(read) if isinstance(read, (int, float)) and read > 0 else None,
                bool(req.session.auto_decompress if decompress is None else decompress),
                bool(get("read_until_eof", True)),
                bufsize
                if isinstance(bufsize, int)
                else getattr(req.session, "_read_bufsize", 2**16),
                (get("max_line_size"), get("max_field_size"), get("max_headers")),  # _LIMIT_NAMES
            )
        frame = frame.f_back
    return _session_settings(req.session)


# -- the route: who sends the request, and what the caller demands of the server --------------

# Tokens never repeat: a process-wide random part (two processes never agree on a token in a
# shared Redis tier) and a counter (an id() can be reused after the object dies; a token not).
_PROCESS: Final = uuid.uuid4().hex[:12]
_COUNTER: Final = itertools.count()
_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_PINNED: dict[int, tuple[Any, str]] = {}  # objects without weak references: kept alive


def _token(obj: Any) -> str:
    """A name for ``obj`` alone, in this process alone (see the module docstring)."""
    try:
        token = _TOKENS.get(obj)
        if token is None:
            token = _TOKENS.setdefault(obj, f"{type(obj).__name__}-{_PROCESS}-{next(_COUNTER)}")
        return token
    except TypeError:  # not weakly referenceable, or unhashable
        pinned = _PINNED.get(id(obj))
        if pinned is None:
            pinned = _PINNED.setdefault(
                id(obj), (obj, f"{type(obj).__name__}-{_PROCESS}-{next(_COUNTER)}")
            )
        return pinned[1]


def tls(value: object) -> str:
    """What a caller demands of the server's certificate, and which client certificate it shows.

    ``True``: verify with the defaults; ``False``: no check at all; a ``Fingerprint``: that pin;
    an ``SSLContext``: whatever it holds (CA store, client certificate, hostname check), which
    no key can describe, so the context itself (its token) separates callers.
    """
    if value is True:
        return "verify"
    if value is False:
        return "insecure"
    if isinstance(value, Fingerprint):
        return "pin:" + value.fingerprint.hex()
    return "context:" + _token(value)


_CONNECTORS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def connector(conn: object) -> str:
    """Who sends the request: the connector, by what changes the server, the route or the TLS.

    A plain ``TCPConnector`` is its TLS setting (``ssl=``); one with its own resolver, local
    address, address family or socket factory is itself; a Unix socket is its path; any other
    connector (a SOCKS proxy, a custom class) is itself. Memoised per connector: these are
    fixed at construction.
    """
    if conn is None:
        return "closed"
    try:
        known = _CONNECTORS.get(conn)
    except TypeError:
        known = None
    if known is not None:
        return known
    cls = type(conn)
    name: str
    if cls is TCPConnector:
        plain = (
            getattr(conn, "_resolver_owner", False)
            and not getattr(conn, "_local_addr_infos", None)
            and not getattr(conn, "_family", 0)
            and getattr(conn, "_socket_factory", None) is None
        )
        name = "tcp:" + (tls(getattr(conn, "_ssl", True)) if plain else _token(conn))
    elif cls is UnixConnector:
        name = "unix:" + conn.path  # type: ignore[attr-defined]
    else:
        name = _token(conn)
    try:
        _CONNECTORS[conn] = name
    except TypeError:
        pass
    return name


def _proxy(req: ClientRequest) -> str:
    """The proxy, its credentials and its headers, hashed: no credential in clear in a key."""
    digest = hashlib.blake2b(str(req.proxy).encode("utf-8", "surrogateescape"), digest_size=16)
    auth = req.proxy_auth
    if auth is not None:
        digest.update(b"\nauth:" + auth.encode().encode("utf-8", "surrogateescape"))
    headers = req.proxy_headers
    if headers:
        for name, value in sorted((k.lower(), v) for k, v in headers.items()):
            digest.update(f"\n{name}:{value}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


_PLAIN_CONNECTOR: Final = "tcp:verify"


def route(
    req: ClientRequest, limits: tuple[Any, ...], read_until_eof: bool
) -> tuple[Hashable, ...]:
    """The key's facts beyond URL and headers (empty for aiohttp's defaults, the common case).

    Each entry is a tagged string, so no two different routes give equal tuples.
    """
    parts: list[Hashable] = []
    session = req.session
    conn = connector(session.connector)
    if conn != _PLAIN_CONNECTOR:
        parts.append("connector=" + conn)
    ssl_value = req.ssl
    if ssl_value is not True:  # the request's own ssl= overrides the connector's
        parts.append("ssl=" + tls(ssl_value))
    if req.server_hostname is not None:
        parts.append("server_hostname=" + req.server_hostname)
    if req.proxy is not None:
        parts.append("proxy=" + _proxy(req))
    version = req.version
    if version != (1, 1):
        parts.append(f"version={version[0]}.{version[1]}")
    if limits != DEFAULT_LIMITS:
        parts.append("limits=" + ",".join(map(str, limits)))
    if not read_until_eof:  # a body without length nor chunks reads as empty
        parts.append("read_until_eof=0")
    return tuple(parts)


def has_body(req: ClientRequest) -> bool:
    """True if ``req`` sends a body (such requests are never merged)."""
    body = req.body  # b"" when there is none, else an aiohttp Payload
    if isinstance(body, bytes):
        return bool(body)
    return getattr(body, "size", None) != 0  # size None: a stream of unknown length


def session_gone(req: ClientRequest) -> bool:
    """True once the request's session (or its connector) is closed."""
    session = req.session
    return session.closed or session.connector is None


class LeaderGone(asyncio.TimeoutError):
    """The leader's own session closed mid-flight: its error is its own, not the flight's.

    A subclass of ``asyncio.TimeoutError`` because that is what the middleware's Group
    re-elects on (``reelect_on``), like a leader's own timeout; the leader re-raises ``error``.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_DECODED: Final = ("decoded",)  # the key's ``extra``: see RequestKey
_RAW: Final = ("raw",)


def request_key(
    options: HTTPOptions, req: ClientRequest, how: Settings
) -> tuple[Hashable | None, str]:
    """``(key, "")`` to coalesce ``req``, or ``(None, why)`` to let it through.

    The shared policy (``singleflight._http``) on aiohttp's request: its method, URL and
    headers, plus the route and read settings above as the key's ``extra``.
    """
    method = req.method
    headers: Any = req.headers.items()
    reason = bypass_reason(method, headers, methods=options.methods, has_body=has_body(req))
    if reason is not None:
        return None, reason
    if session_gone(req):  # aiohttp retrying after its session closed: fail as plain
        return None, "closed"
    # aiohttp decodes Content-Encoding in its parser when the request says so: a decoded body
    # must never reach a caller that expects raw bytes, nor the reverse. The route (connector,
    # TLS, proxy, version, parser limits) separates callers the server would tell apart, or
    # whose checks differ.
    extra: tuple[Hashable, ...] = _DECODED if how.auto_decompress else _RAW
    facts = route(req, how.limits, how.read_until_eof)
    if facts:
        extra += facts
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
