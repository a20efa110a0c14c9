"""The foreign-suite runner sorts outcomes by the expected-difference list as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

FOLDER = Path(__file__).resolve().parents[2] / "scripts" / "foreign"


def _load():
    name = "sf_foreign_run"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FOLDER / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


run = _load()

LIST = """
## cause one
httpx * tests/a.py::test_listed[*] -- listed in every mode
httpx ttl tests/a.py::test_ttl_only -- listed in ttl only
aiohttp deselect tests/b.py::test_net -- needs the internet
"""


def test_checked_in_list_parses_and_every_entry_has_a_cause_and_reason():
    entries = run.parse_expected((FOLDER / "expected.txt").read_text())
    assert entries
    for entry in entries:
        assert entry.reason and entry.cause, entry


def test_a_failure_not_listed_is_unexpected():
    entries = run.parse_expected(LIST)
    outcomes = {
        "tests/a.py::test_listed[x-1]": ["failed", "call: boom"],
        "tests/a.py::test_ttl_only": ["failed", "call: cached"],
        "tests/a.py::test_fine": ["passed", ""],
    }
    verdict = run.compare("httpx", "default", outcomes, entries)
    assert (verdict.run, verdict.passed, verdict.expected) == (3, 1, 1)
    assert verdict.unexpected == [("tests/a.py::test_ttl_only", "call: cached")]
    ttl = run.compare("httpx", "ttl", outcomes, entries)
    assert ttl.unexpected == [] and ttl.expected == 2


def test_a_listed_difference_that_passes_is_reported_fixed():
    entries = run.parse_expected(LIST)
    outcomes = {
        "tests/a.py::test_listed[x-1]": ["passed", ""],
        "tests/a.py::test_listed[x-2]": ["passed", ""],
        "tests/a.py::test_ttl_only": ["failed", "call: cached"],
    }
    verdict = run.compare("httpx", "ttl", outcomes, entries)
    assert [entry.pattern for entry in verdict.fixed] == ["tests/a.py::test_listed[*]"]
    assert verdict.unexpected == []
    # Still fixed-or-not per entry: one failing match keeps the entry.
    outcomes["tests/a.py::test_listed[x-2]"] = ["failed", "call: still"]
    assert run.compare("httpx", "ttl", outcomes, entries).fixed == []


def test_brackets_match_literally_and_skips_are_not_run():
    entries = run.parse_expected(LIST)
    outcomes = {
        "tests/a.py::test_listedX": ["failed", "call: no brackets"],
        "tests/a.py::test_skipped": ["skipped", ""],
        "tests/a.py::test_xfail": ["xfailed", ""],
    }
    verdict = run.compare("httpx", "default", outcomes, entries)
    assert [nodeid for nodeid, _ in verdict.unexpected] == ["tests/a.py::test_listedX"]
    assert (verdict.run, verdict.skipped) == (1, 2)


def test_deselected_entries_apply_to_no_mode():
    entries = run.parse_expected(LIST)
    (deselected,) = [entry for entry in entries if entry.suite == "aiohttp"]
    assert deselected.modes == ()


@pytest.mark.parametrize(
    "line",
    [
        "httpx * tests/a.py::test_x",  # no reason
        "httpx * tests/a.py::test_x --   ",  # empty reason
        "requests * tests/a.py::test_x -- not a suite we run",
        "httpx fast tests/a.py::test_x -- not a mode",
        "httpx * tests/a.py::test_x extra -- too many fields",
    ],
)
def test_a_malformed_line_fails_with_its_line_number(line):
    with pytest.raises(ValueError, match="expected.txt:2"):
        run.parse_expected("## cause\n" + line)
