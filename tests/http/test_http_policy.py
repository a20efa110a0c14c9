"""The client-independent HTTP policy in singleflight._http: keys, rules, Snapshot, options."""

from __future__ import annotations

import pytest
from cachetools import TTLCache

from singleflight import Group
from singleflight._http import (
    CACHEABLE_STATUSES,
    DEFAULT_IGNORE_HEADERS,
    SNAPSHOT_CODEC,
    HeaderFilter,
    HTTPOptions,
    RequestKey,
    Snapshot,
    bypass_reason,
    http_group,
    is_cacheable,
    normalise_url,
    request_key,
    unshareable_reason,
)

BASE = [(b"Host", b"api.example"), (b"Accept", b"*/*"), (b"User-Agent", b"t/1")]


def key(headers=BASE, url="https://api.example/v1/items?b=2&a=1", method="GET", **kw):
    return request_key(method, url, headers, **kw)


# -- key policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://Example.COM:80/a?x=1#frag", "http://example.com/a?x=1"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://user:secret@example.com/a", "http://example.com/a"),
        ("http://[::1]:80/a", "http://[::1]/a"),
        ("http://example.com/a?b=2&a=1", "http://example.com/a?b=2&a=1"),  # order kept
    ],
)
def test_normalise_url(url, expected):
    assert normalise_url(url) == expected


def test_same_request_same_key_and_header_order_does_not_matter():
    assert key() == key(list(reversed(BASE)))
    assert key([(n.decode(), v.decode()) for n, v in BASE]) == key()  # str or bytes alike
    assert key([(n.upper(), v) for n, v in BASE]) == key()  # names are case-insensitive
    assert isinstance(key(), RequestKey)
    assert hash(key()) == hash(key())


@pytest.mark.parametrize(
    "header",
    [
        (b"Authorization", b"Bearer alice"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Cookie", b"sid=1"),
        (b"X-API-Key", b"k1"),
        (b"Accept-Encoding", b"gzip"),
        (b"Accept-Language", b"fr"),
        (b"Range", b"bytes=0-9"),
        (b"If-None-Match", b'"v1"'),
        (b"If-Modified-Since", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Cache-Control", b"no-cache"),
    ],
)
def test_semantic_and_credential_headers_separate_callers(header):
    name, value = header
    with_it = key([*BASE, header])
    assert with_it != key()
    assert with_it != key([*BASE, (name, value + b"2")])


def test_non_latin1_header_values_hash_as_utf8():
    a = key([*BASE, ("X-Name", "Zoë ☃")])
    assert a == key([*BASE, (b"X-Name", "Zoë ☃".encode())])
    assert a != key([*BASE, ("X-Name", "Zoe")])


def test_repeated_header_values_keep_their_order():
    a = key([*BASE, (b"X-A", b"1"), (b"X-A", b"2")])
    b = key([*BASE, (b"X-A", b"2"), (b"X-A", b"1")])
    assert a != b


@pytest.mark.parametrize(
    "name",
    [
        "traceparent",
        "tracestate",
        "baggage",
        "sentry-trace",
        "x-request-id",
        "x-correlation-id",
        "b3",
        "x-b3-traceid",
        "X-B3-SpanId",
        "x-datadog-trace-id",
        "x-datadog-parent-id",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
    ],
)
def test_tracing_headers_do_not_split(name):
    assert key([*BASE, (name, "00-aaaa-01")]) == key([*BASE, (name, "00-bbbb-01")]) == key()


def test_values_never_in_clear_and_userinfo_is_hashed():
    k = key([*BASE, (b"Authorization", b"Bearer SECRET-TOKEN")])
    assert "SECRET" not in repr(k)
    with_user = key(url="https://bob:hunter2@api.example/v1")
    assert "hunter2" not in repr(with_user)
    assert with_user.url == "https://api.example/v1"
    assert with_user != key(url="https://eve:hunter2@api.example/v1")
    assert with_user != key(url="https://api.example/v1")


def test_method_and_extra_are_in_the_key():
    assert key(method="HEAD") != key()
    assert key(method="get") == key()
    assert key(extra=("raw",)) != key(extra=("decoded",))


def test_ignore_custom_and_prefix_patterns():
    ignore = HeaderFilter({"x-trace-*", "x-other"})
    assert "X-Trace-Anything" in ignore and "x-other" in ignore and "x-others" not in ignore
    assert 3 not in ignore
    a = key([*BASE, ("X-Trace-Id", "1"), ("traceparent", "a")], ignore=ignore)
    b = key([*BASE, ("X-Trace-Id", "2"), ("traceparent", "a")], ignore=ignore)
    assert a == b
    # Defaults replaced, not extended: traceparent now counts.
    assert a != key([*BASE, ("traceparent", "b")], ignore=ignore)
    assert "HeaderFilter" in repr(ignore)


def test_options_key_for_custom_key():
    opts = HTTPOptions.build(key=lambda req: None if req == "skip" else req)
    assert opts.key_for("skip", "GET", "http://x/", BASE) is None
    k = opts.key_for("user-key", "get", "http://x/", BASE, ("raw",))
    assert k == ("key", "GET", "user-key", ("raw",))
    assert opts.key_for("user-key", "HEAD", "http://x/", BASE, ("raw",)) != k


# -- bypass and sharing rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "has_body", "reason"),
    [
        ("GET", BASE, None, None),
        ("head", BASE, None, None),
        ("POST", BASE, None, "method"),
        ("DELETE", BASE, None, "method"),
        ("GET", [*BASE, (b"Content-Length", b"3")], None, "body"),
        ("GET", [*BASE, (b"Content-Length", b"0")], None, None),
        ("GET", [*BASE, (b"Transfer-Encoding", b"chunked")], None, "body"),
        ("GET", BASE, True, "body"),
        ("GET", [*BASE, (b"Content-Length", b"3")], False, None),
        ("GET", [*BASE, ("Upgrade", "websocket")], None, "upgrade"),
        ("GET", [("Accept", "text/event-stream")], None, "event-stream"),
    ],
)
def test_bypass_reason(method, headers, has_body, reason):
    assert bypass_reason(method, headers, has_body=has_body) == reason


def test_bypass_respects_methods():
    assert bypass_reason("GET", BASE, methods=frozenset({"HEAD"})) == "method"
    assert bypass_reason("OPTIONS", BASE, methods=frozenset({"OPTIONS"})) is None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"Content-Type", b"application/json"), (b"Content-Length", b"10")], None),
        ([(b"Set-Cookie", b"sid=1")], "set-cookie"),
        ([("content-type", "text/event-stream; charset=utf-8")], "event-stream"),
        ([(b"Content-Length", b"101")], "too-large"),
        ([(b"Content-Length", b"100")], None),
        ([(b"Content-Length", b"nope")], "bad-content-length"),
    ],
)
def test_unshareable_reason(headers, reason):
    assert unshareable_reason(headers, max_body_size=100) == reason


