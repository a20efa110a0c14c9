"""singleflight next to the rest of the httpx ecosystem (docs/composability.md).

- hishel's cache transport, stacked in both orders, against a real loopback upstream: how many
  upstream requests, cache lookups and cache writes a burst of identical GETs costs.
- httpx ``mounts=`` and proxies: a transport given as ``transport=`` is bypassed for mounted or
  proxied URLs; wrapping each mount (one shared group) and the proxy transport coalesces. The
  proxy is a tiny loopback HTTP forward proxy that counts what it forwards.
- respx and pytest-httpx, as users mock httpx in their own tests.

Every wait is bounded; bursts are held open by a gate or an event, never by a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from aiohttp import web

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport
from singleflight.testing import LoopbackUpstream

hishel = pytest.importorskip("hishel")
hishel_httpx = pytest.importorskip("hishel.httpx")
respx = pytest.importorskip("respx")

N = 20  # callers per burst
TIMEOUT = 10.0  # upper bound for any single wait; nothing comes close


# -- helpers ---------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll cheap in-process state until ``predicate()``; fail after ``timeout`` s."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.001)


async def burst(
    client: httpx.AsyncClient,
    url: str,
    *,
    joined: Callable[[], bool],
    release: Callable[[], None],
    n: int = N,
) -> list[httpx.Response]:
    """Start ``n`` identical GETs, wait until ``joined()`` says all are held, ``release()``."""
    with anyio.fail_after(TIMEOUT):
        tasks = [asyncio.ensure_future(client.get(url)) for _ in range(n)]
        try:
            await wait_until(joined)
            release()
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


def roles(responses: list[httpx.Response]) -> Counter[str | None]:
    return Counter(r.extensions.get("singleflight") for r in responses)


@pytest.fixture
def upstream() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream() as server:
        yield server


class InLoopServer:
    """An aiohttp low-level server on 127.0.0.1 in the test's own event loop."""

    url = ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        self._runner = web.ServerRunner(web.Server(self.handle), handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class ForwardProxy(InLoopServer):
    """A minimal HTTP forward proxy (absolute-form targets) that records what it forwards."""

    def __init__(self) -> None:
        self.forwarded: list[str] = []

    async def __aenter__(self) -> ForwardProxy:
        # Pass bodies through untouched: the client decodes its own Content-Encoding.
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return await super().__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self._session.close()

    def count(self, path: str) -> int:
        return sum(1 for url in self.forwarded if httpx.URL(url).path == path)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.forwarded.append(str(request.url))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(request.method, request.url, headers=headers) as up:
            body = await up.read()
            out = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP]
            response = web.Response(status=up.status, body=body)
            for name, value in out:
                response.headers.add(name, value)
            return response


class ETagServer(InLoopServer):
    """Serves one JSON document with an ETag, stale at once; answers If-None-Match with 304."""

    def __init__(self) -> None:
        self.full = 0
        self.conditional = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = {"ETag": '"v1"', "Cache-Control": "max-age=0"}
        if request.headers.get("If-None-Match") == '"v1"':
            self.conditional += 1
            await self.gate.wait()
            return web.Response(status=304, headers=headers)
        self.full += 1
        await self.gate.wait()
        return web.json_response({"version": 1}, headers=headers)


# -- hishel ----------------------------------------------------------------------------------


class CountingStorage(hishel.AsyncSqliteStorage):  # type: ignore[misc]
    """hishel's SQLite storage, counting lookups and writes; lookups can be held open."""

    def __init__(self, path: Path) -> None:
        super().__init__(database_path=path)
        self.path = path
        self.lookups = 0
        self.creates = 0
        self.header_updates = 0
        self.hold: asyncio.Event | None = None

    async def get_entries(self, key: str) -> Any:
        self.lookups += 1
        if self.hold is not None:
            await self.hold.wait()
        return await super().get_entries(key)

    async def create_entry(self, *args: Any, **kwargs: Any) -> Any:
        self.creates += 1
        return await super().create_entry(*args, **kwargs)

    async def update_headers(self, *args: Any, **kwargs: Any) -> None:
        self.header_updates += 1
        await super().update_headers(*args, **kwargs)

    def rows(self) -> int:
        """Complete entries in the database file (read with a separate connection)."""
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            row = db.execute("SELECT COUNT(*) FROM entries WHERE chunk_count IS NOT NULL")
            return int(row.fetchone()[0])


