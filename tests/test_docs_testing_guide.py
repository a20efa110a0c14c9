"""The pytest-httpx example of docs/testing.md, run as copied: in an empty directory, no plugins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def example() -> str:
    section = PAGE.read_text().split("## pytest-httpx", 1)[1]
    match = re.search(r"^```python\n(?P<code>.*?)^```", section, re.M | re.S)
    assert match, "the pytest-httpx section has no python block"
    return match["code"]


@pytest.mark.timeout(120)
def test_pytest_httpx_example_runs_as_copied_without_pytest_asyncio(tmp_path: Path) -> None:
    (tmp_path / "test_burst.py").write_text(example())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",  # the page says: no async test plugin needed
            "test_burst.py",
        ],
        cwd=tmp_path,  # no pyproject here: none of this project's pytest settings apply
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


@pytest.mark.timeout(120)
def test_the_example_fails_when_nothing_is_coalesced(tmp_path: Path) -> None:
    # The same test with a plain transport must fail: it checks coalescing, not just that it ran.
    code = example().replace("transport=AsyncSingleflightTransport()", "")
    (tmp_path / "test_burst.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout
