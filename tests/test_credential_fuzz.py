"""Credential isolation fuzz: no caller ever gets a body produced for another header set.

Hypothesis draws a handful of request header sets per example: Authorization with different
schemes, credentials in headers nobody has heard of, cookies in different orders or split over
several ``Cookie`` headers, duplicated and multi-value headers, and near-misses of one another
(a cookie order swapped, a scheme's case changed, a duplicate's values reordered, a token moved to
another header). Each caller picks one, writes the header *names* in its own random case, and
adds its own tracing headers (which are in ``ignore_headers``). All callers of an example fire at
once, twice (the second wave meets the TTL cache), through each adapter, at an upstream that
echoes every header it received. Every caller then checks that the echo is its own header set,
ignored headers aside.

The keys the adapters computed are checked too: equal keys for equal header sets only (both
ways: a difference in name case alone must not split callers), and no header value in clear,
neither in a key nor in any record logged on "singleflight" at DEBUG level.

Sizes: ``FUZZ_EXAMPLES`` examples (env ``SINGLEFLIGHT_FUZZ_EXAMPLES``, default 100) per async
adapter of up to 40 callers x 2 waves, a third as many for the sync transport with threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from singleflight._http import DEFAULT_IGNORE_HEADERS, HeaderFilter
from singleflight.aiohttp import SingleflightMiddleware, served
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

pytestmark = pytest.mark.timeout(120)

FUZZ_EXAMPLES = int(os.environ.get("SINGLEFLIGHT_FUZZ_EXAMPLES", "100"))
DELAY = 0.03  # the upstream's think time: long enough for a burst's callers to overlap
IGNORE = HeaderFilter(DEFAULT_IGNORE_HEADERS | {"x-noise"})
SECRET = "tok_"  # every credential value carries it: it must never appear in a key or a log

Headers = list[tuple[str, str]]


# -- the upstream: echoes every header it received, in order -----------------------------------


class EchoUpstream:
    """An aiohttp server on 127.0.0.1, in its own thread, that echoes the raw request headers."""

    def __init__(self) -> None:
        self.hits = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _echo(self, request: web.Request) -> web.Response:
        self.hits += 1  # only the server loop touches it
        await asyncio.sleep(DELAY)
        pairs = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.raw_headers]
        return web.json_response({"hit": self.hits, "headers": pairs})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class LoopThread:
    """An event loop in a thread, so clients and sessions outlive each Hypothesis example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# -- header sets ---------------------------------------------------------------------------------

PRINCIPALS = ("alice", "bob", "carol")
SCHEMES = ("Bearer", "bearer", "Basic", "Token", "Digest")
UNKNOWN = ("X-API-Key", "X-Auth-Token", "X-Tenant", "X-Amz-Security-Token", "X-User", "Api-Key")
COOKIES = ("sid=tok_alice", "sid=tok_bob", "session=tok_carol", "theme=dark", "lang=en")
ACCEPTS = ("application/json", "text/plain", "application/json, text/plain", "*/*")


def token(principal: str) -> str:
    return f"{SECRET}{principal}"


@st.composite
def header_sets(draw: st.DrawFn) -> Headers:
    """One caller identity: credentials in known and unknown headers, cookies, Accept."""
    headers: Headers = []
    if draw(st.booleans()):
        scheme = draw(st.sampled_from(SCHEMES))
        headers.append(("Authorization", f"{scheme} {token(draw(st.sampled_from(PRINCIPALS)))}"))
    cookies = draw(st.lists(st.sampled_from(COOKIES), unique=True, max_size=3))
    if cookies:
        if len(cookies) > 1 and draw(st.booleans()):  # split over several Cookie headers
            headers.extend(("Cookie", c) for c in cookies)
        else:
            headers.append(("Cookie", "; ".join(cookies)))
    for name in draw(st.lists(st.sampled_from(UNKNOWN), max_size=3)):  # repeats: duplicates
        headers.append((name, token(draw(st.sampled_from(PRINCIPALS)))))
    accepts = draw(st.lists(st.sampled_from(ACCEPTS), max_size=2))
    headers.extend(("Accept", a) for a in accepts)  # two Accept lines: a multi-value header
    return headers


