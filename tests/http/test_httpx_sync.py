"""SingleflightTransport (sync) from many threads, against a real loopback upstream."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from http_helpers import pool_is_idle, wait_until_sync

from singleflight.httpx import SingleflightTransport


def run_threads(n, fn):
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(fn, i) for i in range(n)]
    return pool, futures


def test_16_threads_make_one_upstream_call(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        pool, futures = run_threads(16, lambda i: c.get("/threads?gate=t16"))
        wait_until_sync(lambda: t.stats.calls == 16)
        upstream.open_gate("t16")
        responses = [f.result(timeout=10) for f in futures]
        pool.shutdown()
        assert pool_is_idle(t.inner)
    assert upstream.hits("/threads") == 1
    assert len({id(r) for r in responses}) == 16
    assert {r.content for r in responses} == {responses[0].content}
    roles = sorted(r.extensions["singleflight"] for r in responses)
    assert roles == ["follower"] * 15 + ["leader"]
    assert json.loads(responses[0].content)["hit"] == 1


def test_threads_with_different_credentials_stay_apart(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:

        def call(i):
            return c.get("/tw?gate=tw", headers={"Authorization": f"user-{i % 4}"})

        pool, futures = run_threads(16, call)
        wait_until_sync(lambda: t.stats.calls == 16)
        upstream.open_gate("tw")
        responses = [f.result(timeout=10) for f in futures]
        pool.shutdown()
    assert upstream.hits("/tw") == 4
    for i, r in enumerate(responses):
        assert r.json()["who"]["authorization"] == f"user-{i % 4}"


def test_sync_gzip_decodes_once(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        pool, futures = run_threads(4, lambda i: c.get("/sz?encoding=deflate&gate=sz"))
        wait_until_sync(lambda: t.stats.calls == 4)
        upstream.open_gate("sz")
        responses = [f.result(timeout=10) for f in futures]
        pool.shutdown()
    assert upstream.hits("/sz") == 1
    assert all(r.json()["path"] == "/sz" for r in responses)


def test_sync_set_cookie_not_shared(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        pool, futures = run_threads(4, lambda i: c.get("/sc?set_cookie=s=1&gate=sc"))
        wait_until_sync(lambda: t.stats.calls == 4)
        upstream.open_gate("sc")
        responses = [f.result(timeout=10) for f in futures]
        pool.shutdown()
        assert pool_is_idle(t.inner)
    assert upstream.hits("/sc") == 4
    assert {r.extensions["singleflight"] for r in responses} == {"leader"}


def test_sync_oversized_body_streams_to_its_leader(upstream):
    t = SingleflightTransport(max_body_size=1000)
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        with c.stream("GET", "/sb?size=20000&chunked=1") as r:
            assert r.extensions["singleflight"] == "leader"
            assert sum(len(b) for b in r.iter_bytes()) == 20000
        assert pool_is_idle(t.inner)


def test_sync_leader_timeout_reelects(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url) as c:
        leader_result: list[object] = []

        def lead():
            try:
                leader_result.append(c.get("/stl?gate=stl", timeout=0.2))
            except httpx.ReadTimeout as exc:
                leader_result.append(exc)

        leader = threading.Thread(target=lead)
        leader.start()
        upstream.wait_for_hits(1, "/stl")
        pool, futures = run_threads(4, lambda i: c.get("/stl?gate=stl", timeout=10))
        wait_until_sync(lambda: t.stats.calls == 5)
        leader.join(timeout=10)
        assert isinstance(leader_result[0], httpx.ReadTimeout)
        upstream.wait_for_hits(2, "/stl")
        upstream.open_gate("stl")
        responses = [f.result(timeout=10) for f in futures]
        pool.shutdown()
    assert {r.status_code for r in responses} == {200}
    assert upstream.hits("/stl") == 2


def test_sync_errors_are_fresh_per_thread(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:

        def call(i):
            try:
                c.get("/se?reset=10&gate=se")
            except httpx.RemoteProtocolError as exc:
                return exc
            raise AssertionError("no error")

        pool, futures = run_threads(4, call)
        wait_until_sync(lambda: t.stats.calls == 4)
        upstream.open_gate("se")
        errors = [f.result(timeout=10) for f in futures]
        pool.shutdown()
        assert pool_is_idle(t.inner)
    assert upstream.hits("/se") == 1
    assert len({id(e) for e in errors}) == 4 and len({id(e.request) for e in errors}) == 4


@pytest.mark.parametrize("kwargs", [{"content": b"x"}, {"extensions": {"singleflight": False}}])
def test_sync_bypass(upstream, kwargs):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url, timeout=10) as c:
        r = c.request("GET", "/sbp", **kwargs)
    assert "singleflight" not in r.extensions and t.stats.calls == 0


def test_sync_context_manager_and_close():
    events = []

    class Inner(httpx.BaseTransport):
        def __enter__(self):
            events.append("enter")
            return self

        def __exit__(self, *exc):
            events.append("exit")

        def close(self):
            events.append("close")

        def handle_request(self, request):  # pragma: no cover - not called
            raise AssertionError

    t = SingleflightTransport(Inner())
    with httpx.Client(transport=t):
        pass
    t.close()
    assert events == ["enter", "exit", "close"]
    assert isinstance(SingleflightTransport().inner, httpx.HTTPTransport)


def test_sync_follower_keeps_its_own_read_timeout(upstream):
    t = SingleflightTransport()
    with httpx.Client(transport=t, base_url=upstream.url) as c:
        pool, leader = run_threads(1, lambda i: c.get("/sft?gate=sft", timeout=10))
        upstream.wait_for_hits(1, "/sft")
        with pytest.raises(httpx.ReadTimeout) as info:
            c.get("/sft?gate=sft", timeout=0.2)  # a follower: gives up on its own deadline
        assert info.value.request.url.path == "/sft"
        assert t.group.in_flight == 1  # the flight went on without it
        upstream.open_gate("sft")
        assert leader[0].result(timeout=10).status_code == 200
        pool.shutdown()
    assert upstream.hits("/sft") == 1
    assert t.group.in_flight == 0