@pytest.fixture
def storage(tmp_path: Path) -> CountingStorage:
    return CountingStorage(tmp_path / "hishel.db")


def stack(
    order: str, storage: CountingStorage, rfc: bool = False
) -> tuple[httpx.AsyncBaseTransport, AsyncSingleflightTransport]:
    """The transport to give the client, and the singleflight layer inside it."""
    if order == "singleflight-outside":
        cache = hishel_httpx.AsyncCacheTransport(httpx.AsyncHTTPTransport(), storage, rfc)
        sf = AsyncSingleflightTransport(cache)
        return sf, sf
    sf = AsyncSingleflightTransport(httpx.AsyncHTTPTransport())
    return hishel_httpx.AsyncCacheTransport(sf, storage, rfc), sf


ORDERS = ["singleflight-outside", "hishel-outside"]


async def test_hishel_cold_burst_singleflight_outside_is_one_miss(upstream, storage):
    transport, sf = stack("singleflight-outside", storage)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        responses = await burst(
            client,
            "/item?gate=g",
            joined=lambda: sf.stats.calls == N,
            release=lambda: upstream.open_gate("g"),
        )
        assert {r.json()["hit"] for r in responses} == {1}
        assert upstream.hits("/item") == 1
        assert (storage.lookups, storage.creates) == (1, 1)  # one miss, one write
        assert roles(responses) == {"leader": 1, "follower": N - 1}
    assert storage.rows() == 1


async def test_hishel_cold_burst_hishel_outside_is_n_misses(upstream, storage):
    transport, sf = stack("hishel-outside", storage)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        responses = await burst(
            client,
            "/item?gate=g",
            joined=lambda: sf.stats.calls == N,  # every cache miss reached singleflight
            release=lambda: upstream.open_gate("g"),
        )
        assert {r.json()["hit"] for r in responses} == {1}
        # The network call is still coalesced below the cache, but every caller missed,
        # and every caller wrote its own copy of the same response.
        assert upstream.hits("/item") == 1
        assert (storage.lookups, storage.creates) == (N, N)
        assert {r.extensions["caching"]["stored"] for r in responses} == {True}
    assert storage.rows() == N


@pytest.mark.parametrize("order", ORDERS)
async def test_hishel_warm_burst_is_served_from_cache(order, upstream, storage):
    transport, sf = stack(order, storage)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        await burst(
            client,
            "/item?gate=g",
            joined=lambda: sf.stats.calls == N,
            release=lambda: upstream.open_gate("g"),
        )
        lookups = storage.lookups
        storage.hold = asyncio.Event()
        # Hold every lookup until the whole burst arrived, then compare how many were made.
        expected_lookups = 1 if order == "singleflight-outside" else N
        warm = await burst(
            client,
            "/item?gate=g",
            joined=lambda: (
                storage.lookups - lookups == expected_lookups
                and (order == "hishel-outside" or sf.stats.calls == 2 * N)
            ),
            release=storage.hold.set,
        )
    assert upstream.hits("/item") == 1  # no second upstream request
    assert {r.json()["hit"] for r in warm} == {1}
    assert storage.lookups - lookups == expected_lookups
    if order == "singleflight-outside":
        # One cache read for the burst, shared; hishel's status comes through to every caller
        # (a wrapped transport's extensions are kept: issue 12 item 2).
        assert roles(warm) == {"leader": 1, "follower": N - 1}
        assert {r.extensions["caching"]["from_cache"] for r in warm} == {True}
        assert storage.rows() == 1
    else:
        # Hits never reach singleflight; each one read the cache (and it holds N copies).
        assert roles(warm) == {None: N}
        assert {r.extensions["caching"]["from_cache"] for r in warm} == {True}
        assert storage.rows() == N


@pytest.mark.parametrize("order", ORDERS)
async def test_hishel_rfc_no_store_each_burst_is_one_upstream_request(order, upstream, storage):
    transport, sf = stack(order, storage, rfc=True)
    url = "/private?cache_control=no-store&gate={}"
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        for i in (1, 2):
            responses = await burst(
                client,
                url.format(f"g{i}"),
                joined=lambda i=i: sf.stats.calls == i * N,
                release=lambda i=i: upstream.open_gate(f"g{i}"),
            )
            # Never stored, so the second burst goes upstream again: once, coalesced.
            assert upstream.hits("/private") == i
            assert {r.json()["hit"] for r in responses} == {i}
    assert storage.creates == 0
    assert storage.lookups == (2 if order == "singleflight-outside" else 2 * N)


