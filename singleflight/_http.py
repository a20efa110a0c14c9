"""HTTP policy shared by the httpx and aiohttp adapters: keys, snapshots, sharing, caching."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import re
import struct
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, MutableMapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, NamedTuple, final
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from singleflight._group import Group

__all__ = (
    "CACHEABLE_STATUSES",
    "CREDENTIAL_HEADERS",
    "DEFAULT_IGNORE_HEADERS",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_METHODS",
    "SNAPSHOT_CODEC",
    "Deadline",
    "HTTPOptions",
    "HeaderFilter",
    "HeaderPairs",
    "Progress",
    "RequestKey",
    "Snapshot",
    "SnapshotCodec",
    "bypass_reason",
    "is_cacheable",
    "key_from_parts",
    "normalise_url",
    "progress_of",
    "request_key",
    "unshareable_reason",
)

# The policy in one place. Every adapter follows it, so httpx and aiohttp callers of one
# Group (or one Redis tier) agree on what is the same request and what may be shared.
#
# request  --bypass_reason()-->  None: coalesce / "why": pass straight through, untouched
#          --request_key()---->  RequestKey (method, normalised URL, digest of headers, extra)
# response --unshareable_reason()--> None: buffer into a Snapshot and share with the flight
#                                    "why": leader only (Unshared), followers make their own call
# Snapshot --is_cacheable()-->   may the TTL layer / Redis tier keep it?

HeaderPairs = Iterable[tuple["str | bytes", "str | bytes"]]
"""Headers as (name, value) pairs, str or bytes (latin-1), duplicates and order kept."""

DEFAULT_METHODS: Final = ("GET", "HEAD")
"""Methods coalesced unless ``methods=`` says otherwise."""

DEFAULT_MAX_BODY_SIZE: Final = 16 * 1024 * 1024
"""Bodies above this many bytes (16 MiB) are streamed to their leader, never buffered to share."""

DEFAULT_IGNORE_HEADERS: Final = frozenset(
    {
        # W3C trace context and baggage.
        "traceparent",
        "tracestate",
        "baggage",
        # Per-request ids.
        "x-request-id",
        "request-id",
        "x-correlation-id",
        # Vendors: Sentry, Zipkin B3, Jaeger, Datadog, AWS X-Ray, Google Cloud.
        "sentry-trace",
        "b3",
        "x-b3-*",
        "uber-trace-id",
        "x-datadog-*",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
    }
)
"""Per-request tracing headers left out of the default key; a trailing ``*`` matches a prefix.

