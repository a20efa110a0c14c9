"""The public surface of ``singleflight`` is itself tested (the httpx habit)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import singleflight


def _public_names() -> list[str]:
    return sorted(
        name
        for name in dir(singleflight)
        if not name.startswith("_") and not inspect.ismodule(getattr(singleflight, name))
    )


def test_all_lists_exactly_the_public_names_sorted() -> None:
    assert singleflight.__all__ == sorted(singleflight.__all__)
    assert singleflight.__all__ == _public_names()


def test_the_contract_names_are_exported() -> None:
    for name in ("Group", "OnceMap", "Stats", "singleflight"):
        assert name in singleflight.__all__, name


def test_exported_names_say_they_live_in_singleflight() -> None:
    wrong = {
        name: getattr(singleflight, name).__module__
        for name in singleflight.__all__
        if getattr(singleflight, name).__module__ != "singleflight"
    }
    assert wrong == {}


def test_importing_singleflight_imports_no_optional_dependency() -> None:
    code = (
        "import sys, singleflight\n"
        "from singleflight import Group, OnceMap, singleflight as sf\n"
        "print(','.join(m for m in ('httpx', 'aiohttp', 'redis', 'trio', 'anyio')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing singleflight imported: {proc.stdout.strip()}"
