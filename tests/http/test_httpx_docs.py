"""docs/httpx.md stays true: its Python blocks run, in order, against a loopback upstream."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "httpx.md"


def test_httpx_guide_examples_run(upstream):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"BASE": upstream.url, "__name__": "docs_httpx"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{DOC.name}[python block {number}]", "exec")
        exec(code, namespace)
    assert upstream.hits("/users/42") == 2  # 100 coalesced async GETs + 1 sync GET
