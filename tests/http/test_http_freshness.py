"""Cache-Control freshness (singleflight._http.freshness), table-driven, client-independent."""

from __future__ import annotations

import pytest

from singleflight._http.freshness import cache_control, freshness


def cc(*values: str, age: str | None = None) -> list[tuple[bytes, bytes]]:
    pairs = [(b"Cache-Control", v.encode()) for v in values]
    if age is not None:
        pairs.append((b"Age", age.encode()))
    return pairs


@pytest.mark.parametrize(
    ("headers", "max_ttl", "expected"),
    [
        (cc("max-age=60"), None, (60.0, 0.0)),
        (cc("public, max-age=60, stale-while-revalidate=30"), None, (60.0, 30.0)),
        (cc("max-age=60, stale-if-error=300"), None, (60.0, 300.0)),
        (cc("max-age=60, stale-while-revalidate=30, stale-if-error=10"), None, (60.0, 30.0)),
        (cc("max-age=60", "stale-while-revalidate=30"), None, (60.0, 30.0)),  # two lines
        (cc("MAX-AGE=60, Stale-While-Revalidate=5"), None, (60.0, 5.0)),  # case-insensitive
        (cc('max-age="60"'), None, (60.0, 0.0)),  # quoted: accepted (RFC 9111 5.2)
        (cc("max-age=0, stale-while-revalidate=30"), None, (0.0, 30.0)),  # stale at once
        (cc("max-age=60, must-revalidate, stale-while-revalidate=30"), None, (60.0, 0.0)),
        (cc("max-age=60, proxy-revalidate, stale-if-error=30"), None, (60.0, 0.0)),
        (cc("s-maxage=600"), None, None),  # for shared caches: this one is private
        (cc("s-maxage=600, max-age=5"), None, (5.0, 0.0)),
        (cc("public"), None, None),  # no max-age: not cached
        ([], None, None),
        (cc("max-age=60, no-store"), None, None),
        (cc("max-age=60, no-cache"), None, None),
        (cc("private, max-age=60"), None, None),
        (cc("max-age=abc"), None, None),  # malformed
        (cc("max-age=-5"), None, None),
        (cc("max-age=60, max-age=30"), None, None),  # conflicting: treated as stale
        (cc("max-age=60", "max-age=60"), None, (60.0, 0.0)),  # the same twice is fine
        (cc("max-age=0"), None, None),  # nothing fresh, nothing stale
        (cc("max-age=60, stale-while-revalidate=x"), None, (60.0, 0.0)),
        (cc("max-age=86400, stale-if-error=604800"), 300.0, (300.0, 300.0)),  # capped
        (cc("max-age=60", age="20"), None, (40.0, 0.0)),  # time spent in caches upstream
        (cc("max-age=60, stale-while-revalidate=30", age="80"), None, (0.0, 10.0)),
        (cc("max-age=60, stale-while-revalidate=30", age="100"), None, None),
        (cc("max-age=60", age="junk"), None, (60.0, 0.0)),
    ],
)
def test_freshness(
    headers: list[tuple[bytes, bytes]],
    max_ttl: float | None,
    expected: tuple[float, float] | None,
) -> None:
    assert freshness(headers, max_ttl) == expected


def test_cache_control_keeps_every_directive_and_value() -> None:
    got = cache_control([("cache-control", "max-age=1, no-transform"), (b"X", b"max-age=9")])
    assert got == {"max-age": ["1"], "no-transform": [None]}