def mutate(headers: Headers, how: int) -> Headers:
    """A near-miss of ``headers``: a different header set the key must tell apart."""
    out = list(headers)
    if not out:
        return [("X-API-Key", token("alice"))]
    i = how % len(out)
    name, value = out[i]
    kind = how // len(out) % 6
    if kind == 0 and "; " in value:  # the same cookies in another order
        parts = value.split("; ")
        out[i] = (name, "; ".join(parts[1:] + parts[:1]))
    elif kind == 1 and " " in value:  # the scheme's case
        scheme, _, rest = value.partition(" ")
        out[i] = (name, f"{scheme.swapcase()} {rest}")
    elif kind == 2:  # this header duplicated, its copy first: the value order differs
        out.insert(i, (name, value + "x"))
    elif kind == 3:  # the same credential under another (unknown) header name
        other = next(n for n in UNKNOWN if n.lower() != name.lower())
        out[i] = (other, value)
    elif kind == 4:  # another principal's credential
        out[i] = (name, value.replace("alice", "bob").replace("bob", "carol") + "2")
    else:  # one header fewer
        del out[i]
    return out


@st.composite
def bursts(draw: st.DrawFn, max_callers: int) -> tuple[list[Headers], list[tuple[int, int]]]:
    """Identities (some near-misses of others) and the callers: (identity, case seed) each."""
    identities = [draw(header_sets())]
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            base = draw(st.sampled_from(identities))
            identities.append(mutate(base, draw(st.integers(0, 200))))
        else:
            identities.append(draw(header_sets()))
    n = draw(st.integers(2, max_callers))
    callers = draw(
        st.lists(
            st.tuples(st.integers(0, len(identities) - 1), st.integers(0, 2**32)),
            min_size=n,
            max_size=n,
        )
    )
    return identities, callers


