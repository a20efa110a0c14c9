"""docs/getting-started.md prints what it says you will see, each block on its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"
FENCE = re.compile(r"^```python\n(?P<code>.*?)^```", re.M | re.S)


@pytest.mark.timeout(60)
def test_each_entry_point_prints_one_run_for_a_hundred_callers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = [m["code"] for m in FENCE.finditer(PAGE.read_text())]
    assert len(blocks) == 3  # decorator, httpx, aiohttp
    seen = []
    for i, code in enumerate(blocks):  # each block stands alone: copied into a file, it runs
        exec(compile(code, f"getting-started.md[block {i}]", "exec"), {"__name__": "gs"})
        seen.append(capsys.readouterr().out)
    stats = "Stats(calls=100, leaders=1, followers=99, cache_hits=0, errors=0"
    assert seen[0].count("fetching apple") == 1 and f"9.99 {stats}" in seen[0]
    assert f"200 {stats}" in seen[1] and "the server saw 1 request" in seen[1]
    assert f"{{1}} {stats}" in seen[2] and "the server saw 1 request" in seen[2]
    text = PAGE.read_text()
    assert f"9.99 {stats}" in text  # the page shows what the code prints
