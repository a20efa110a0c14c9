"""Every ```python block in README.md and docs/*.md runs, so examples cannot rot.

Blocks of one file run in order in one namespace (a page may build on its earlier blocks).
A block right after a ``<!-- no-test -->`` line is shown but not run. Examples may only talk to
loopback servers (singleflight.testing.LoopbackUpstream), never to the internet.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<skip><!-- no-test -->\s*\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)
REMOTE = re.compile(r"https?://(?!127\.0\.0\.1|localhost|\[::1\])[\w.-]+")


def blocks(page: Path) -> list[str]:
    return [m["code"] for m in FENCE.finditer(page.read_text()) if not m["skip"]]


RUNNABLE = [p for p in PAGES if blocks(p)]


def test_pages_have_examples() -> None:
    assert sum(len(blocks(p)) for p in PAGES) >= 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_page_examples_run(page: Path) -> None:
    code_blocks = blocks(page)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(code_blocks):
        assert not REMOTE.search(code), f"{page.name} block {i} reaches beyond loopback"
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