def as_sent(identity: Headers, seed: int, *, one_case_per_name: bool = False) -> Headers:
    """The caller's own headers: names in a random case, plus its own ignored headers.

    ``one_case_per_name`` writes repeats of a name the same way: aiohttp keeps only the last
    of repeated headers whose names differ in case (``ClientSession._prepare_headers``).
    """
    rng = random.Random(seed)
    cases: dict[str, str] = {}

    def recase(name: str) -> str:
        new = "".join(rng.choice((c.lower(), c.upper())) for c in name)
        return cases.setdefault(name.lower(), new) if one_case_per_name else new

    recased = [(recase(n), v) for n, v in identity]
    noise = [
        ("traceparent", f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"),
        ("X-Request-ID", f"{rng.getrandbits(64):x}"),
        ("X-Noise", f"{rng.getrandbits(32):x}"),  # ignored by the adapters' ignore_headers
    ]
    return recased + noise[: rng.randint(0, 3)]


def text(s: str | bytes) -> str:
    return s.decode("latin-1") if isinstance(s, bytes) else s


def canonical(pairs: Any) -> tuple[tuple[str, str], ...]:
    """Names lower-cased, ignored headers dropped, sorted by name (repeats keep their order)."""
    kept = [(text(n).lower(), text(v)) for n, v in pairs if text(n).lower() not in IGNORE]
    return tuple(sorted(kept, key=lambda p: p[0]))


def identity_of(url: str, sent: Headers) -> Any:
    """What the key must tell apart: the URL and the header set as the client will send it.

    httpx and aiohttp both add ``Accept: */*`` when the caller sets no Accept, so no Accept and
    ``Accept: */*`` are the same request (and rightly share).
    """
    if not any(n.lower() == "accept" for n, _ in sent):
        sent = [*sent, ("Accept", "*/*")]
    return url, canonical(sent)


# -- bookkeeping -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the fuzz did, per adapter; printed at the end (run with -s to see it)."""

    requests: int = 0
    header_sets: int = 0  # drawn (distinct per example); len(keys): those actually sent
    shared: int = 0  # served as follower or from the cache
    keys: dict[Any, set[Any]] = field(default_factory=dict)  # key -> {(url, header set)}
    seconds: float = 0.0

    def spy(self, real: Callable[..., Any], identity_of: Callable[[], Any]) -> Callable[..., Any]:
        """Wrap a Group method: record which header set each key was computed for."""

        def record(key: Any) -> None:
            text = repr(key)
            assert SECRET not in text and "Bearer" not in text, text
            self.keys.setdefault(key, set()).add(identity_of())

        if asyncio.iscoroutinefunction(real):

            async def spy_async(key: Any, *args: Any, **kwargs: Any) -> Any:
                record(key)
                return await real(key, *args, **kwargs)

            return spy_async

        def spy_sync(timeout: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
            record(key)
            return real(timeout, key, *args, **kwargs)

        return spy_sync

    def check_keys(self) -> None:
        # Equal keys only for equal header sets: nothing else may ever share a response.
        for key, identities in self.keys.items():
            assert len(identities) == 1, (key, identities)
        # And the converse: the same header set (names in any case) makes one key.
        by_identity: dict[Any, set[Any]] = {}
        for key, identities in self.keys.items():
            (identity,) = identities
            by_identity.setdefault(identity, set()).add(key)
        assert all(len(keys) == 1 for keys in by_identity.values())


TALLIES: dict[str, Tally] = {}
_paths = itertools.count()
# The header set a request is keyed for, read by the key spy: set by each caller's own task
# (or thread) before it sends, so it is that caller's value wherever the adapter runs.
_identity: contextvars.ContextVar[Any] = contextvars.ContextVar("identity")


def current_identity() -> Any:
    return _identity.get()


def check(sent: Headers, own: Any, echoed: list[list[str]]) -> None:
    """The echo is the header set this caller's client sent, which holds all of ``sent``."""
    mine = canonical(own)
    assert canonical(echoed) == mine, "a caller got a response made for another header set"
    assert set(canonical(sent)) <= set(mine)  # the client library sent what we asked for


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    for name, t in TALLIES.items():
        print(
            f"\ncredential fuzz {name}: {t.requests} requests, {t.header_sets} header sets "
            f"drawn, {len(t.keys)} sent (one key each), {t.shared} shared "
            f"({t.shared / max(t.requests, 1):.0%}), {t.seconds:.1f} s"
        )


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="singleflight")
    yield caplog
    records = [r for r in caplog.get_records("call") if r.name.startswith("singleflight")]
    assert records  # the adapters did log: one record per request at least
    for record in records:
        text = record.getMessage() + repr(record.args)
        assert SECRET not in text and "Bearer" not in text, text


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the async adapters ---------------------------------------------------------------------------


class AsyncAdapter:
    """httpx.AsyncClient or aiohttp.ClientSession with the adapter, on the loop thread."""

    def __init__(self, name: str, echo: EchoUpstream) -> None:
        self.name = name
        self.echo = echo
        self.tally = TALLIES.setdefault(name, Tally())
        options = {"ttl": 60.0, "ignore_headers": IGNORE.names}
        if name == "httpx":
            self.transport = AsyncSingleflightTransport(**options)
            group = self.transport.group
        else:
            self.mw = SingleflightMiddleware(**options)
            group = self.mw.group
        group.do_with_role = self.tally.spy(group.do_with_role, current_identity)  # type: ignore[method-assign]

    async def open(self) -> None:
        if self.name == "httpx":
            self.client = httpx.AsyncClient(transport=self.transport, timeout=10)
        else:
            self.session = aiohttp.ClientSession(middlewares=(self.mw,))

    async def close(self) -> None:
        if self.name == "httpx":
            await self.client.aclose()
        else:
            await self.session.close()

    async def one(self, url: str, sent: Headers) -> str:
        _identity.set(identity_of(url, sent))  # this task's own: the key spy reads it
        if self.name == "httpx":
            r = await self.client.get(url, headers=sent)
            own = r.request.headers.raw
            role, body = r.extensions["singleflight"], r.json()
        else:
            async with self.session.get(url, headers=sent) as resp:
                body = json.loads(await resp.read())
                role = served(resp)
                own = list(resp.request_info.headers.items())
        check(sent, own, body["headers"])
        return str(role)

    def as_sent(self, identity: Headers, seed: int) -> Headers:
        return as_sent(identity, seed, one_case_per_name=self.name == "aiohttp")

    async def burst(self, identities: list[Headers], callers: list[tuple[int, int]]) -> None:
        url = f"{self.echo.url}/who/{next(_paths)}"
        for _wave in range(2):  # the second wave meets the cache
            roles = await asyncio.wait_for(
                asyncio.gather(
                    *[self.one(url, self.as_sent(identities[i], s)) for i, s in callers]
                ),
                20,
            )
            self.tally.requests += len(roles)
            self.tally.shared += sum(r in ("follower", "cache") for r in roles)
        self.tally.header_sets += len({canonical(i) for i in identities})


@pytest.mark.parametrize("name", ["httpx", "aiohttp"])
def test_async_adapters_never_cross_credentials(name, echo, loop_thread, debug_logs):
    adapter = AsyncAdapter(name, echo)
    loop_thread.run(adapter.open())
    started = time.monotonic()

    @FUZZ
    @given(bursts(max_callers=40))
    def run(burst: tuple[list[Headers], list[tuple[int, int]]]) -> None:
        loop_thread.run(adapter.burst(*burst))

    try:
        run()
    finally:
        loop_thread.run(adapter.close())
    adapter.tally.seconds += time.monotonic() - started
    adapter.tally.check_keys()
    assert adapter.tally.shared >= adapter.tally.requests // 4  # the fuzz did share a lot


# -- the sync transport, from threads ----------------------------------------------------------


def test_sync_transport_never_crosses_credentials(echo, debug_logs):
    tally = TALLIES.setdefault("httpx-sync", Tally())
    transport = SingleflightTransport(ttl=60.0, ignore_headers=IGNORE.names)
    group = transport.group
    group.do_sync_bounded = tally.spy(group.do_sync_bounded, current_identity)  # type: ignore[method-assign]
    client = httpx.Client(transport=transport, timeout=10)
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fuzz-caller")
    started = time.monotonic()

    def one(url: str, sent: Headers) -> str:
        _identity.set(identity_of(url, sent))
        r = client.get(url, headers=sent)
        check(sent, r.request.headers.raw, r.json()["headers"])
        return str(r.extensions["singleflight"])

    @settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 3, 5))
    @given(bursts(max_callers=16))
    def run(burst: tuple[list[Headers], list[tuple[int, int]]]) -> None:
        identities, callers = burst
        url = f"{echo.url}/who/{next(_paths)}"
        for _wave in range(2):
            futures = [pool.submit(one, url, as_sent(identities[i], s)) for i, s in callers]
            roles = [f.result(timeout=20) for f in futures]
            tally.requests += len(roles)
            tally.shared += sum(r in ("follower", "cache") for r in roles)
        tally.header_sets += len({canonical(i) for i in identities})

    try:
        run()
    finally:
        pool.shutdown(wait=True)
        client.close()
    tally.seconds += time.monotonic() - started
    tally.check_keys()
    assert tally.shared >= tally.requests // 4


