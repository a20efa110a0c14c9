"""Every reader gives the whole body in the Redis tier's roles too: "shared", "remote", "stale".

Two middlewares with their own RedisTier on one real redis-server stand for two processes.
Skipped without redis-py or ``redis-server`` (a failure instead when ``CI`` is set).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from _aiohttp_servers import BODY, KINDS, WebUpstream, serve
from _aiohttp_support import bounded, wait_until
from test_aiohttp_readers import READERS

from singleflight.aiohttp import SingleflightMiddleware, served

aioredis = pytest.importorskip("redis.asyncio")
RedisTier = pytest.importorskip("singleflight.redis").RedisTier

pytestmark = pytest.mark.timeout(120)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server not found (CI is set, so this is a failure, not a skip)")
        pytest.skip("redis-server not found: apt-get install redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = subprocess.Popen(
        [*args, "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            # A child process's port: nothing to wait on but the port itself.
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.01)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def two_processes(redis_port: int) -> AsyncIterator[list[SingleflightMiddleware]]:
    clients = [aioredis.Redis(port=redis_port) for _ in range(2)]
    await clients[0].flushall()
    tiers = [RedisTier(c, ttl=0.2, stale_ttl=60) for c in clients]
    try:
        yield [SingleflightMiddleware(tier=t) for t in tiers]
    finally:
        for tier, client in zip(tiers, clients, strict=True):
            await tier.aclose()
            await client.aclose()


@pytest.mark.parametrize("reader", sorted(READERS))
async def test_every_reader_gets_the_whole_body_in_the_redis_roles(reader, two_processes):
    read = READERS[reader]
    one, two = two_processes
    up = WebUpstream()
    async with (
        serve(up.app) as base,
        aiohttp.ClientSession(middlewares=(one,)) as sa,
        aiohttp.ClientSession(middlewares=(two,)) as sb,
    ):
        for kind in KINDS:
            url = f"{base}/{kind}?kind={kind}&gate={kind}"
            lead = asyncio.create_task(sa.get(url))
            await bounded(up.arrival(kind).wait())
            remote = asyncio.create_task(sb.get(url))  # waits on the other "process"
            await wait_until(lambda: two.group.in_flight == 1, "the remote follower")
            up.gate(kind).set()
            responses = [*await bounded(asyncio.gather(lead, remote))]
            responses.append(await bounded(sb.get(url)))  # fresh in Redis
            while True:  # past ttl, within stale_ttl: served stale, refreshed behind
                await asyncio.sleep(0.05)  # the tier's ttl runs on Redis's clock
                stale = await bounded(sb.get(url))
                if served(stale) == "stale":
                    break
                stale.release()
            responses.append(stale)
            roles = [served(r) for r in responses]
            assert roles[0] == "leader" and roles[2:] == ["shared", "stale"]
            assert roles[1] in ("remote", "shared"), roles  # "shared" if it looked late
            for resp in responses:
                async with resp:
                    assert await bounded(read(resp)) == BODY, (kind, served(resp))
