"""pytest plugin: write each test's outcome and the adapters' stats to a JSON file for run.py."""

# Loaded with -p sf_foreign_results next to sf_foreign_httpx or sf_foreign_aiohttp. The file is
# named by SF_FOREIGN_OUT: {"mode", "stats", "outcomes": {nodeid: [outcome, message]}} where
# outcome is passed, failed, skipped or xfailed (a failure in setup or teardown is a failure).

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ("STATS", "touch")

# Each adapter plugin appends a callable returning its summed Stats (a dict).
STATS: list[Callable[[], dict[str, Any]]] = []

_outcomes: dict[str, list[str]] = {}
_touched: set[str] = set()  # tests that made a wrapped client or session
_current: list[str] = [""]


def touch() -> None:
    """Called by an adapter plugin when the running test wraps a client or session."""
    if _current[0]:
        _touched.add(_current[0])


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _current[0] = nodeid


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _current[0] = ""


def _message(report: Any) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def pytest_runtest_logreport(report: Any) -> None:
    current = _outcomes.get(report.nodeid)
    if report.failed:
        if current is None or current[0] != "failed":
            _outcomes[report.nodeid] = ["failed", f"{report.when}: {_message(report)}"]
    elif report.skipped:
        if current is None or current[0] == "passed":
            kind = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            _outcomes[report.nodeid] = [kind, ""]
    elif report.when == "call" and current is None:
        _outcomes[report.nodeid] = ["passed", ""]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    stats: dict[str, Any] = {}
    for source in STATS:
        stats.update(source())
    mode = os.environ.get("SF_FOREIGN_MODE", "default")
    terminalreporter.write_line(f"singleflight [{mode}]: " + json.dumps(stats))
    path = os.environ.get("SF_FOREIGN_OUT")
    if path:
        with open(path, "w") as file:
            report = {"mode": mode, "stats": stats, "outcomes": _outcomes}
            report["touched"] = sorted(_touched)
            json.dump(report, file, indent=0)
