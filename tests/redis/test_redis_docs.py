"""docs/redis.md examples run against the test redis-server, so they cannot rot.

The blocks need a Redis, so the page marks them ``<!-- no-test -->`` for the generic docs runner
(tests/test_docs_examples.py) and ``<!-- redis -->`` for this one, which runs them in order in
one namespace with ``REDIS_URL`` pointing at the fixture's server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from conftest import RedisServer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "redis.md"
FENCE = re.compile(
    r"^<!-- redis -->\s*\n<!-- no-test -->\s*\n```python\n(?P<code>.*?)^```", re.M | re.S
)


@pytest.mark.timeout(60)
def test_redis_page_examples_run(
    redis_server: RedisServer, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = [m["code"] for m in FENCE.finditer(PAGE.read_text())]
    assert len(blocks) >= 2
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    namespace: dict[str, object] = {"__name__": "docs_redis"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"redis.md[block {i}]", "exec"), namespace)
    assert not list(redis_sync.scan_iter(match="*:lease"))