async def test_hishel_default_mode_stores_no_store_responses(upstream, storage):
    # hishel's default (rfc=False) caches every successful GET and ignores Cache-Control:
    # that is hishel's contract, not singleflight's. Use rfc=True to honour no-store.
    transport, sf = stack("singleflight-outside", storage, rfc=False)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        url = "/private?cache_control=no-store&gate=g"
        await burst(
            client, url, joined=lambda: sf.stats.calls == N, release=lambda: upstream.open_gate("g")
        )
        again = await client.get(url)
    assert upstream.hits("/private") == 1
    assert again.json()["hit"] == 1


@pytest.mark.parametrize(("rfc", "bob_sees"), [(False, "alice"), (True, "bob")])
async def test_hishel_decides_who_shares_a_stored_response(rfc, bob_sees, upstream, storage):
    # Singleflight keys on credentials, so alice and bob never share a flight. What the cache
    # stored is another matter: hishel's default key is method + URL, so it hands alice's
    # stored response to bob; its RFC mode (a shared cache) stores neither.
    transport, _ = stack("singleflight-outside", storage, rfc=rfc)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        url = "/me?cache_control=max-age=60"
        alice = await client.get(url, headers={"Authorization": "alice"})
        bob = await client.get(url, headers={"Authorization": "bob"})
    assert alice.json()["who"]["authorization"] == "alice"
    assert bob.json()["who"]["authorization"] == bob_sees


@pytest.mark.parametrize("order", ORDERS)
async def test_hishel_rfc_revalidation_burst_is_one_conditional_request(order, storage):
    async with ETagServer() as server:
        transport, sf = stack(order, storage, rfc=True)
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
            first = await client.get("/doc")  # stored, stale at once (max-age=0, ETag)
            assert first.json() == {"version": 1}
            server.gate.clear()
            calls = sf.stats.calls
            responses = await burst(
                client, "/doc", joined=lambda: sf.stats.calls - calls == N, release=server.gate.set
            )
    assert {r.status_code for r in responses} == {200}
    assert all(r.json() == {"version": 1} for r in responses)
    assert (server.full, server.conditional) == (1, 1)
    # The 304 refreshed the stored headers once per revalidation hishel made.
    per_burst = 1 if order == "singleflight-outside" else N
    assert storage.header_updates == per_burst
    assert storage.lookups == 1 + per_burst
    assert storage.rows() == 1


def test_hishel_sync_singleflight_outside(upstream, tmp_path):
    storage = hishel.SqliteStorage(database_path=tmp_path / "sync.db")
    sf = SingleflightTransport(hishel_httpx.CacheTransport(httpx.HTTPTransport(), storage))
    with httpx.Client(transport=sf, base_url=upstream.url) as client, ThreadPoolExecutor(N) as ex:
        futures = [ex.submit(client.get, "/sync?gate=g") for _ in range(N)]
        wait_until_sync(lambda: sf.stats.calls == N)
        upstream.open_gate("g")
        cold = [f.result(timeout=TIMEOUT) for f in futures]
        warm = [f.result(timeout=TIMEOUT) for f in [ex.submit(client.get, "/sync?gate=g")]]
    assert upstream.hits("/sync") == 1
    assert {r.json()["hit"] for r in cold + warm} == {1}


# -- mounts and proxies ----------------------------------------------------------------------


async def test_mount_bypasses_the_client_transport(upstream):
    sf = AsyncSingleflightTransport()
    mounts = {upstream.url: httpx.AsyncHTTPTransport()}
    async with httpx.AsyncClient(transport=sf, mounts=mounts) as client:
        responses = await burst(
            client,
            upstream.url + "/m?gate=g",
            joined=lambda: upstream.hits("/m") == N,  # every caller went upstream
            release=lambda: upstream.open_gate("g"),
        )
    assert len(responses) == N
    assert sf.stats.calls == 0
    assert roles(responses) == {None: N}