@pytest.mark.parametrize("status", [100, 101, 102, 103, 199])
def test_an_informational_response_is_never_shared(status):
    # 101 Switching Protocols hands its caller the connection: no copy can carry it.
    assert unshareable_reason([], status=status) == "informational"
    assert unshareable_reason([(b"Content-Length", b"0")], status=status) == "informational"


@pytest.mark.parametrize("status", [200, 204, 304, 404, 503])
def test_final_statuses_are_shared(status):
    assert unshareable_reason([], status=status) is None


@pytest.mark.parametrize("status", sorted(CACHEABLE_STATUSES))
def test_cacheable_statuses(status):
    assert is_cacheable(status, [], [])


@pytest.mark.parametrize("status", [201, 202, 206, 302, 304, 307, 400, 401, 403, 429, 500, 503])
def test_not_cacheable_statuses(status):
    assert not is_cacheable(status, [], [])


@pytest.mark.parametrize(
    ("response", "request_"),
    [
        ([(b"Cache-Control", b"no-store")], []),
        ([(b"Cache-Control", b"max-age=60, private")], []),
        ([(b"cache-control", b"No-Cache")], []),
        ([(b"Set-Cookie", b"a=b")], []),
        ([(b"Vary", b"Accept, *")], []),
        ([], [(b"Cache-Control", b"no-store")]),
        ([], [(b"Cache-Control", b"private")]),
        ([], [(b"Pragma", b"no-cache")]),
    ],
)
def test_never_cacheable(response, request_):
    assert not is_cacheable(200, response, request_)


def test_cacheable_with_harmless_directives():
    assert is_cacheable(200, [(b"Cache-Control", b"max-age=60, public"), (b"Vary", b"Accept")], [])


# -- Snapshot and its codec -------------------------------------------------------------------


def snap(**kw):
    fields = dict(
        status=200,
        reason="OK",
        http_version="HTTP/1.1",
        headers=[(b"Content-Encoding", b"gzip"), ("X-A", "1"), (b"X-A", b"\xe9")],
        body=bytes(range(256)),
    )
    fields.update(kw)
    return Snapshot.build(**fields)


def test_snapshot_is_immutable_and_judges_cacheability():
    s = snap()
    with pytest.raises(AttributeError):
        s.status = 500  # type: ignore[misc]
    assert s.headers[1] == (b"X-A", b"1")
    assert s.header("x-a") == [b"1", b"\xe9"]
    assert s.cacheable
    assert not snap(status=503).cacheable
    assert not snap(request_headers=[("Cache-Control", "no-store")]).cacheable


def test_codec_round_trip_keeps_every_byte():
    for s in (snap(), snap(body=b""), snap(status=503, reason="Service Unavailable")):
        data = SNAPSHOT_CODEC.encode(s)
        assert data.startswith(b"SFSN\x01")
        back = SNAPSHOT_CODEC.decode(data)
        assert back == s and back.cacheable == s.cacheable
        assert back.headers == s.headers and back.body == s.body
    assert SNAPSHOT_CODEC.decode(bytearray(SNAPSHOT_CODEC.encode(snap()))) == snap()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"XXXX\x01\x00\x00\x00\x00", "bad magic"),
        (b"SFSN\x02\x00\x00\x00\x00", "unsupported snapshot version 2"),
        (b"SFSN\x01\x00\x00\x00\xff{}", "truncated"),
        (b"SFSN\x01\x00\x00\x00\x02{}", "malformed snapshot metadata"),
        (b"SFSN\x01\x00\x00\x00\x04null", "malformed snapshot metadata"),
    ],
)
def test_codec_rejects_garbage(data, message):
    with pytest.raises(ValueError, match=message):
        SNAPSHOT_CODEC.decode(data)


