"""Fixtures for the Redis tier: a real redis-server on a free loopback port, and an upstream.

Without ``redis-server`` on PATH these tests skip, saying how to install it, unless ``CI`` is
set: then they fail, so CI can never pass by skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from singleflight.testing import LoopbackUpstream

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def timeout(seconds: float) -> AsyncIterator[None]:
        """asyncio.timeout for 3.10: TimeoutError if the block runs longer than ``seconds``."""
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()


INSTALL_HINT = (
    "redis-server not found: install it to run the Redis tier tests "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process on 127.0.0.1, no persistence, stopped by its PID."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail(INSTALL_HINT + " (CI is set, so this is a failure, not a skip)")
            pytest.skip(INSTALL_HINT)
        self.binary = binary
        self.tmp = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server options (a cluster node's)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.tmp),
                "--loglevel", "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on {self.port}") from None
                    time.sleep(0.02)  # waiting for a child process to listen: nothing to await
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL this server (by its PID), as a crash would end it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # by PID: Popen signals exactly our child
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def sync_client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_sync(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on a flushed database (every test starts empty)."""
    client = redis_server.sync_client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def rclient(
    redis_server: RedisServer, redis_sync: redis.Redis
) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream() as up:
        yield up


@pytest.fixture
def upstream(upstream_server: LoopbackUpstream) -> LoopbackUpstream:
    upstream_server.reset()
    return upstream_server


def _cluster_ports(n: int) -> list[int]:
    """``n`` loopback ports whose cluster-bus twins (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisCluster:
    """A real 6-node Redis Cluster (3 masters, 3 replicas) of redis-server children on loopback.

    Node timeout 1 s, so a killed master's replica is promoted within a few seconds.
    """

    def __init__(self, tmp: Path) -> None:
        cli = shutil.which("redis-cli")
        if cli is None or shutil.which("redis-server") is None:
            hint = INSTALL_HINT + " (and redis-cli: apt-get install redis-tools)"
            if os.environ.get("CI"):
                pytest.fail(hint + " (CI is set, so this is a failure, not a skip)")
            pytest.skip(hint)
        self.cli = cli
        self.nodes = [RedisServer(tmp / f"n{i}") for i in range(6)]
        for node, port in zip(self.nodes, _cluster_ports(6), strict=True):
            node.port = port
            node.url = f"redis://127.0.0.1:{port}/0"
            node.tmp.mkdir(parents=True, exist_ok=True)
        self.url = self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.extra = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.tmp / "nodes.conf"),
                "--cluster-node-timeout", "1000",
            ]  # fmt: skip
            node.start()
        try:
            subprocess.run(
                [self.cli, "--cluster", "create",
                 *[f"127.0.0.1:{p}" for p in self.ports],
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and sees every slot (bounded)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.sync_client()
            try:
                while True:
                    info = client.cluster("info")
                    ok = info.get("cluster_state") == "ok"
                    if ok and int(info.get("cluster_slots_ok", 0)) == 16384:
                        role = client.execute_command("ROLE")
                        # a replica counts once it is in sync with its master
                        if role[0] in (b"master", "master") or role[3] in (
                            b"connected",
                            "connected",
                        ):
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster not ok on {node.port}: {info}")
                    time.sleep(0.05)  # polling a child process's state: nothing to await
            finally:
                client.close()

    def masters(self) -> list[RedisServer]:
        out = []
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.sync_client()
            try:
                if client.execute_command("ROLE")[0] in (b"master", "master"):
                    out.append(node)
            finally:
                client.close()
        return out

    def flush(self) -> None:
        for node in self.masters():
            client = node.sync_client()
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def sync_client(self, **kwargs: object) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One cluster for the session (tests that kill a node start their own)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session's cluster, flushed (every test starts empty)."""
    redis_cluster.flush()
    return redis_cluster
