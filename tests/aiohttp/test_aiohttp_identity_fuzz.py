"""Identity fuzz: random bursts of callers with TLS identities, checks and proxies, one middleware.

Each round sends a burst of concurrent GETs of one path, each caller with an identity drawn at
random: a client certificate per request or per connector, no verification, a pinned
fingerprint, the default checks (which must fail: the test CA is not trusted), a
``server_hostname``, a proxy with or without credentials or headers. The servers echo who they
saw (client certificate, proxy, proxy credentials) and number each upstream hit. Properties:

- a caller never receives a response fetched under another identity: every caller that got a
  given upstream hit has the same identity, and what the server saw is that identity's;
- callers with the same identity share one upstream request (and, with ``ttl``, the cache);
- a caller whose checks must fail gets aiohttp's certificate error, never a response.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from _aiohttp_servers import WebUpstream, serve
from _aiohttp_support import bounded, wait_until
from _aiohttp_tls import make_pki
from aiohttp.client_reqrep import ConnectionKey

from singleflight.aiohttp import SingleflightMiddleware, served

pytestmark = [
    pytest.mark.timeout(120),
    # aiohttp 3.14 deprecates BasicAuth and proxy_auth= (for proxy_headers=); both still work.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SNI_IN_POOL_KEY = "server_hostname" in ConnectionKey._fields
ROUNDS = 12
BURST = 10


def _identities(pki: Any, pin: bytes) -> dict[str, dict[str, Any]]:
    """name -> how the caller sends it: target ("tls"/"plain"), session, request options, echo."""
    alice, bob = pki.client("alice"), pki.client("bob")
    auth_a = aiohttp.BasicAuth("alice", "a-secret")
    auth_b = aiohttp.BasicAuth("bob", "b-secret")
    return {
        "alice": {"target": "tls", "kw": {"ssl": alice}, "cert": "alice"},
        "bob": {"target": "tls", "kw": {"ssl": bob}, "cert": "bob"},
        "alice-sni": {
            "target": "tls",
            "kw": {"ssl": alice, "server_hostname": "localhost"},
            "cert": "alice",
        },
        "alice-connector": {"target": "tls", "session": "alice", "kw": {}, "cert": "alice"},
        "insecure": {"target": "tls", "kw": {"ssl": False}, "cert": "none"},
        "pinned": {"target": "tls", "kw": {"ssl": aiohttp.Fingerprint(pin)}, "cert": "none"},
        "verify-default": {"target": "tls", "kw": {}, "fails": True},
        "wrong-sni": {
            "target": "tls",
            "kw": {"ssl": alice, "server_hostname": "wrong.example"},
            "cert": "alice",
            # aiohttp < 3.14 leaves server_hostname out of its pool's ConnectionKey, so plain
            # aiohttp sends it on a pooled connection that alice's request verified: then it
            # succeeds, with its own request.
            "fails": True if SNI_IN_POOL_KEY else "unless-pooled",
        },
        "direct": {"target": "plain", "kw": {}, "via": "direct"},
        "proxy-a": {"target": "plain", "kw": {"proxy": "a"}, "via": "a"},
        "proxy-b": {"target": "plain", "kw": {"proxy": "b"}, "via": "b"},
        "proxy-a-alice": {
            "target": "plain",
            "kw": {"proxy": "a", "proxy_auth": auth_a},
            "via": "a",
            "proxy_authorization": auth_a.encode(),
        },
        "proxy-a-bob": {
            "target": "plain",
            "kw": {"proxy": "a", "proxy_auth": auth_b},
            "via": "a",
            "proxy_authorization": auth_b.encode(),
        },
        "proxy-a-tenant": {
            "target": "plain",
            "kw": {"proxy": "a", "proxy_headers": {"X-Tenant": "1"}},
            "via": "a",
        },
    }


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)


@pytest.mark.parametrize("ttl", [None, 60.0])
async def test_no_caller_ever_gets_another_identitys_response(ttl):
    pki = make_pki()
    ids = _identities(pki, pki.pin)
    rng = random.Random(20261208)
    tls_up, plain_up = WebUpstream("tls"), WebUpstream("direct")
    proxies = {"a": WebUpstream("a"), "b": WebUpstream("b")}
    servers = [tls_up, plain_up, *proxies.values()]
    mw = SingleflightMiddleware(ttl=ttl)
    async with (
        serve(tls_up.app, pki.server) as tls_base,
        serve(plain_up.app) as plain_base,
        serve(proxies["a"].app) as proxy_a,
        serve(proxies["b"].app) as proxy_b,
        aiohttp.ClientSession(middlewares=(mw,)) as default,
        aiohttp.ClientSession(
            middlewares=(mw,), connector=aiohttp.TCPConnector(ssl=pki.client("alice"))
        ) as alice_session,
    ):
        sessions = {"default": default, "alice": alice_session}
        proxy_urls = {"a": proxy_a, "b": proxy_b}

        def send(name: str, path: str, gate: str) -> asyncio.Task[aiohttp.ClientResponse]:
            spec = ids[name]
            kw = dict(spec["kw"])
            if "proxy" in kw:
                kw["proxy"] = proxy_urls[kw["proxy"]]
            base = tls_base if spec["target"] == "tls" else plain_base
            session = sessions[spec.get("session", "default")]
            return asyncio.create_task(session.get(f"{base}{path}?gate={gate}", **kw))

        for round_ in range(ROUNDS):
            path, gate = f"/r{round_}", f"g{round_}"
            callers = [rng.choice(sorted(ids)) for _ in range(BURST)]
            ok = {c for c in callers if not ids[c].get("fails")}
            calls = mw.stats.calls
            tasks = [send(c, path, gate) for c in callers]
            # Every caller has reached the middleware (as a leader or a follower) ...
            await wait_until(
                lambda calls=calls: mw.stats.calls == calls + BURST,
                f"round {round_}: {BURST} callers in",
            )
            # ... and there is one upstream request per identity that can succeed.
            need = len(ok)
            await wait_until(
                lambda path=path, need=need: sum(s.hits[path] for s in servers) >= need,
                f"round {round_}: {len(ok)} upstream requests",
            )
            for s in servers:
                s.gate(gate).set()
            results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
            answered = {c for c, r in zip(callers, results, strict=True) if not _failed(r)}
            assert sum(s.hits[path] for s in servers) == len(answered), callers
            by_hit: dict[tuple[str | None, int], set[str]] = {}
            for name, result in zip(callers, results, strict=True):
                spec = ids[name]
                if spec.get("fails") and (spec["fails"] is True or _failed(result)):
                    assert isinstance(result, aiohttp.ClientConnectorCertificateError), (
                        name,
                        result,
                    )
                    continue
                assert isinstance(result, aiohttp.ClientResponse), (name, result)
                echo = await result.json()
                result.release()
                by_hit.setdefault((echo["via"], echo["hit"]), set()).add(name)
                if spec["target"] == "tls":
                    assert echo["client_cert"] == spec["cert"], (name, echo)
                else:
                    assert echo["via"] == spec["via"], (name, echo)
                    sent = echo["proxy_authorization"]
                    if SNI_IN_POOL_KEY:  # aiohttp >= 3.14
                        assert sent == spec.get("proxy_authorization"), (name, echo)
                    else:  # older aiohttp sends proxy_auth only when it opens a connection
                        assert sent in (spec.get("proxy_authorization"), None), (name, echo)
            # Every upstream response went to callers of one identity only.
            assert all(len(names) == 1 for names in by_hit.values()), by_hit
            if ttl is not None:  # the cache keeps identities apart as well
                for name in sorted(answered):
                    async with await bounded(send(name, path, gate)) as again:
                        assert served(again) == "cache", name
                        echo = await again.json()
                        assert by_hit[(echo["via"], echo["hit"])] == {name}
    assert mw.group.in_flight == 0