# -- found by the fuzz's near-misses: URL userinfo next to a header name ---------------------------


def test_userinfo_and_header_names_never_run_together_in_a_key():
    # "a" + "-y:1" and "" + "a-y:1" once hashed the same bytes: a URL's userinfo was fed to the
    # digest right before the first header line, with nothing in between.
    from singleflight._http import request_key

    assert request_key("GET", "http://a@h/", [("-y", "1")]) != request_key(
        "GET", "http://h/", [("a-y", "1")]
    )
    assert request_key("GET", "http://a:b@h/", []) != request_key("GET", "http://h/", [("a:b", "")])
    # Still equal for equal requests; and a URL without userinfo keys as before.
    assert request_key("GET", "http://a@h/", [("x", "1")]) == request_key(
        "GET", "http://a@H:80/", [("X", "1")]
    )


async def test_userinfo_next_to_a_header_name_does_not_share(echo):
    # End to end through httpx: "-y: 1" with user "a" vs "a-y: 1" with the same Authorization.
    transport = AsyncSingleflightTransport()
    auth = "Basic YTo="  # what httpx sends for user "a" with no password
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        one = client.get(echo.url.replace("http://", "http://a@") + "/ui", headers={"-y": "1"})
        two = client.get(echo.url + "/ui", headers={"a-y": "1", "Authorization": auth})
        r1, r2 = await asyncio.wait_for(asyncio.gather(one, two), 10)
    for r in (r1, r2):
        check([], r.request.headers.raw, r.json()["headers"])
    assert transport.stats.leaders == 2


# -- who sends: TLS identities, verification modes, proxies, SNI (httpx) --------------------------
#
# Every caller picks a sender (an inner transport: client certificate alice / bob / none; verify
# against the server's CA, against another CA, or not at all; direct, through one of two CONNECT
# proxies, or from another local address) and an SNI name. All senders of an example share one
# http_group(ttl=60). The HTTPS echo reports the client certificate, SNI and source address it
# saw: each caller must see exactly its own, or fail exactly as plain httpx fails (a bad CA, a
# name its checks refuse), never be answered by another sender's flight or cache entry.