Hooks (httpx event hooks, aiohttp TraceConfig, OpenTelemetry) add them before the adapter sees
the request and they differ on every call, so keeping them in the key would stop all coalescing.
Extend it with ``ignore_headers=DEFAULT_IGNORE_HEADERS | {"x-my-trace"}``.
"""

CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
"""Headers that always separate callers: ``ignore_headers=`` refuses them (use ``key=``)."""

CACHEABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 404, 405, 410, 414, 501})
"""Statuses the TTL layer may store (RFC 9110 §15.1 "heuristically cacheable", minus 206)."""

_first: Final = itemgetter(0)
# The only header names each rule reads (the loops skip every other header cheaply).
_BYPASS_HEADERS: Final = frozenset({"upgrade", "accept", "transfer-encoding", "content-length"})
_SHARE_HEADERS: Final = frozenset({"set-cookie", "content-type", "content-length"})
_STORE_HEADERS: Final = frozenset({"set-cookie", "cache-control", "vary"})
_REFUSE: Final = frozenset({"no-store", "private", "no-cache"})  # Cache-Control: never store
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (method names)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # aiohttp sends such header values as UTF-8
        return value.encode("utf-8", "surrogateescape")


# Header names come from a small vocabulary and are looked at on every request, so their
# lower-cased forms are memoised (bounded: hostile names cannot grow the memo forever). Races
# are benign: every thread computes the same answer.
_LOWER: dict[str | bytes, str] = {}
_MEMO_LIMIT: Final = 4096


def _lower(name: str | bytes) -> str:
    low = _LOWER.get(name)
    if low is None:
        low = _text(name).lower()
        if len(_LOWER) < _MEMO_LIMIT:
            _LOWER[name] = low
    return low


# --------------------------------------------------------------------------------------------
# Request side: key and bypass


@final
class HeaderFilter:
    """HeaderFilter says which header names stay out of the key (case-insensitive).

    Entries are exact names or prefixes ending in ``*`` (``"x-b3-*"``). Answers are memoised per
    raw name: headers come from a small vocabulary, and the key is computed on every request.
    """

    __slots__ = ("_exact", "_memo", "_prefixes", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: frozenset[str] = frozenset(n.lower() for n in names)
        self._exact = frozenset(n for n in self.names if not n.endswith("*"))
        self._prefixes = tuple(n[:-1] for n in self.names if n.endswith("*"))
        # raw name -> lower-cased name as bytes, or b"" if ignored; benign races (see _LOWER)
        self._memo: dict[str | bytes, bytes] = {}

    def kept_name(self, name: str | bytes) -> bytes:
        """kept_name returns the lower-cased name as bytes, or ``b""`` if it is ignored."""
        kept = self._memo.get(name)
        if kept is None:
            lower = _lower(name)
            ignored = lower in self._exact or lower.startswith(self._prefixes)
            kept = b"" if ignored else lower.encode("latin-1")
            if len(self._memo) < _MEMO_LIMIT:
                self._memo[name] = kept
        return kept

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, bytes)) and not self.kept_name(name)

    def __repr__(self) -> str:
        return f"HeaderFilter({sorted(self.names)!r})"


class RequestKey(NamedTuple):
    """RequestKey identifies "the same request": equal keys share one flight.

    ``headers`` is a blake2b digest of every header not ignored (names lower-cased, values in
    order) plus any userinfo of the URL, so no credential is ever kept in clear in a key that may
    reach logs, metrics or Redis. ``extra`` holds adapter facts that change the response body,
    e.g. ``("raw",)`` for httpx (content-encoding untouched) and ``("decoded",)`` for an aiohttp
    session with ``auto_decompress=True``.
    """

    method: str
    url: str
    headers: str
    extra: tuple[Hashable, ...] = ()


@functools.lru_cache(maxsize=4096)
def _split_url(url: str) -> tuple[str, str]:
    """_split_url returns (normalised URL, userinfo) of ``url`` (memoised: URLs repeat)."""
    scheme, netloc, path, query, _ = urlsplit(url)
    scheme = scheme.lower()
    userinfo, _, netloc = netloc.rpartition("@")
    netloc = netloc.lower()
    port = _DEFAULT_PORTS.get(scheme)
    if port is not None and netloc.endswith(":" + port):
        netloc = netloc[: -len(port) - 1]
    return urlunsplit((scheme, netloc, path or "/", query, "")), userinfo


def normalise_url(url: str) -> str:
    """normalise_url lower-cases scheme and host, drops a default port, userinfo and fragment.

    An empty path becomes ``/``. The query is kept byte for byte: reordering parameters could
    change what the server returns.
    """
    return _split_url(url)[0]


def request_key(
    method: str,
    url: str,
    headers: HeaderPairs,
    *,
    ignore: HeaderFilter | Collection[str] = DEFAULT_IGNORE_HEADERS,
    extra: tuple[Hashable, ...] = (),
) -> RequestKey:
    """request_key is the default key: method + normalised URL + hashed headers + ``extra``.

    Every header whose name is not in ``ignore`` counts, so ``Authorization``, ``Cookie``,
    ``Accept*``, ``Range``, ``If-*`` and unknown credentials such as ``X-API-Key`` separate callers.
    Headers are sorted by name (stable: repeated headers keep their order) before hashing, so the
    order in which a client happened to set them does not matter. Userinfo in the URL
    (``user:pass@``) is hashed with them and dropped from the URL.
    """
    normal, userinfo = _split_url(url)
    return key_from_parts(method, normal, userinfo, headers, ignore=ignore, extra=extra)


def key_from_parts(
    method: str,
    normal_url: str,
    userinfo: str,
    headers: HeaderPairs,
    *,
    ignore: HeaderFilter | Collection[str] = DEFAULT_IGNORE_HEADERS,
    extra: tuple[Hashable, ...] = (),
) -> RequestKey:
    """key_from_parts is ``request_key`` for an adapter whose URL type is already normalised.

    ``normal_url`` must be what ``normalise_url`` returns (httpx: ``scheme://netloc`` +
    ``raw_path``, since ``httpx.URL`` lower-cases and drops default ports itself) and
    ``userinfo`` the URL's ``user:password`` part, or ``""``. Saves re-parsing the URL string.
    """
    if not isinstance(ignore, HeaderFilter):
        ignore = HeaderFilter(ignore)
    kept_name = ignore.kept_name
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        low = kept_name(name)
        if low:
            kept.append((low, value if type(value) is bytes else _bytes(value)))
    # Sort on the name only: values of a repeated header keep their order (stable sort).
    kept.sort(key=_first)
    digest = hashlib.blake2b(digest_size=16)
    if userinfo:  # ended by a newline, which no header line can begin with: no run-together
        digest.update(userinfo.encode("utf-8", "surrogateescape") + b"\n")
    digest.update(b"\n".join([n + b":" + v for n, v in kept]))
    return RequestKey(method.upper(), normal_url, digest.hexdigest(), extra)


def _directives(value: str) -> set[str]:
    """Cache-Control directive names of one header value, lower-cased (``max-age=0`` → max-age)."""
    return {d.split("=", 1)[0].strip().lower() for d in value.split(",")}


def bypass_reason(
    method: str,
    headers: HeaderPairs,
    *,
    methods: Collection[str] = DEFAULT_METHODS,
    has_body: bool | None = None,
) -> str | None:
    """bypass_reason says why a request must go straight through, or None to coalesce it.

    Bypassed: methods not in ``methods``; requests with a body (``has_body``, or when None a
    non-zero ``Content-Length`` or any ``Transfer-Encoding``); ``Upgrade`` (websockets, h2c);
    ``Accept: text/event-stream`` (an endless stream cannot be buffered). The per-request opt-out
    (httpx ``extensions={"singleflight": False}``) is the adapter's to check.
    """
    if method.upper() not in methods:
        return "method"
    for raw_name, raw_value in headers:
        name = _lower(raw_name)
        if name not in _BYPASS_HEADERS:
            continue
        if name == "upgrade":
            return "upgrade"
        if name == "accept" and "text/event-stream" in _text(raw_value).lower():
            return "event-stream"
        if has_body is None:
            if name == "transfer-encoding":
                return "body"
            if name == "content-length" and _text(raw_value).strip() not in ("", "0"):
                return "body"
    if has_body:
        return "body"
    return None


# --------------------------------------------------------------------------------------------
# Response side: what may be shared, what may be cached


def unshareable_reason(
    headers: HeaderPairs, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE
) -> str | None:
    """unshareable_reason says why a response goes to its leader only, or None to share it.

    Judged from the headers alone, before any body is read: ``Set-Cookie`` (a session must not
    leak to other callers), ``Content-Type: text/event-stream`` (endless), or a ``Content-Length``
    above ``max_body_size``. A body without ``Content-Length`` that grows past the limit while it
    is read is the adapter's to catch (then it streams the rest to the leader).
    """
    for raw_name, raw_value in headers:
        name = _lower(raw_name)
        if name not in _SHARE_HEADERS:
            continue
        if name == "set-cookie":
            return "set-cookie"
        if name == "content-type" and _text(raw_value).lower().lstrip().startswith(
            "text/event-stream"
        ):
            return "event-stream"
        if name == "content-length":
            try:
                if int(_text(raw_value)) > max_body_size:
                    return "too-large"
            except ValueError:
                return "bad-content-length"
    return None


def is_cacheable(status: int, response_headers: HeaderPairs, request_headers: HeaderPairs) -> bool:
    """is_cacheable says whether a private cache may keep this response for a later caller.

    Only statuses in ``CACHEABLE_STATUSES`` (never 206); never with ``Cache-Control: no-store``,
    ``private`` or ``no-cache`` (or ``Pragma: no-cache`` on the request) on either side,
    ``Set-Cookie`` or ``Vary: *`` on the response. The TTL is ours: ``max-age`` is not read.
    """
    if status not in CACHEABLE_STATUSES:
        return False
    for raw_name, raw_value in response_headers:
        name = _lower(raw_name)
        if name not in _STORE_HEADERS:
            continue
        if name == "set-cookie":
            return False
        if name == "cache-control" and _directives(_text(raw_value)) & _REFUSE:
            return False
        if name == "vary" and "*" in {v.strip() for v in _text(raw_value).split(",")}:
            return False
    for raw_name, raw_value in request_headers:
        name = _lower(raw_name)
        if name in ("cache-control", "pragma") and _directives(_text(raw_value)) & _REFUSE:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Snapshot and its codec


@final
@dataclass(frozen=True, slots=True)
class Snapshot:
    """Snapshot is an immutable, shareable copy of one complete response.

    ``headers`` are the raw (name, value) byte pairs as received, duplicates and order kept;
    ``body`` holds the bytes as received by the adapter (httpx: still content-encoded; aiohttp
    with ``auto_decompress``: decoded, see the key's ``extra``). Every caller builds its own
    response object from it; the body bytes are shared, never copied. ``cacheable`` is decided
    once by the leader from its request and the response (``is_cacheable``).
    """

    status: int
    reason: str
    http_version: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    cacheable: bool = field(default=False, compare=False)

    @classmethod
    def build(
        cls,
        status: int,
        reason: str,
        http_version: str,
        headers: HeaderPairs,
        body: bytes,
        *,
        request_headers: HeaderPairs = (),
    ) -> Snapshot:
        """build makes a Snapshot, judging ``cacheable`` from the response and its request."""
        pairs = tuple(
            (n, v) if type(n) is bytes and type(v) is bytes else (_bytes(n), _bytes(v))
            for n, v in headers
        )
        cacheable = is_cacheable(status, pairs, request_headers)
        return cls(status, reason, http_version, pairs, body, cacheable)

    def header(self, name: str) -> list[bytes]:
        """header returns every value of ``name`` (case-insensitive), in order."""
        wanted = name.lower().encode("latin-1")
        return [v for n, v in self.headers if n.lower() == wanted]


@final
class SnapshotCodec:
    """SnapshotCodec turns a Snapshot into bytes and back, safely: no pickle, versioned.

    Layout: ``b"SFSN"``, one version byte, a 4-byte big-endian length, that many bytes of UTF-8
    JSON metadata (status, reason, http_version, headers as latin-1 strings, cacheable), then the
    raw body bytes. Decoding validates every field and raises ``ValueError`` on anything else, so
    bytes from a shared store can never run code or build a malformed response.
    """

    MAGIC: Final = b"SFSN"
    VERSION: Final = 1
    _HEAD: Final = struct.Struct(">4sBI")

    def encode(self, value: Snapshot) -> bytes:
        """encode serialises ``value`` (a Snapshot) to bytes."""
        meta = {
            "status": value.status,
            "reason": value.reason,
            "http_version": value.http_version,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in value.headers],
            "cacheable": value.cacheable,
        }
        blob = json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return self._HEAD.pack(self.MAGIC, self.VERSION, len(blob)) + blob + value.body

    def decode(self, data: bytes) -> Snapshot:
        """decode rebuilds a Snapshot from ``encode`` output; ``ValueError`` if malformed."""
        view = bytes(data)
        if len(view) < self._HEAD.size:
            raise ValueError("not a singleflight snapshot: too short")
        magic, version, size = self._HEAD.unpack_from(view)
        if magic != self.MAGIC:
            raise ValueError("not a singleflight snapshot: bad magic")
        if version != self.VERSION:
            raise ValueError(f"unsupported snapshot version {version}, expected {self.VERSION}")
        start = self._HEAD.size
        if len(view) < start + size:
            raise ValueError("truncated snapshot metadata")
        try:
            meta = json.loads(view[start : start + size])
            status, reason, version_s = meta["status"], meta["reason"], meta["http_version"]
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"])
            cacheable = meta["cacheable"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed snapshot metadata: {exc}") from None
        if not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 999):
            raise ValueError(f"malformed snapshot: status {status!r}")
        if not (isinstance(reason, str) and isinstance(version_s, str)):
            raise ValueError("malformed snapshot: reason and http_version must be strings")
        if not isinstance(cacheable, bool):
            raise ValueError("malformed snapshot: cacheable must be a boolean")
        return Snapshot(status, reason, version_s, headers, view[start + size :], cacheable)


SNAPSHOT_CODEC: Final = SnapshotCodec()
"""The codec both adapters hand to ``Group(codec=...)`` so a Redis tier stores Snapshots."""


# --------------------------------------------------------------------------------------------
# Options shared by both adapters

_KeyFn = Callable[[Any], "Hashable | None"]


def _fail_type(name: str, expected: str, value: object, fix: str) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}); {fix}")


def _check_methods(methods: object) -> frozenset[str]:
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise _fail_type(
            "methods", "a collection of method names", methods, 'pass e.g. methods=("GET", "HEAD")'
        )
    out = set()
    for m in methods:
        if not isinstance(m, str) or not _TOKEN.fullmatch(m):
            raise ValueError(
                f"methods must hold HTTP method names such as 'GET', got {m!r} in {methods!r}; "
                'pass e.g. methods=("GET", "HEAD")'
            )
        out.add(m.upper())
    return frozenset(out)


def _check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise _fail_type("ttl", "a number of seconds or None", ttl, "pass e.g. ttl=5.0")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(
            f"ttl must be > 0 and finite, got {ttl!r}; pass ttl=None to disable caching"
        )
    return float(ttl)


def _check_maxsize(maxsize: object) -> int:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise _fail_type("maxsize", "an int", maxsize, "pass e.g. maxsize=1024")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize}; pass ttl=None to disable caching")
    return maxsize


def _check_ignore_headers(ignore_headers: object) -> HeaderFilter:
    if isinstance(ignore_headers, HeaderFilter):
        return ignore_headers
    if isinstance(ignore_headers, (str, bytes)) or not isinstance(ignore_headers, Iterable):
        raise _fail_type(
            "ignore_headers",
            "a collection of header names",
            ignore_headers,
            'pass e.g. ignore_headers=DEFAULT_IGNORE_HEADERS | {"x-my-trace"}',
        )
    names = list(ignore_headers)
    for n in names:
        if not isinstance(n, str) or not n or n == "*":
            raise ValueError(
                f"ignore_headers must hold header names (a trailing * matches a prefix), got {n!r}"
            )
    result = HeaderFilter(names)
    leaked = sorted(h for h in CREDENTIAL_HEADERS if h in result)
    if leaked:
        raise ValueError(
            f"ignore_headers would leave credentials out of the key ({', '.join(leaked)}): callers "
            "with different credentials would share responses; if that is really wanted, pass "
            "key= (a callable request -> hashable) instead"
        )
    return result


def _check_max_body_size(max_body_size: object) -> int:
    if isinstance(max_body_size, bool) or not isinstance(max_body_size, int):
        raise _fail_type(
            "max_body_size", "an int number of bytes", max_body_size, "pass e.g. 16 * 1024 * 1024"
        )
    if max_body_size < 0:
        raise ValueError(
            f"max_body_size must be >= 0, got {max_body_size}; pass e.g. 16 * 1024 * 1024"
        )
    return max_body_size


@final
@dataclass(frozen=True, slots=True)
class HTTPOptions:
    """HTTPOptions holds the validated options both adapters take, and builds their Group.

    Build it with ``HTTPOptions.build(...)``, which checks each option at construction and raises
    ``TypeError``/``ValueError`` naming the parameter, the bad value and the fix.
    """

    methods: frozenset[str]
    ttl: float | None
    maxsize: int
    cache: MutableMapping[Any, Any] | None
    key: _KeyFn | None
    ignore_headers: HeaderFilter
    max_body_size: int

    @classmethod
    def build(
        cls,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        ttl: float | None = None,
        maxsize: int = 1024,
        cache: MutableMapping[Any, Any] | None = None,
        key: _KeyFn | None = None,
        ignore_headers: Iterable[str] = DEFAULT_IGNORE_HEADERS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> HTTPOptions:
        """build validates every option and returns the options object."""
        if cache is not None and not isinstance(cache, MutableMapping):
            raise _fail_type(
                "cache", "a MutableMapping or None", cache, "pass e.g. cachetools.TTLCache(1024, 5)"
            )
        if cache is not None and ttl is not None:
            raise ValueError(
                f"pass either cache= or ttl=, not both (got ttl={ttl!r} and a cache); "
                "the cache decides its own expiry"
            )
        if key is not None and not callable(key):
            raise _fail_type(
                "key",
                "a callable request -> hashable (or None to bypass)",
                key,
                "pass e.g. key=lambda request: str(request.url), or key=None for the default",
            )
        return cls(
            methods=_check_methods(methods),
            ttl=_check_ttl(ttl),
            maxsize=_check_maxsize(maxsize),
            cache=cache,
            key=key,
            ignore_headers=_check_ignore_headers(ignore_headers),
            max_body_size=_check_max_body_size(max_body_size),
        )

    def make_cache(self) -> MutableMapping[Any, Any] | None:
        """make_cache returns ``cache``, or a ``cachetools.TTLCache(maxsize, ttl)`` if ttl is set.

        The Group stores a value when its flight completes, so the TTL counts from completion.
        """
        if self.cache is not None:
            return self.cache
        if self.ttl is None:
            return None
        from cachetools import TTLCache

        return TTLCache(maxsize=self.maxsize, ttl=self.ttl)

    def make_group(
        self,
        *,
        group: Group[Any] | None = None,
        tier: Any = None,
        reelect_on: tuple[type[BaseException], ...] = (),
    ) -> Group[Any]:
        """make_group returns ``group`` as given, or a new Group with this cache and policy.

        A new Group stores only cacheable Snapshots (``cache_if``), re-elects on ``reelect_on``
        (the client library's timeout exceptions) and stores Snapshots in ``tier`` with
        ``SNAPSHOT_CODEC``. A given ``group`` keeps its own cache and tier, so ``ttl``/``cache``/
        ``tier`` alongside it are refused.
        """
        from singleflight._group import Group

        if group is not None:
            if not isinstance(group, Group):
                raise _fail_type("group", "a singleflight.Group", group, "or group=None")
            if self.ttl is not None or self.cache is not None or tier is not None:
                raise ValueError(
                    "group= brings its own cache and tier: pass ttl=/cache=/tier= to the Group "
                    "(Group(cache=..., tier=...)) or drop group="
                )
            return group
        return Group(
            self.make_cache(),
            cache_if=_snapshot_is_cacheable,
            reelect_on=reelect_on,
            tier=tier,
            codec=SNAPSHOT_CODEC,
        )

    def key_for(
        self,
        request: object,
        method: str,
        url: str,
        headers: HeaderPairs,
        extra: tuple[Hashable, ...] = (),
        *,
        userinfo: str | None = None,
    ) -> Hashable | None:
        """key_for returns the Group key of a request, or None when it must bypass.

        With ``key=`` set, ``key(request)`` replaces the default policy (None means bypass), and
        the method and ``extra`` are still added, so a HEAD never shares with a GET and raw bodies
        never mix with decoded ones. Otherwise it is ``request_key(...)`` with ``ignore_headers``;
        pass ``userinfo`` (``""`` if none) when ``url`` is already normalised (see
        ``key_from_parts``).
        """
        if self.key is not None:
            custom = self.key(request)
            if custom is None:
                return None
            return ("key", method.upper(), custom, extra)
        if userinfo is None:
            url, userinfo = _split_url(url)
        return key_from_parts(
            method, url, userinfo, headers, ignore=self.ignore_headers, extra=extra
        )


def _snapshot_is_cacheable(value: object) -> bool:
    return isinstance(value, Snapshot) and value.cacheable


# --------------------------------------------------------------------------------------------
# A follower's own read timeout: how far the shared response has come, and a deadline on it


@final
class Progress:
    """Progress says how far a flight's upstream response has come, across its leaders.

    Each leader calls ``start()``, then counts what arrives: ``advance()`` for the headers and
    each chunk, or ``follow()`` a reader whose ``total_bytes`` grows (aiohttp). A waiting
    follower compares ``mark()``s: the furthest any leader of the flight got. It moves only when
    the response gets further than ever before, so a re-elected leader's fresh start (headers
    again) is not news, and a chain of leaders that each stall cannot keep followers waiting.
    While the mark moves the shared request is not silent, so a follower's read timeout starts
    over, as a lone caller's would with each read. Shared per flight through ``progress_of``.
    """

    __slots__ = ("__weakref__", "_best", "_count", "_reader")

    def __init__(self) -> None:
        self._best = 0  # the furthest an earlier leader got
        self._count = 0  # what the current leader counted
        self._reader: Any = None  # ... plus what this reader received

    def start(self) -> None:
        """A (new) leader sends the request: it counts from zero."""
        self._best = self.mark()
        self._count = 0
        self._reader = None

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units (bytes, or 1 for the headers) received by the leader."""
        self._count += n

    def follow(self, reader: Any) -> None:
        """Count what ``reader`` (an object whose ``total_bytes`` grows) receives, too."""
        self._reader = reader

    def mark(self) -> int:
        """The furthest any leader of the flight got; grows when the response moves on."""
        reader = self._reader
        count = self._count if reader is None else self._count + reader.total_bytes
        return count if count > self._best else self._best


_PROGRESS: weakref.WeakValueDictionary[tuple[int, Hashable], Progress] = (
    weakref.WeakValueDictionary()
)


def progress_of(group: object, key: Hashable) -> Progress:
    """The Progress of ``key``'s flight in ``group``: made on first use, shared by every
    adapter on that group (leader and followers alike), dropped when nobody holds it."""
    ref = (id(group), key)
    progress = _PROGRESS.get(ref)
    if progress is None:
        progress = _PROGRESS.setdefault(ref, Progress())
    return progress


@final
class Deadline:
    """A follower's own read timeout on asyncio: cancels its task unless disarmed.

    Both adapters arm one while a caller waits on someone else's flight: the leader's timeouts
    govern the shared request, not the follower's. It fires when the shared response has been
    silent for ``budget`` seconds (its ``Progress`` did not move in that time; without one, at
    ``budget``), and is disarmed the moment the caller leads, when the client library's own
    timeouts take over. Like ``asyncio.timeout`` (3.11+ only): cancel the task, then tell our
    cancellation from anyone else's with ``uncancel``. Setting ``deadline = math.inf`` disarms
    it (the same spelling as ``anyio.CancelScope``, so the httpx transport's ``fetch`` serves
    both).
    """

    __slots__ = ("_budget", "_fired", "_handle", "_mark", "_progress", "_task")

    def __init__(self, budget: float, progress: Progress | None = None) -> None:
        self._task = asyncio.current_task()
        self._fired = False
        self._budget = budget
        self._progress = progress
        self._mark = 0 if progress is None else progress.mark()
        self._handle = asyncio.get_running_loop().call_later(budget, self._fire)

    def _fire(self) -> None:
        progress = self._progress
        if progress is not None and progress.mark() != self._mark:
            # The shared response moved on within the last budget: a fresh read timeout.
            self._mark = progress.mark()
            self._handle = asyncio.get_running_loop().call_later(self._budget, self._fire)
        elif self._task is not None:
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
