"""AsyncSingleflightTransport when httpx runs on trio."""

from __future__ import annotations

import httpx
import pytest
from http_helpers import pool_is_idle, wait_until

from singleflight.httpx import AsyncSingleflightTransport

trio = pytest.importorskip("trio")


def test_trio_burst_makes_one_upstream_call(upstream):
    t = AsyncSingleflightTransport()
    responses: list[httpx.Response] = []

    async def main():
        with trio.fail_after(10):
            async with httpx.AsyncClient(transport=t, base_url=upstream.url) as c:

                async def one():
                    responses.append(await c.get("/trio?gate=tr&encoding=gzip"))

                async with trio.open_nursery() as nursery:
                    for _ in range(50):
                        nursery.start_soon(one)
                    await wait_until(lambda: t.stats.calls == 50)
                    upstream.open_gate("tr")
                assert pool_is_idle(t.inner)

    trio.run(main)
    assert upstream.hits("/trio") == 1
    assert len(responses) == 50 and {r.json()["hit"] for r in responses} == {1}
    roles = sorted(r.extensions["singleflight"] for r in responses)
    assert roles == ["follower"] * 49 + ["leader"]


def test_trio_leader_cancellation_reelects(upstream):
    t = AsyncSingleflightTransport()
    statuses: list[int] = []

    async def main():
        with trio.fail_after(10):
            async with httpx.AsyncClient(transport=t, base_url=upstream.url) as c:

                async def follower():
                    statuses.append((await c.get("/tc?gate=tc")).status_code)

                async with trio.open_nursery() as nursery:
                    leader_scope = trio.CancelScope()

                    async def leader():
                        with leader_scope:
                            await c.get("/tc?gate=tc")

                    nursery.start_soon(leader)
                    await upstream.wait_for_hits_async(1, "/tc")
                    for _ in range(4):
                        nursery.start_soon(follower)
                    await wait_until(lambda: t.stats.calls == 5)
                    leader_scope.cancel()
                    await upstream.wait_for_hits_async(2, "/tc")
                    upstream.open_gate("tc")

    trio.run(main)
    assert statuses == [200] * 4
    assert upstream.hits("/tc") == 2


def test_trio_follower_timeout_and_leader_timeout(upstream):
    t = AsyncSingleflightTransport()
    outcomes: dict[str, object] = {}

    async def main():
        with trio.fail_after(10):
            async with httpx.AsyncClient(transport=t, base_url=upstream.url) as c:

                async def call(name, timeout):
                    try:
                        outcomes[name] = (await c.get("/tt?gate=tt", timeout=timeout)).status_code
                    except httpx.ReadTimeout as exc:
                        outcomes[name] = exc

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call, "leader", 0.2)
                    await upstream.wait_for_hits_async(1, "/tt")
                    nursery.start_soon(call, "impatient", 0.05)
                    nursery.start_soon(call, "patient", 10)
                    await wait_until(lambda: "leader" in outcomes and "impatient" in outcomes)
                    await upstream.wait_for_hits_async(2, "/tt")
                    upstream.open_gate("tt")

    trio.run(main)
    assert isinstance(outcomes["leader"], httpx.ReadTimeout)
    assert isinstance(outcomes["impatient"], httpx.ReadTimeout)
    assert outcomes["patient"] == 200
    assert upstream.hits("/tt") == 2