SENDERS: list[tuple[str | None, str, str | None]] = [  # (client cert, verify, route)
    (None, "ca", None),
    ("alice", "ca", None),
    ("bob", "ca", None),
    (None, "off", None),
    ("alice", "off", None),
    (None, "other-ca", None),
    (None, "ca", "p1"),
    ("alice", "ca", "p2"),
    (None, "off", "p1"),
    ("bob", "ca", "127.0.0.4"),
]
SOURCES = {None: "127.0.0.1", "p1": "127.0.0.2", "p2": "127.0.0.3", "127.0.0.4": "127.0.0.4"}


@st.composite
def sender_bursts(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, str | None]]]:
    """Senders (indexes into SENDERS; a config may repeat: another object, another sender),
    and the callers: (sender slot, SNI name or None) each."""
    senders = draw(st.lists(st.integers(0, len(SENDERS) - 1), min_size=2, max_size=4))
    callers = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(senders) - 1), st.sampled_from([None, None, "other.test"])
            ),
            min_size=2,
            max_size=16,
        )
    )
    return senders, callers


def test_httpx_tls_identities_and_proxies_never_cross(loop_thread):
    from singleflight.httpx import http_group

    from .http.tls_upstream import client_context, tls_world

    tally = TALLIES.setdefault("httpx-tls", Tally())
    started = time.monotonic()
    serial: dict[int, int] = {}  # id(client) -> a number never reused (ids are, once closed)

    async def one(client: httpx.AsyncClient, url: str, sender: int, sni: str | None) -> str:
        cert, verify, route = SENDERS[sender]
        _identity.set((serial[id(client)], sni))  # a sender never met before: its own number
        extensions = {} if sni is None else {"sni_hostname": sni}
        sent_sni = None if route in ("p1", "p2") else sni  # httpcore's tunnels ignore it
        refused = verify == "other-ca" or (verify == "ca" and sent_sni is not None)
        try:
            r = await client.get(url, extensions=extensions)
        except httpx.ConnectError:
            assert refused, (SENDERS[sender], sni)  # failed as plain httpx fails, no sooner
            return "refused"
        assert not refused, (SENDERS[sender], sni, r.json())  # answered past its own checks
        seen = r.json()
        assert (seen["cert"], seen["peer"], seen["sni"]) == (cert, SOURCES[route], sent_sni)
        return str(r.extensions["singleflight"])

    async def burst(server: Any, proxies: Any, senders: list[int], callers: Any) -> None:
        group = http_group(ttl=60)
        group.do_with_role = tally.spy(group.do_with_role, current_identity)  # type: ignore[method-assign]
        clients = []
        for index in senders:
            cert, verify, route = SENDERS[index]
            options: dict[str, Any] = {
                "verify": client_context(cert, verify),
                # A new connection per request: TLS checks run on every request, as a lone
                # caller's would (httpcore reuses a checked connection by origin only).
                "limits": httpx.Limits(max_keepalive_connections=0),
            }
            if route in proxies:
                options["proxy"] = proxies[route].url
            elif route is not None:
                options["local_address"] = route
            inner = httpx.AsyncHTTPTransport(**options)
            wrapped = AsyncSingleflightTransport(inner, group=group)
            clients.append(httpx.AsyncClient(transport=wrapped, timeout=10))
            serial[id(clients[-1])] = next(_paths)
        url = f"{server.url}/tls/{next(_paths)}?delay=1"
        try:
            for _wave in range(2):
                roles = await asyncio.wait_for(
                    asyncio.gather(*[one(clients[s], url, senders[s], sni) for s, sni in callers]),
                    20,
                )
                tally.requests += len(roles)
                tally.shared += sum(r in ("follower", "cache") for r in roles)
        finally:
            for c in clients:
                await c.aclose()
        tally.header_sets += len({(s, sni) for s, sni in callers})
        assert group.in_flight == 0

    with tls_world() as (server, proxies):

        @settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 3, 5))
        @given(sender_bursts())
        def run(drawn: tuple[list[int], list[tuple[int, str | None]]]) -> None:
            loop_thread.run(burst(server, proxies, *drawn))

        run()
    tally.seconds += time.monotonic() - started
    tally.check_keys()
    assert tally.shared >= tally.requests // 5  # same sender, same SNI: they did share
