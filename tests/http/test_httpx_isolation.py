"""Who sends a request is part of it: transports with different TLS identities, checks or proxies
never share a flight or a cache entry; a 1xx is never shared; a closed client fails only itself.

Against real loopback servers: an HTTPS echo (trustme CA) that reports the client certificate,
the SNI name and the source address it saw, and CONNECT proxies that dial out from their own
loopback addresses (tls_upstream.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_helpers import bounded, wait_until, wait_until_sync
from tls_upstream import TLSUpstream, TunnelProxy, client_context, tls_world

from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport, http_group

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[TLSUpstream, dict[str, TunnelProxy]]]:
    with tls_world() as w:
        yield w


_gates = iter(range(10**6))


def gate() -> str:
    return f"g{next(_gates)}"


def wrap(group: Any = None, **inner: Any) -> AsyncSingleflightTransport:
    t = httpx.AsyncHTTPTransport(**inner)
    if group is None:
        return AsyncSingleflightTransport(t, ttl=60)
    return AsyncSingleflightTransport(t, group=group)


async def overlap(
    server: TLSUpstream,
    lead: tuple[httpx.AsyncClient, dict[str, Any]],
    other: tuple[httpx.AsyncClient, dict[str, Any]],
    group: Any,
) -> tuple[Any, Any]:
    """``lead`` goes first and is held upstream; ``other`` asks while it is in flight.

    ``other`` either makes its own request (a second hit), fails on its own, or follows: once
    one of those happened the gate opens. Returns both outcomes (a response or an exception).
    """
    name = gate()
    hits = server.hits
    url = f"{server.url}/same?gate={name}"
    first = asyncio.ensure_future(lead[0].get(url, **lead[1]))
    await wait_until(lambda: server.hits == hits + 1)
    followers = group.stats.followers
    second = asyncio.ensure_future(other[0].get(url, **other[1]))
    await wait_until(
        lambda: server.hits == hits + 2 or second.done() or group.stats.followers > followers
    )
    server.open_gate(name)
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    return a, b


def seen(response: Any) -> dict[str, Any]:
    assert isinstance(response, httpx.Response), response
    return dict(response.json())


async def test_client_certificates_never_share_a_flight_or_the_cache(world):
    server, _ = world
    alice = wrap(verify=client_context("alice"))
    bob = wrap(group=alice.group, verify=client_context("bob"))
    async with (
        bounded(20),
        httpx.AsyncClient(transport=alice) as ca,
        httpx.AsyncClient(transport=bob) as cb,
    ):
        a, b = await overlap(server, (ca, {}), (cb, {}), alice.group)
        assert seen(a)["cert"] == "alice" and seen(b)["cert"] == "bob"
        assert b.extensions["singleflight"] == "leader"
        url = a.request.url
        again_a, again_b = await ca.get(url), await cb.get(url)  # each from its own entry
        assert [r.extensions["singleflight"] for r in (again_a, again_b)] == ["cache", "cache"]
        assert seen(again_a)["cert"] == "alice" and seen(again_b)["cert"] == "bob"
    assert alice.group.in_flight == 0


async def test_a_verifying_caller_never_gets_an_unverified_response(world):
    server, _ = world
    lax = wrap(verify=False)
    strict = wrap(group=lax.group, verify=client_context(verify="other-ca"))
    async with (
        bounded(20),
        httpx.AsyncClient(transport=lax) as cl,
        httpx.AsyncClient(transport=strict) as cs,
    ):
        a, b = await overlap(server, (cl, {}), (cs, {}), lax.group)
        assert seen(a)["cert"] is None
        assert isinstance(b, httpx.ConnectError), b  # as plain httpx: the certificate is bad
        assert (await cl.get(a.request.url)).extensions["singleflight"] == "cache"
        with pytest.raises(httpx.ConnectError):  # never answered from the lax caller's cache
            await cs.get(a.request.url)


async def test_proxies_and_local_addresses_never_share(world):
    server, proxies = world
    direct = wrap(verify=client_context())
    via_p1 = wrap(group=direct.group, verify=client_context(), proxy=proxies["p1"].url)
    via_p2 = wrap(group=direct.group, verify=client_context(), proxy=proxies["p2"].url)
    local = wrap(group=direct.group, verify=client_context(), local_address="127.0.0.4")
    clients = [httpx.AsyncClient(transport=t) for t in (direct, via_p1, via_p2, local)]
    try:
        async with bounded(20):
            for other, peer in zip(
                clients[1:], ("127.0.0.2", "127.0.0.3", "127.0.0.4"), strict=True
            ):
                a, b = await overlap(server, (clients[0], {}), (other, {}), direct.group)
                assert seen(a)["peer"] == "127.0.0.1" and seen(b)["peer"] == peer
                assert seen(await other.get(b.request.url))["peer"] == peer  # its own entry
    finally:
        for c in clients:
            await c.aclose()


async def test_sni_hostname_is_part_of_the_key(world):
    server, _ = world
    lax = wrap(verify=client_context(verify="off", cert="alice"))
    async with bounded(20), httpx.AsyncClient(transport=lax) as c:
        sni = {"extensions": {"sni_hostname": "other.test"}}
        a, b = await overlap(server, (c, {}), (c, sni), lax.group)
        assert seen(a)["sni"] is None and seen(b)["sni"] == "other.test"
    # Checks the name it sends: other.test must fail, as it does in plain httpx on a new
    # connection (no keep-alive: httpcore would reuse the checked one, keyed by origin only).
    strict = wrap(verify=client_context(), limits=httpx.Limits(max_keepalive_connections=0))
    async with bounded(20), httpx.AsyncClient(transport=strict) as c:
        url = f"{server.url}/strict"
        assert (await c.get(url)).status_code == 200
        assert (await c.get(url)).extensions["singleflight"] == "cache"
        with pytest.raises(httpx.ConnectError):
            await c.get(url, extensions={"sni_hostname": "other.test"})


async def test_wrappers_of_one_inner_transport_and_default_transports_share(world, upstream):
    server, _ = world
    inner = httpx.AsyncHTTPTransport(verify=client_context("alice"))
    one = AsyncSingleflightTransport(inner)
    two = AsyncSingleflightTransport(inner, group=one.group)  # the very same sender
    async with (
        bounded(20),
        httpx.AsyncClient(transport=one) as c1,
        httpx.AsyncClient(transport=two) as c2,
    ):
        a, b = await overlap(server, (c1, {}), (c2, {}), one.group)
        assert b.extensions["singleflight"] == "follower" and seen(b)["cert"] == "alice"
    first = AsyncSingleflightTransport()  # default senders: the same identity, even in a
    second = AsyncSingleflightTransport(group=first.group)  # another process (a Redis tier)
    sync = SingleflightTransport(group=first.group)
    assert first._policy.extra == second._policy.extra == sync._policy.extra
    async with (
        bounded(20),
        httpx.AsyncClient(transport=first) as c1,
        httpx.AsyncClient(transport=second) as c2,
    ):
        url = upstream.url + "/dflt?gate=dflt"
        tasks = [asyncio.ensure_future(c.get(url)) for c in (c1, c2)]
        await wait_until(lambda: first.stats.followers == 1)
        upstream.open_gate("dflt")
        await asyncio.gather(*tasks)
    assert upstream.hits("/dflt") == 1


def test_sync_transports_with_different_client_certificates_never_share(world):
    server, _ = world
    alice = SingleflightTransport(httpx.HTTPTransport(verify=client_context("alice")), ttl=60)
    bob = SingleflightTransport(
        httpx.HTTPTransport(verify=client_context("bob")), group=alice.group
    )
    name = gate()
    url = f"{server.url}/sync?gate={name}"
    hits = server.hits
    results: dict[str, Any] = {}
    with (
        httpx.Client(transport=alice, timeout=10) as ca,
        httpx.Client(transport=bob, timeout=10) as cb,
    ):
        ta = threading.Thread(target=lambda: results.setdefault("a", ca.get(url)))
        ta.start()
        wait_until_sync(lambda: server.hits == hits + 1)
        tb = threading.Thread(target=lambda: results.setdefault("b", cb.get(url)))
        tb.start()
        wait_until_sync(lambda: server.hits == hits + 2 or alice.group.stats.followers > 0)
        server.open_gate(name)
        ta.join(10)
        tb.join(10)
        assert seen(results["a"])["cert"] == "alice" and seen(results["b"])["cert"] == "bob"
        assert seen(cb.get(url))["cert"] == "bob"  # from its own cache entry
    assert server.hits == hits + 2


# -- never share a 1xx ------------------------------------------------------------------------


async def test_a_switching_protocols_response_goes_to_its_own_caller_only():
    # httpcore hands out a 101 only with the connection itself (network_stream) and only for a
    # request that asked to upgrade; a wrapped inner transport (a websocket layer) may return one
    # for any request, so the inner here is a transport that does.
    release = asyncio.Event()
    streams: list[object] = []

    async def switch(request: httpx.Request) -> httpx.Response:
        stream = object()
        streams.append(stream)
        await release.wait()
        return httpx.Response(101, headers={"Upgrade": "x"}, extensions={"network_stream": stream})

    t = AsyncSingleflightTransport(httpx.MockTransport(switch), ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t) as c:
        tasks = [asyncio.ensure_future(c.get("http://up.test/ws")) for _ in range(3)]
        await wait_until(lambda: len(streams) == 1 and t.stats.followers == 2)
        release.set()
        responses = await asyncio.gather(*tasks)
    assert len(streams) == 3  # each caller made its own request
    assert sorted(id(r.extensions["network_stream"]) for r in responses) == sorted(
        id(s) for s in streams
    )
    assert [r.extensions["singleflight"] for r in responses] == ["leader"] * 3
    assert t.group.cache is not None and len(t.group.cache) == 0 and t.group.in_flight == 0


# -- a closed client fails only its own caller -------------------------------------------------


async def test_a_closed_clients_leader_hands_the_flight_to_another_clients_follower(upstream):
    a = AsyncSingleflightTransport()
    b = AsyncSingleflightTransport(group=a.group)
    ca, cb = httpx.AsyncClient(transport=a, timeout=10), httpx.AsyncClient(transport=b, timeout=10)
    url = upstream.url + "/closed?gate=closed"
    async with bounded(20):
        lead = asyncio.ensure_future(ca.get(url))
        await upstream.wait_for_hits_async(1, "/closed")
        others = [asyncio.ensure_future(cb.get(url)) for _ in range(2)]
        await wait_until(lambda: a.stats.followers == 2)
        await ca.aclose()  # mid-flight: the leader's connection goes with its client
        with pytest.raises(httpx.ReadError):
            await lead  # the leader gets its own client's error...
        await upstream.wait_for_hits_async(2, "/closed")  # ...and a follower asks afresh
        upstream.open_gate("closed")
        responses = await asyncio.gather(*others)
        await cb.aclose()
    assert [r.status_code for r in responses] == [200, 200]
    assert sorted(r.extensions["singleflight"] for r in responses) == ["follower", "leader"]
    assert upstream.hits("/closed") == 2 and a.stats.reelections == 1 and a.group.in_flight == 0


def test_a_closed_sync_clients_leader_hands_the_flight_to_another_clients_follower(upstream):
    # A sync client's close cannot wake a thread blocked in recv; its next read fails (EBADF),
    # part-way through a body far larger than one read.
    a = SingleflightTransport()
    b = SingleflightTransport(group=a.group)
    ca, cb = httpx.Client(transport=a, timeout=10), httpx.Client(transport=b, timeout=10)
    url = upstream.url + "/sclosed?gate=sclosed&size=4000000"
    results: dict[str, Any] = {}

    def call(name: str, client: httpx.Client) -> None:
        try:
            results[name] = client.get(url)
        except Exception as exc:
            results[name] = exc

    lead = threading.Thread(target=call, args=("lead", ca))
    lead.start()
    upstream.wait_for_hits(1, "/sclosed")
    other = threading.Thread(target=call, args=("other", cb))
    other.start()
    wait_until_sync(lambda: a.stats.followers == 1)
    ca.close()
    upstream.open_gate("sclosed")
    lead.join(10)
    other.join(10)
    cb.close()
    assert isinstance(results["lead"], httpx.ReadError), results
    assert results["other"].status_code == 200 and len(results["other"].content) == 4000000
    assert upstream.hits("/sclosed") == 2 and a.stats.reelections == 1 and a.group.in_flight == 0


# -- a hand-built Group: only through http_group() ---------------------------------------------


async def test_a_group_from_http_group_never_caches_a_5xx_or_no_store(upstream):
    group = http_group(ttl=60)
    t = AsyncSingleflightTransport(group=group)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        for path in ("/hg?status=503", "/hg?cache_control=no-store", "/hg?body=ok"):
            await c.get(path)
            assert (await c.get(path)).extensions["singleflight"] == (
                "cache" if "body" in path else "leader"
            )
    assert upstream.hits("/hg") == 5