def test_codec_validates_fields():
    import json
    import struct

    def blob(**meta):
        fields = dict(status=200, reason="OK", http_version="HTTP/1.1", headers=[], cacheable=1)
        fields.update(meta)
        raw = json.dumps(fields).encode()
        return b"SFSN\x01" + struct.pack(">I", len(raw)) + raw

    with pytest.raises(ValueError, match="cacheable"):
        SNAPSHOT_CODEC.decode(blob())
    with pytest.raises(ValueError, match="status"):
        SNAPSHOT_CODEC.decode(blob(status=True, cacheable=False))
    with pytest.raises(ValueError, match="strings"):
        SNAPSHOT_CODEC.decode(blob(reason=3, cacheable=False))
    with pytest.raises(ValueError, match="metadata"):
        SNAPSHOT_CODEC.decode(blob(headers=[["\u20ac", "x"]], cacheable=False))


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"methods": "GET"}, TypeError, ["methods", "'GET'", 'methods=("GET", "HEAD")']),
        ({"methods": ["GE T"]}, ValueError, ["methods", "'GE T'"]),
        ({"methods": [1]}, ValueError, ["methods", "1"]),
        ({"ttl": 0}, ValueError, ["ttl", "0", "ttl=None"]),
        ({"ttl": -1.5}, ValueError, ["ttl", "-1.5"]),
        ({"ttl": float("inf")}, ValueError, ["ttl", "inf"]),
        ({"ttl": "5"}, TypeError, ["ttl", "'5'", "ttl=5.0"]),
        ({"ttl": True}, TypeError, ["ttl", "True"]),
        ({"maxsize": 0}, ValueError, ["maxsize", "0"]),
        ({"maxsize": 1.5}, TypeError, ["maxsize", "1.5", "maxsize=1024"]),
        ({"cache": []}, TypeError, ["cache", "[]", "TTLCache"]),
        ({"cache": {}, "ttl": 1}, ValueError, ["cache=", "ttl="]),
        ({"key": "url"}, TypeError, ["key", "'url'", "key=lambda"]),
        ({"ignore_headers": "traceparent"}, TypeError, ["ignore_headers", "'traceparent'"]),
        ({"ignore_headers": ["authorization"]}, ValueError, ["authorization", "key="]),
        ({"ignore_headers": ["Cookie"]}, ValueError, ["cookie", "key="]),
        ({"ignore_headers": ["*"]}, ValueError, ["ignore_headers", "'*'"]),
        ({"ignore_headers": ["proxy-*"]}, ValueError, ["proxy-authorization"]),
        ({"ignore_headers": [""]}, ValueError, ["ignore_headers"]),
        ({"max_body_size": -1}, ValueError, ["max_body_size", "-1"]),
        ({"max_body_size": "1MB"}, TypeError, ["max_body_size", "'1MB'"]),
    ],
)
def test_bad_options_name_parameter_value_and_fix(kwargs, error, words):
    with pytest.raises(error) as info:
        HTTPOptions.build(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_options_defaults_and_cache():
    opts = HTTPOptions.build()
    assert opts.methods == {"GET", "HEAD"}
    assert opts.make_cache() is None
    assert opts.ignore_headers.names == DEFAULT_IGNORE_HEADERS
    cache = HTTPOptions.build(ttl=5, maxsize=10).make_cache()
    assert isinstance(cache, TTLCache) and cache.ttl == 5 and cache.maxsize == 10
    mine: dict[object, object] = {}
    assert HTTPOptions.build(cache=mine).make_cache() is mine
    assert HTTPOptions.build(methods=["get", "options"]).methods == {"GET", "OPTIONS"}


def test_make_group():
    opts = HTTPOptions.build(ttl=5)
    group = opts.make_group()
    assert isinstance(group, Group) and isinstance(group.cache, TTLCache)
    shared = http_group()
    assert HTTPOptions.build().make_group(group=shared) is shared
    with pytest.raises(ValueError, match=r"built for HTTP.*http_group\(ttl="):
        HTTPOptions.build().make_group(group=Group())  # hand-built: no HTTP rules
    with pytest.raises(ValueError, match="group= brings its own cache"):
        opts.make_group(group=shared)
    with pytest.raises(TypeError, match="group"):
        HTTPOptions.build().make_group(group=object())  # type: ignore[arg-type]


async def test_group_caches_only_cacheable_snapshots():
    group = HTTPOptions.build(ttl=60).make_group()

    async def fetch(s):
        return s

    await group.do("a", fetch, snap())
    await group.do("b", fetch, snap(status=503))
    await group.do("c", fetch, "not a snapshot")
    assert list(group.cache) == ["a"]