async def test_wrapped_mounts_share_one_group():
    with LoopbackUpstream() as one, LoopbackUpstream() as two:
        shared = AsyncSingleflightTransport()

        def wrapped() -> AsyncSingleflightTransport:
            return AsyncSingleflightTransport(group=shared.group)  # default sender: shares

        first = httpx.AsyncClient(transport=shared, mounts={two.url: wrapped()})
        second = httpx.AsyncClient(mounts={one.url: wrapped(), two.url: wrapped()})
        async with first, second:
            clients = [first, second] * (N // 2)
            with anyio.fail_after(TIMEOUT):
                tasks = [
                    asyncio.ensure_future(c.get(up.url + "/x?gate=g"))
                    for up in (one, two)
                    for c in clients
                ]
                # Each URL is sent through a different transport by each client, yet both
                # belong to one group: two flights in all, one per upstream.
                await wait_until(lambda: shared.stats.calls == 2 * N)
                one.open_gate("g")
                two.open_gate("g")
                responses = await asyncio.gather(*tasks)
        assert (one.hits("/x"), two.hits("/x")) == (1, 1)
        assert roles(responses) == {"leader": 2, "follower": 2 * N - 2}


async def test_proxy_argument_bypasses_the_client_transport(upstream):
    async with ForwardProxy() as proxy:
        sf = AsyncSingleflightTransport()
        async with httpx.AsyncClient(transport=sf, proxy=proxy.url) as client:
            responses = await burst(
                client,
                upstream.url + "/p?gate=g",
                joined=lambda: upstream.hits("/p") == N,
                release=lambda: upstream.open_gate("g"),
            )
        assert proxy.count("/p") == N  # the proxy transport sent them all
        assert sf.stats.calls == 0
        assert roles(responses) == {None: N}


async def test_wrapped_proxy_transport_sends_one_request_through_the_proxy(upstream):
    async with ForwardProxy() as proxy:
        sf = AsyncSingleflightTransport(httpx.AsyncHTTPTransport(proxy=proxy.url))
        async with httpx.AsyncClient(transport=sf) as client:
            responses = await burst(
                client,
                upstream.url + "/p?gate=g&encoding=gzip",
                joined=lambda: sf.stats.calls == N,
                release=lambda: upstream.open_gate("g"),
            )
        assert proxy.count("/p") == 1
        assert upstream.hits("/p") == 1
        assert {r.json()["path"] for r in responses} == {"/p"}  # gzip decoded per caller
        assert {r.headers["content-encoding"] for r in responses} == {"gzip"}
        assert roles(responses) == {"leader": 1, "follower": N - 1}


async def test_wrapped_proxy_mount_coalesces(upstream):
    # Proxy only some URLs: mount a wrapped proxy transport for them.
    async with ForwardProxy() as proxy:
        shared = AsyncSingleflightTransport()
        via_proxy = AsyncSingleflightTransport(
            httpx.AsyncHTTPTransport(proxy=proxy.url), group=shared.group
        )
        async with httpx.AsyncClient(transport=shared, mounts={upstream.url: via_proxy}) as c:
            await burst(
                c,
                upstream.url + "/p?gate=g",
                joined=lambda: shared.stats.calls == N,
                release=lambda: upstream.open_gate("g"),
            )
        assert (proxy.count("/p"), upstream.hits("/p")) == (1, 1)


async def test_env_proxy_is_ignored_once_a_transport_is_given(upstream, monkeypatch):
    async with ForwardProxy() as proxy:
        for name in ("ALL_PROXY", "HTTPS_PROXY", "NO_PROXY", "REQUEST_METHOD"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with httpx.AsyncClient() as plain:  # httpx honours the variable...
            await plain.get(upstream.url + "/env")
        assert proxy.count("/env") == 1
        async with httpx.AsyncClient(transport=AsyncSingleflightTransport()) as wrapped:
            await wrapped.get(upstream.url + "/env")  # ...but not with transport=
        assert proxy.count("/env") == 1
        assert upstream.hits("/env") == 2


# -- respx -----------------------------------------------------------------------------------

URL = "https://api.example/items"


def held_side_effect() -> tuple[asyncio.Event, list[httpx.Request], Callable[..., Any]]:
    release = asyncio.Event()
    seen: list[httpx.Request] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await release.wait()
        return httpx.Response(200, json={"items": [1, 2]})

    return release, seen, respond


async def test_respx_default_httpcore_mocker_coalesces(respx_mock):
    # respx's default mocker patches httpcore, below the inner AsyncHTTPTransport: the
    # singleflight transport runs for real and the route is called once for the burst.
    release, _, respond = held_side_effect()
    route = respx_mock.get(URL).mock(side_effect=respond)
    sf = AsyncSingleflightTransport()
    async with httpx.AsyncClient(transport=sf) as client:
        responses = await burst(
            client, URL, joined=lambda: sf.stats.calls == N, release=release.set
        )
    assert route.call_count == 1
    assert {r.json()["items"][1] for r in responses} == {2}
    assert roles(responses) == {"leader": 1, "follower": N - 1}


async def test_respx_httpx_mocker_bypasses_the_wrapper():
    # using="httpx" patches AsyncClient._transport_for_url and answers matched routes with its
    # own MockTransport, in front of the client's transport: singleflight never sees them.
    release, seen, respond = held_side_effect()
    sf = AsyncSingleflightTransport()
    with respx.mock(using="httpx") as router:
        route = router.get(URL).mock(side_effect=respond)
        async with httpx.AsyncClient(transport=sf) as client:
            responses = await burst(client, URL, joined=lambda: len(seen) == N, release=release.set)
    assert route.call_count == N
    assert sf.stats.calls == 0
    assert roles(responses) == {None: N}


async def test_respx_router_as_the_inner_transport():
    # No patching at all: a respx Router behind httpx.MockTransport, wrapped.
    release, _, respond = held_side_effect()
    router = respx.Router(assert_all_called=True)
    route = router.get(URL).mock(side_effect=respond)
    sf = AsyncSingleflightTransport(httpx.MockTransport(router.async_handler))
    async with httpx.AsyncClient(transport=sf) as client:
        responses = await burst(
            client, URL, joined=lambda: sf.stats.calls == N, release=release.set
        )
    router.assert_all_called()
    assert route.call_count == 1
    assert {r.json()["items"][0] for r in responses} == {1}


def test_respx_sync_threads(respx_mock):
    release = threading.Event()
    entered = threading.Event()

    def respond(request: httpx.Request) -> httpx.Response:
        entered.set()
        assert release.wait(TIMEOUT)
        return httpx.Response(200, text="ok")

    route = respx_mock.get(URL).mock(side_effect=respond)
    sf = SingleflightTransport()
    with httpx.Client(transport=sf) as client, ThreadPoolExecutor(N) as ex:
        futures = [ex.submit(client.get, URL) for _ in range(N)]
        wait_until_sync(lambda: sf.stats.calls == N)
        release.set()
        responses = [f.result(timeout=TIMEOUT) for f in futures]
    assert entered.is_set()
    assert route.call_count == 1
    assert {r.text for r in responses} == {"ok"}


# -- pytest-httpx ----------------------------------------------------------------------------


async def test_pytest_httpx_callback_held_open_one_request(httpx_mock):
    release = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={"items": [1, 2]})

    httpx_mock.add_callback(respond, url=URL)  # single use: a second request would fail
    sf = AsyncSingleflightTransport()
    async with httpx.AsyncClient(transport=sf) as client:
        responses = await burst(
            client, URL, joined=lambda: sf.stats.calls == N, release=release.set
        )
    assert len(httpx_mock.get_requests()) == 1
    assert roles(responses) == {"leader": 1, "follower": N - 1}


def test_pytest_httpx_sync_threads(httpx_mock):
    release = threading.Event()

    def respond(request: httpx.Request) -> httpx.Response:
        assert release.wait(TIMEOUT)
        return httpx.Response(200, text="ok")

    httpx_mock.add_callback(respond, url=URL)
    sf = SingleflightTransport()
    with httpx.Client(transport=sf) as client, ThreadPoolExecutor(N) as ex:
        futures = [ex.submit(client.get, URL) for _ in range(N)]
        wait_until_sync(lambda: sf.stats.calls == N)
        release.set()
        responses = [f.result(timeout=TIMEOUT) for f in futures]
    assert len(httpx_mock.get_requests()) == 1
    assert {r.text for r in responses} == {"ok"}


@pytest.mark.httpx_mock(assert_all_requests_were_expected=False)
async def test_pytest_httpx_unmatched_request_is_retried_by_each_waiter(httpx_mock):
    # pytest-httpx reports an unmatched request as httpx.TimeoutException. Singleflight treats
    # a leader's timeout as its own (the next waiter re-sends), so an unmatched burst shows up
    # once per caller in httpx_mock.get_requests(), and every caller fails.
    sf = AsyncSingleflightTransport()
    async with httpx.AsyncClient(transport=sf) as client:
        with anyio.fail_after(TIMEOUT):
            results = await asyncio.gather(
                *[client.get(URL) for _ in range(5)], return_exceptions=True
            )
    assert all(isinstance(r, httpx.TimeoutException) for r in results)
    assert len(httpx_mock.get_requests()) == 5
