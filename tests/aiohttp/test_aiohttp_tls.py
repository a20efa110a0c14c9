"""Who the server sees and what the caller checks separate callers: TLS, SNI, proxies, connectors.

Real TLS on loopback (a trustme CA, a server asking for client certificates and echoing the one
it got). A caller never receives a response fetched under another identity or weaker checks, in
flight or from the cache.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from _aiohttp_servers import WebUpstream, serve
from _aiohttp_support import bounded, joined, wait_until
from _aiohttp_tls import make_pki

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki():
    return make_pki()


async def _held(up: WebUpstream, session, url: str, **kw):
    """Start a GET that the server holds at gate "g"; return its task once it arrived."""
    task = asyncio.create_task(session.get(url + "?gate=g", **kw))
    await bounded(up.arrival("g").wait())
    return task


async def test_verifying_caller_never_gets_the_response_of_an_insecure_request(pki):
    up = WebUpstream()
    mw = SingleflightMiddleware()
    async with serve(up.app, pki.server) as base, aiohttp.ClientSession(middlewares=(mw,)) as s:
        insecure = await _held(up, s, base + "/x", ssl=False)
        # The default checks: the test CA is not trusted, so plain aiohttp refuses the server.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await bounded(s.get(base + "/x?gate=g"))
        up.gate("g").set()
        async with await bounded(insecure) as r:
            assert r.status == 200 and served(r) == "leader"
    assert up.hits["/x"] == 1 and mw.stats.followers == 0


async def test_a_pinned_fingerprint_is_not_reused_by_a_verifying_caller(pki):
    up = WebUpstream()
    mw = SingleflightMiddleware()
    pin = aiohttp.Fingerprint(pki.pin)
    async with serve(up.app, pki.server) as base, aiohttp.ClientSession(middlewares=(mw,)) as s:
        pinned = await _held(up, s, base + "/x", ssl=pin)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await bounded(s.get(base + "/x?gate=g"))
        same_pin = asyncio.create_task(s.get(base + "/x?gate=g", ssl=aiohttp.Fingerprint(pki.pin)))
        await joined(mw, 1)  # an equal pin is the same demand: it follows
        up.gate("g").set()
        a, b = await bounded(asyncio.gather(pinned, same_pin))
        assert (served(a), served(b)) == ("leader", "follower")
    assert up.hits["/x"] == 1


async def test_client_certificates_separate_callers_of_one_session(pki):
    up = WebUpstream()
    mw = SingleflightMiddleware()
    alice, bob = pki.client("alice"), pki.client("bob")
    async with serve(up.app, pki.server) as base, aiohttp.ClientSession(middlewares=(mw,)) as s:
        tasks = [asyncio.create_task(s.get(base + "/me?gate=g", ssl=alice))]
        await bounded(up.arrival("g").wait())
        tasks.append(asyncio.create_task(s.get(base + "/me?gate=g", ssl=bob)))
        tasks.append(asyncio.create_task(s.get(base + "/me?gate=g", ssl=alice)))
        await wait_until(lambda: up.hits["/me"] == 2, "bob's own request")
        await joined(mw, 1)  # alice's second request follows alice's first
        up.gate("g").set()
        a1, b, a2 = await bounded(asyncio.gather(*tasks))
        assert [(await r.json())["client_cert"] for r in (a1, b, a2)] == ["alice", "bob", "alice"]
        assert [served(r) for r in (a1, b, a2)] == ["leader", "leader", "follower"]


async def test_one_middleware_in_two_sessions_with_different_client_certificates(pki):
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    async with (
        serve(up.app, pki.server) as base,
        aiohttp.ClientSession(
            middlewares=(mw,), connector=aiohttp.TCPConnector(ssl=pki.client("alice"))
        ) as sa,
        aiohttp.ClientSession(
            middlewares=(mw,), connector=aiohttp.TCPConnector(ssl=pki.client("bob"))
        ) as sb,
    ):
        held = await _held(up, sa, base + "/me")
        other = asyncio.create_task(sb.get(base + "/me?gate=g"))
        await wait_until(lambda: up.hits["/me"] == 2, "bob's own request")
        up.gate("g").set()
        ra, rb = await bounded(asyncio.gather(held, other))
        assert (await ra.json())["client_cert"] == "alice"
        assert (await rb.json())["client_cert"] == "bob"
        # ... and the cache keeps them apart too.
        async with sb.get(base + "/me?gate=g") as again:
            assert served(again) == "cache" and (await again.json())["client_cert"] == "bob"


async def test_two_sessions_with_default_connectors_still_share(make_session):
    up = WebUpstream()
    mw = SingleflightMiddleware()
    async with serve(up.app) as base:
        sa, sb = make_session(mw), make_session(mw)
        held = await _held(up, sa, base + "/x")
        other = asyncio.create_task(sb.get(base + "/x?gate=g"))
        await joined(mw, 1)
        up.gate("g").set()
        ra, rb = await bounded(asyncio.gather(held, other))
        assert (served(ra), served(rb)) == ("leader", "follower")
    assert up.hits["/x"] == 1


async def test_server_hostname_override_not_reused(pki):
    """With ttl: a request whose hostname check must fail is never answered from the cache."""
    up = WebUpstream()
    mw = SingleflightMiddleware(ttl=60)
    ctx = pki.client()
    # force_close: aiohttp < 3.14 would send the last request on the first one's pooled
    # connection (its pool key lacks server_hostname), skipping the check, plain or not.
    conn = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        serve(up.app, pki.server) as base,
        aiohttp.ClientSession(middlewares=(mw,), connector=conn) as s,
    ):
        async with s.get(base + "/x", server_hostname="localhost") as r:
            assert r.status == 200
        async with s.get(base + "/x", server_hostname="localhost") as r:
            assert served(r) == "cache"  # the same demands: the cache answers
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await bounded(s.get(base + "/x", server_hostname="wrong.example"))
    assert up.hits["/x"] == 1


# aiohttp 3.14 deprecates BasicAuth and proxy_auth= (for proxy_headers=); both still work.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_proxies_and_proxy_credentials_separate_callers(make_session):
    """A caller never receives a response that went through another proxy or proxy login."""
    # Stand-in proxies that answer the request themselves: each says who answered.
    up, proxy_a, proxy_b = WebUpstream(), WebUpstream("a"), WebUpstream("b")
    mw = SingleflightMiddleware()
    s = make_session(mw)
    async with serve(up.app) as base, serve(proxy_a.app) as pa, serve(proxy_b.app) as pb:
        alice = aiohttp.BasicAuth("alice", "a-secret")
        bob = aiohttp.BasicAuth("bob", "b-secret")
        callers = [
            {},
            {"proxy": pa},
            {"proxy": pb},
            {"proxy": pa, "proxy_auth": alice},
            {"proxy": pa, "proxy_auth": bob},
            {"proxy": pa, "proxy_headers": {"X-Tenant": "1"}},
        ]
        tasks = [asyncio.create_task(s.get(base + "/p?gate=g", **kw)) for kw in callers]
        # Every caller is its own leader: each request reaches its own server.
        await wait_until(
            lambda: up.hits["/p"] + proxy_a.hits["/p"] + proxy_b.hits["/p"] == len(callers),
            "one request per caller",
        )
        for server in (up, proxy_a, proxy_b):
            server.gate("g").set()
        responses = await bounded(asyncio.gather(*tasks))
        seen = [await r.json() for r in responses]
    assert [x["via"] for x in seen] == [None, "a", "b", "a", "a", "a"]
    assert [x["proxy_authorization"] for x in seen] == [
        None,
        None,
        None,
        alice.encode(),
        bob.encode(),
        None,
    ]
    assert mw.stats.followers == 0
