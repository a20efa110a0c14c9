"""Header pairs as the adapters hand them over: str or bytes, names compared lower-cased."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ("HeaderPairs",)


HeaderPairs = Iterable[tuple["str | bytes", "str | bytes"]]
"""Headers as (name, value) pairs, str or bytes (latin-1), duplicates and order kept."""


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
