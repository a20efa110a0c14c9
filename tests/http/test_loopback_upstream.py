"""singleflight.testing.LoopbackUpstream: the public test upstream itself."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading

import httpx
import pytest

from singleflight.testing import LoopbackUpstream


def test_counts_hits_per_path_and_records_requests(upstream):
    with httpx.Client(base_url=upstream.url) as c:
        c.get("/a", headers={"X-API-Key": "k"})
        c.get("/a?x=1")
        c.post("/b")
    assert upstream.hits("/a") == 2 and upstream.hits("/b") == 1 and upstream.hits() == 3
    first = upstream.requests("/a")[0]
    assert first.method == "GET" and first.header("x-api-key") == "k"
    assert upstream.requests("/a")[1].query == "x=1"
    upstream.reset()
    assert upstream.hits() == 0 and upstream.requests() == []


def test_behaviours(upstream):
    with httpx.Client(base_url=upstream.url) as c:
        echo = c.get("/e", headers={"Authorization": "me"}).json()
        assert echo["who"]["authorization"] == "me" and echo["hit"] == 1
        assert c.get("/s?status=503").status_code == 503
        assert c.get("/t?body=hi").text == "hi"
        assert len(c.get("/n?size=12345").content) == 12345
        r = c.get("/g?body=zip&encoding=gzip")
        assert r.headers["content-encoding"] == "gzip" and r.text == "zip"
        assert r.num_bytes_downloaded == len(gzip.compress(b"zip", mtime=0))
        r = c.get("/h?set_cookie=a=b&cache_control=no-store&vary=*&header=X-A:1&header=X-A:2")
        assert r.headers["set-cookie"] == "a=b" and r.headers["cache-control"] == "no-store"
        assert r.headers.get_list("x-a") == ["1", "2"] and r.headers["vary"] == "*"
        assert c.get("/r?redirect=/x").headers["location"] == "/x"
        assert c.get("/c?status=304").content == b""
        assert c.get("/p?status=206&body=abcd").headers["content-range"] == "bytes 0-3/8"
        assert c.get("/sse?sse=2").text == "data: 0\n\ndata: 1\n\n"
        assert "transfer-encoding" in c.get("/k?chunked=1&size=10000").headers
        with pytest.raises(httpx.RemoteProtocolError):
            c.get("/x?reset=10")


def test_gates_and_waits(upstream):
    with httpx.Client(base_url=upstream.url, timeout=10) as c:
        result = []
        thread = threading.Thread(target=lambda: result.append(c.get("/w?gate=w").status_code))
        thread.start()
        upstream.wait_for_hits(1, "/w")
        assert thread.is_alive()
        upstream.open_gate("w")
        thread.join(5)
        assert result == [200]
    with pytest.raises(TimeoutError):
        upstream.wait_for_hits(5, "/w", timeout=0.01)


def test_control_endpoints(upstream):
    with httpx.Client(base_url=upstream.url) as c:
        c.get("/one")
        assert c.get("/_upstream/hits").json() == {"total": 1, "paths": {"/one": 1}}
        assert c.post("/_upstream/gate/q").json() == {"open": "q"}
        assert c.get("/q?gate=q").status_code == 200
        c.post("/_upstream/reset")
        assert c.get("/_upstream/hits").json()["total"] == 0


def test_lifecycle():
    up = LoopbackUpstream()
    with pytest.raises(RuntimeError):
        up.open_gate("x")
    up.close()  # not started: nothing to do
    with up:
        assert up.url.startswith("http://127.0.0.1:")
        with pytest.raises(RuntimeError):
            up.start()
    up.close()


def test_command_line_serves_and_prints_its_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "singleflight.testing"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().strip()
        assert httpx.get(url + "/cli").json()["path"] == "/cli"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_reset_releases_held_requests(upstream):
    with httpx.Client(base_url=upstream.url, timeout=10) as c:
        result = []
        thread = threading.Thread(target=lambda: result.append(c.get("/held?gate=x").status_code))
        thread.start()
        upstream.wait_for_hits(1, "/held")
        upstream.reset()
        thread.join(5)
        assert result == [200]
