"""The request key: what makes two requests "the same request" (and what separates callers)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Hashable, Iterable
from operator import itemgetter
from typing import Final, NamedTuple, final
from urllib.parse import urlsplit, urlunsplit

from .headers import _MEMO_LIMIT, HeaderPairs, _bytes, _lower

__all__ = (
    "CREDENTIAL_HEADERS",
    "DEFAULT_IGNORE_HEADERS",
    "HeaderFilter",
    "RequestKey",
    "key_from_parts",
    "normalise_url",
    "request_key",
)


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

_first: Final = itemgetter(0)

# Header names whose values are never credentials: a request whose kept headers are all among
# them (and whose URL has no userinfo) has its digest memoised per header list, since clients
# send the same few default headers on every request. The memo holds those values in clear
# (user agents, media types), never a header outside this list: an unknown header may be a
# credential (X-API-Key), so any other kept header, or userinfo, skips the memo.
_HARMLESS: Final = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"user-agent",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"content-type",
        b"cache-control",
        b"pragma",
    }
)
_DIGEST_LIMIT: Final = 1024  # header lists memoised per filter (bounded: values vary)

_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


@final
class HeaderFilter:
    """HeaderFilter says which header names stay out of the key (case-insensitive).

    Entries are exact names or prefixes ending in ``*`` (``"x-b3-*"``). Answers are memoised per
    raw name: headers come from a small vocabulary, and the key is computed on every request.
    """

    __slots__ = ("_digests", "_exact", "_memo", "_prefixes", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: frozenset[str] = frozenset(n.lower() for n in names)
        self._exact = frozenset(n for n in self.names if not n.endswith("*"))
        self._prefixes = tuple(n[:-1] for n in self.names if n.endswith("*"))
        # raw name -> lower-cased name as bytes, or b"" if ignored; benign races (see _LOWER)
        self._memo: dict[str | bytes, bytes] = {}
        # harmless kept headers (see _HARMLESS) -> their digest; benign races, as _memo
        self._digests: dict[tuple[tuple[bytes, bytes], ...], str] = {}

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
    memo = ignore._memo
    kept: list[tuple[bytes, bytes]] = []
    plain = not userinfo  # every kept name harmless so far (see _HARMLESS): memoise the digest
    for name, value in headers:  # one pass; the filter's memo read inline (a call per header)
        low = memo.get(name)
        if low is None:
            low = ignore.kept_name(name)
        if low:
            if isinstance(value, str):
                try:
                    value = value.encode("latin-1")
                except UnicodeEncodeError:  # aiohttp sends such header values as UTF-8
                    value = _bytes(value)
            kept.append((low, value))
            if plain and low not in _HARMLESS:
                plain = False
    if plain:
        pairs = tuple(kept)
        digests = ignore._digests
        hexed = digests.get(pairs)
        if hexed is None:
            hexed = _digest(kept, userinfo)
            if len(digests) < _DIGEST_LIMIT:
                digests[pairs] = hexed
    else:
        hexed = _digest(kept, userinfo)
    return RequestKey(method.upper(), normal_url, hexed, extra)


def _digest(kept: list[tuple[bytes, bytes]], userinfo: str) -> str:
    # Sort on the name only: values of a repeated header keep their order (stable sort).
    kept.sort(key=_first)
    digest = hashlib.blake2b(digest_size=16)
    if userinfo:  # ended by a newline, which no header line can begin with: no run-together
        digest.update(userinfo.encode("utf-8", "surrogateescape") + b"\n")
    digest.update(b"\n".join([n + b":" + v for n, v in kept]))
    return digest.hexdigest()
