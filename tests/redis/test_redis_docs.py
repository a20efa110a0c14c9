"""docs/redis.md examples run against the test redis-server and cluster, so they cannot rot.

The blocks need a Redis, so the page marks them ``<!-- no-test -->`` for the generic docs runner
(tests/test_docs_examples.py) and ``<!-- redis -->`` (or ``<!-- redis-cluster -->``) for this
one, which runs them in order in one namespace with ``REDIS_URL`` pointing at the fixture's
server (``REDIS_CLUSTER_URL`` at the cluster's first node).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from conftest import RedisCluster, RedisServer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "redis.md"


def blocks(marker: str) -> list[str]:
    fence = re.compile(
        rf"^<!-- {marker} -->\s*\n<!-- no-test -->\s*\n```python\n(?P<code>.*?)^```", re.M | re.S
    )
    return [m["code"] for m in fence.finditer(PAGE.read_text())]


def run(code_blocks: list[str]) -> None:
    namespace: dict[str, object] = {"__name__": "docs_redis"}
    for i, code in enumerate(code_blocks):
        exec(compile(code, f"redis.md[block {i}]", "exec"), namespace)


@pytest.mark.timeout(60)
def test_redis_page_examples_run(
    redis_server: RedisServer, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = blocks("redis")
    assert len(code) >= 3
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    run(code)
    assert not list(redis_sync.scan_iter(match="*:lease"))


@pytest.mark.timeout(60)
def test_redis_page_cluster_examples_run(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = blocks("redis-cluster")
    assert len(code) >= 1
    monkeypatch.setenv("REDIS_CLUSTER_URL", cluster.url)
    run(code)
