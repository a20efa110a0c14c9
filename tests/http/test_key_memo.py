"""The request key's digest memo: same keys as without it, bounded, and no credential in it."""

from __future__ import annotations

from singleflight._http.key import (
    _DIGEST_LIMIT,
    DEFAULT_IGNORE_HEADERS,
    HeaderFilter,
    key_from_parts,
)

URL = "http://example.test/a"
DEFAULTS = [("Host", "example.test"), ("Accept", "*/*"), ("User-Agent", "ua/1")]


def _fresh(headers: list[tuple[str, str]], userinfo: str = "") -> str:
    """The digest from a filter that has memoised nothing yet."""
    return key_from_parts(
        "GET", URL, userinfo, headers, ignore=HeaderFilter(DEFAULT_IGNORE_HEADERS)
    ).headers


def test_a_memoised_digest_equals_the_one_computed_afresh() -> None:
    f = HeaderFilter(DEFAULT_IGNORE_HEADERS)
    first = key_from_parts("GET", URL, "", DEFAULTS, ignore=f)
    assert f._digests  # harmless headers only: memoised
    again = key_from_parts("GET", URL, "", list(DEFAULTS), ignore=f)
    assert again == first
    assert first.headers == _fresh(DEFAULTS)
    # Order does not matter (sorted before hashing), memo or not.
    assert key_from_parts("GET", URL, "", DEFAULTS[::-1], ignore=f) == first
    # Values still separate callers through the memo.
    other = [("Host", "example.test"), ("Accept", "*/*"), ("User-Agent", "ua/2")]
    assert key_from_parts("GET", URL, "", other, ignore=f) != first
    assert key_from_parts("GET", URL, "", other, ignore=f).headers == _fresh(other)


def test_credentials_and_unknown_headers_never_enter_the_memo() -> None:
    f = HeaderFilter(DEFAULT_IGNORE_HEADERS)
    secret = "s3cr3t-value"
    for extra in (("Authorization", secret), ("Cookie", secret), ("X-API-Key", secret)):
        k = key_from_parts("GET", URL, "", [*DEFAULTS, extra], ignore=f)
        assert k.headers == _fresh([*DEFAULTS, extra])
        assert k != key_from_parts("GET", URL, "", DEFAULTS, ignore=f)
    k = key_from_parts("GET", URL, "user:" + secret, DEFAULTS, ignore=f)
    assert k.headers == _fresh(DEFAULTS, "user:" + secret)
    assert secret.encode() not in repr(f._digests).encode()
    assert all(name in {b"host", b"accept", b"user-agent"} for p in f._digests for name, _ in p)


def test_the_memo_is_bounded() -> None:
    f = HeaderFilter(DEFAULT_IGNORE_HEADERS)
    for i in range(_DIGEST_LIMIT + 50):
        headers = [("User-Agent", f"ua/{i}")]
        assert key_from_parts("GET", URL, "", headers, ignore=f).headers == _fresh(headers)
    assert len(f._digests) == _DIGEST_LIMIT


def test_a_value_outside_latin_1_is_keyed_as_utf_8() -> None:
    f = HeaderFilter(DEFAULT_IGNORE_HEADERS)
    a = key_from_parts("GET", URL, "", [("User-Agent", "é€")], ignore=f)
    b = key_from_parts("GET", URL, "", [("User-Agent", "é€".encode())], ignore=f)
    assert a == b
