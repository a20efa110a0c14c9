"""The client's own writes are never hidden by the ttl cache (RFC 9111 §4.4), httpx async and sync.

A non-error PUT/POST/DELETE/PATCH response drops the cached GET/HEAD responses of its URL, of
its ``Location`` and of its ``Content-Location`` (same origin), for every transport sharing the
group; a GET flight running while the write lands is never stored. Against the loopback
upstream, which counts every hit.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from http_helpers import bounded, wait_until

from singleflight._http import invalidated_urls
from singleflight.httpx import AsyncSingleflightTransport, SingleflightTransport

pytestmark = pytest.mark.timeout(60)


def role(r: httpx.Response) -> str:
    return str(r.extensions.get("singleflight"))


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_a_write_drops_the_cached_read_of_its_url(upstream, method):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        assert role(await c.get("/items")) == "leader"
        assert role(await c.head("/items")) == "leader"
        assert role(await c.get("/items")) == "cache"
        assert role(await c.get("/other")) == "leader"
        assert (await c.request(method, "/items", content=b"new")).status_code == 200
        assert role(await c.get("/items")) == "leader"  # fresh: the write is seen
        assert role(await c.head("/items")) == "leader"
        assert role(await c.get("/other")) == "cache"  # targeted: other URLs keep theirs
    assert upstream.hits("/items") == 5


async def test_location_and_content_location_are_dropped_too_same_origin_only(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        for path in ("/items/7", "/items/8", "/items/9?x=1", "/keep"):
            await c.get(path)
        headers = "header=Location:/items/7&header=Content-Location:items/8"
        await c.post(f"/items?status=201&{headers}", content=b"{}")
        assert role(await c.get("/items/7")) == "leader"
        assert role(await c.get("/items/8")) == "leader"  # relative to the target URL
        assert role(await c.get("/items/9?x=1")) == "cache"
        await c.post("/w?header=Location:http://elsewhere.test/keep", content=b"{}")
        assert role(await c.get("/keep")) == "cache"  # another origin's URL: untouched


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
async def test_an_error_response_to_a_write_drops_nothing(upstream, status):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        await c.get("/e")
        await c.put(f"/e?status={status}", content=b"x")
        assert role(await c.get("/e")) == "cache"  # the write did not happen (RFC 9111 §4.4)


async def test_a_write_through_one_transport_drops_the_entries_of_every_transport(upstream):
    reader = AsyncSingleflightTransport(ttl=60)
    writer = AsyncSingleflightTransport(group=reader.group)
    sync_writer = SingleflightTransport(group=reader.group)
    async with bounded(10), httpx.AsyncClient(transport=reader, base_url=upstream.url) as c:
        await c.get("/shared")
        async with httpx.AsyncClient(transport=writer, base_url=upstream.url) as w:
            await w.delete("/shared")
        assert role(await c.get("/shared")) == "leader"
        with httpx.Client(transport=sync_writer, base_url=upstream.url) as sw:
            await asyncio.to_thread(sw.put, "/shared", content=b"y")
        assert role(await c.get("/shared")) == "leader"
    assert upstream.hits("/shared") == 5


def test_the_sync_transport_sees_its_own_writes(upstream):
    t = SingleflightTransport(ttl=60)
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        assert role(c.get("/s")) == "leader"
        assert role(c.get("/s")) == "cache"
        c.patch("/s", content=b"z")
        assert role(c.get("/s")) == "leader"


async def test_a_read_in_flight_while_a_write_lands_is_not_stored(upstream):
    t = AsyncSingleflightTransport(ttl=60)
    async with bounded(10), httpx.AsyncClient(transport=t, base_url=upstream.url) as c:
        read = asyncio.ensure_future(c.get("/f?gate=f"))
        await upstream.wait_for_hits_async(1, "/f")
        # Lands while the read is upstream; its Content-Location names the read's URL.
        await c.put("/f?header=Content-Location:/f%3Fgate%3Df", content=b"new")
        upstream.open_gate("f")
        assert role(await read) == "leader"  # its caller gets it: it was sent before the write
        assert role(await c.get("/f?gate=f")) == "leader"  # never served from the cache
        assert role(await c.get("/f?gate=f")) == "cache"
        await wait_until(lambda: t.group.in_flight == 0)


def test_custom_keys_name_no_url_and_are_left_alone(upstream):
    t = SingleflightTransport(ttl=60, key=lambda request: request.url.path)
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        c.get("/k")
        c.put("/k", content=b"1")
        assert role(c.get("/k")) == "cache"  # documented: entries of key= expire by ttl only


def test_the_rule():
    base = "http://h/items"
    assert invalidated_urls("GET", 200, base, []) == ()
    assert invalidated_urls("OPTIONS", 200, base, []) == ()
    assert invalidated_urls("PUT", 500, base, []) == ()
    assert invalidated_urls("PUT", 199, base, []) == ()
    assert invalidated_urls("post", 303, "HTTP://H:80/items", []) == (base,)
    assert invalidated_urls(
        "POST",
        201,
        base,
        [(b"Location", b"/items/1"), (b"Content-Location", b"http://H/items/1?v=2")],
    ) == (base, "http://h/items/1", "http://h/items/1?v=2")
    assert invalidated_urls("DELETE", 204, base, [("location", "https://h/items")]) == (base,)
