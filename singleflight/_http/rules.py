"""The rules: which requests bypass, which responses are never shared, which may be cached."""

from __future__ import annotations

from collections.abc import Collection
from typing import Final
from urllib.parse import urljoin, urlsplit

from .headers import HeaderPairs, _lower, _text
from .key import normalise_url

__all__ = (
    "CACHEABLE_STATUSES",
    "ClientClosed",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_METHODS",
    "bypass_reason",
    "invalidated_urls",
    "is_cacheable",
    "unshareable_reason",
)


DEFAULT_METHODS: Final = ("GET", "HEAD")
"""Methods coalesced unless ``methods=`` says otherwise."""

DEFAULT_MAX_BODY_SIZE: Final = 16 * 1024 * 1024
"""Bodies above this many bytes (16 MiB) are streamed to their leader, never buffered to share."""

CACHEABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 404, 405, 410, 414, 501})
"""Statuses the TTL layer may store (RFC 9110 §15.1 "heuristically cacheable", minus 206)."""


# The only header names each rule reads (the loops skip every other header cheaply).
_BYPASS_HEADERS: Final = frozenset({"upgrade", "accept", "transfer-encoding", "content-length"})
_SHARE_HEADERS: Final = frozenset({"set-cookie", "content-type", "content-length"})
_STORE_HEADERS: Final = frozenset({"set-cookie", "cache-control", "vary"})
_REFUSE: Final = frozenset({"no-store", "private", "no-cache"})  # Cache-Control: never store


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
    headers: HeaderPairs, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE, status: int = 200
) -> str | None:
    """unshareable_reason says why a response goes to its leader only, or None to share it.

    Judged from the status and headers alone, before any body is read: a 1xx ``status`` (``101
    Switching Protocols`` hands its caller the connection itself, which no copy can carry),
    ``Set-Cookie`` (a session must not leak to other callers), ``Content-Type:
    text/event-stream`` (endless), or a ``Content-Length`` above ``max_body_size``. A body
    without ``Content-Length`` that grows past the limit while it is read is the adapter's to
    catch (then it streams the rest to the leader).
    """
    if 100 <= status < 200:
        return "informational"
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


class ClientClosed(Exception):
    """ClientClosed: the leader's own client was closed while its request was in flight.

    The rule: that ends the leader's attempt only, like its cancellation. An adapter raises it
    from the leader's work (chained to the client library's error) and hands the leader the
    original error; every HTTP Group re-elects on it, so one follower makes the request afresh
    and the other clients' callers never see the closed client's error.
    """


_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_LOCATIONS: Final = frozenset({"location", "content-location"})


def invalidated_urls(
    method: str, status: int, url: str, response_headers: HeaderPairs
) -> tuple[str, ...]:
    """invalidated_urls lists the normalised URLs whose cached GET/HEAD responses a write ends.

    RFC 9111 §4.4: a non-error response (2xx, 3xx) to an unsafe method (PUT, POST, DELETE,
    PATCH, anything but GET/HEAD/OPTIONS/TRACE) invalidates the target URL, and the URLs in its
    ``Location`` and ``Content-Location`` (resolved against the target) when they share its
    origin; another origin's entries are never touched. Otherwise it returns ``()``.
    """
    if method.upper() in _SAFE_METHODS or not 200 <= status < 400:
        return ()
    target = normalise_url(url)
    origin = urlsplit(target)[:2]
    found = [target]
    for raw_name, raw_value in response_headers:
        if _lower(raw_name) in _LOCATIONS:
            other = normalise_url(urljoin(target, _text(raw_value).strip()))
            if urlsplit(other)[:2] == origin and other not in found:
                found.append(other)
    return tuple(found)
