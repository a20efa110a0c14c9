"""Freshness from Cache-Control: how long a private cache may serve a response, and stale."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .headers import HeaderPairs, _lower, _text

__all__ = ("Freshness", "cache_control", "freshness")

Freshness = tuple[float, float]
"""``(ttl, stale_ttl)``: fresh for ``ttl`` seconds, then served stale for ``stale_ttl`` more."""

_NEVER: Final = frozenset({"no-store", "no-cache", "private"})  # never kept (rules._REFUSE)


def cache_control(headers: HeaderPairs) -> dict[str, list[str | None]]:
    """Every Cache-Control directive of ``headers`` (all its lines), lower-cased, in order.

    ``{"max-age": ["60"], "must-revalidate": [None]}``: a directive's values (None when it has
    none), quotes taken off (RFC 9111 §5.2: recipients accept ``max-age="60"``).
    """
    out: dict[str, list[str | None]] = {}
    for raw_name, raw_value in headers:
        if _lower(raw_name) != "cache-control":
            continue
        for part in _text(raw_value).split(","):
            name, eq, value = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            arg = value.strip().strip('"') if eq else None
            out.setdefault(name, []).append(arg)
    return out


def _seconds(values: Iterable[str | None] | None) -> int | None:
    """A delta-seconds directive's value; None if absent, malformed or given twice differently.

    RFC 9111 §4.2.1: with conflicting values the response is to be treated as stale, so a
    conflict counts as no value at all (never the longer of the two).
    """
    if values is None:
        return None
    found = {v for v in values}
    if len(found) != 1:
        return None
    (value,) = found
    if value is None or not value.isdigit() or not value.isascii():
        return None
    return int(value)


def freshness(headers: HeaderPairs, max_ttl: float | None = None) -> Freshness | None:
    """How long a private cache may keep a response with these headers, or None: not at all.

    - ``ttl``: ``max-age`` minus the response's ``Age`` (time it already spent in caches on
      the way; past ``max-age`` it eats into the stale window); no ``max-age`` (or a
      malformed one): None. ``s-maxage`` is for shared caches
      and is ignored: this is a private cache. ``Expires`` is not read.
    - ``stale_ttl``: the longer of ``stale-while-revalidate`` and ``stale-if-error`` (RFC
      5861): in that window a caller is answered at once with the stale response while one
      refresh runs, and keeps getting it while refreshes fail. ``must-revalidate`` (and
      ``proxy-revalidate``) forbid stale: 0.
    - ``no-store``, ``no-cache``, ``private``: None.
    - ``max_ttl`` caps both times (a misconfigured upstream cannot pin a response for a year).

    A response with neither a fresh nor a stale second left is None.
    """
    cc = cache_control(headers)
    if _NEVER & cc.keys():
        return None
    max_age = _seconds(cc.get("max-age"))
    if max_age is None:
        return None
    age = 0
    for raw_name, raw_value in headers:
        if _lower(raw_name) == "age":
            text = _text(raw_value).strip()
            age = int(text) if text.isdigit() and text.isascii() else age
            break  # RFC 9111 §5.1: the first Age line; a malformed one is ignored
    left = max_age - age  # < 0: already stale for -left seconds when it reached us
    stale = 0
    if not ("must-revalidate" in cc or "proxy-revalidate" in cc):
        swr = _seconds(cc.get("stale-while-revalidate")) or 0
        sie = _seconds(cc.get("stale-if-error")) or 0
        stale = max(0, max(swr, sie) + min(0, left))
    fresh_for, stale_for = float(max(0, left)), float(stale)
    if max_ttl is not None:
        fresh_for, stale_for = min(fresh_for, max_ttl), min(stale_for, max_ttl)
    if fresh_for <= 0 and stale_for <= 0:
        return None
    return fresh_for, stale_for
