"""The demo's command line: its options, each checked, and the checks made before a run."""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

from ._demo_report import DEFAULT_CONCURRENCY

__all__ = ("parser", "preflight")


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _requests(text: str) -> int:
    value = _positive_int(text)
    if value > 100_000:
        raise argparse.ArgumentTypeError(f"at most 100,000 per burst, got {value:,}")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds, got {value}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 3600 seconds, got {value}")
    return value


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="python -m singleflight",
        description="singleflight: make concurrent identical work happen exactly once.",
    )
    p.add_argument("--version", action="version", version=f"singleflight-http {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="fire a burst of identical GETs through plain and coalescing clients",
        description=(
            "Start a loopback HTTP server that answers after --delay and counts hits, then fire "
            "the same burst of GETs (every caller at once) through plain httpx, httpx + "
            "singleflight, plain aiohttp, aiohttp + singleflight, and httpx + singleflight with "
            "a TTL (a second burst is served from memory). Prints upstream calls, wall time and "
            "per-caller latency, counted from the moment each caller asked. A mode that fails "
            "is shown as a row with its error; the other modes still run."
        ),
    )
    d.add_argument(
        "--requests",
        type=_requests,
        default=1000,
        help="GETs per burst, up to 100,000 (default 1000)",
    )
    d.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=(
            "connections per client (default %(default)s). The plain clients' callers queue for "
            "one of them, so a plain burst takes about requests / concurrency x delay, plus the "
            "client's own time per request: the default run takes a few seconds. httpx's pool "
            "gets slower per request past a few dozen connections"
        ),
    )
    d.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        help=(
            "seconds a plain client's caller waits, in line and for its answer, before it gives "
            "up as a caller with a deadline would (default %(default)g). It bounds the plain "
            "baselines: with 100,000 requests most plain callers give up and the row says how "
            "many. The coalescing clients make one call per key and need no bound"
        ),
    )
    d.add_argument(
        "--keys",
        type=_positive_int,
        default=1,
        help="distinct URLs the burst is spread over (default 1: all identical)",
    )
    d.add_argument(
        "--delay",
        type=_delay,
        default=0.05,
        help="seconds the embedded server takes per request (default 0.05)",
    )
    d.add_argument(
        "--url",
        type=_url,
        default=None,
        help=(
            "target this server instead of the embedded one (checked with one GET first; "
            "then upstream calls = requests the clients sent)"
        ),
    )
    d.add_argument(
        "--stale",
        action="store_true",
        help="add a stale-while-revalidate row (needs transports that accept stale_ttl=)",
    )
    d.add_argument("--json", action="store_true", help="print machine-readable results only")
    d.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="write a chart of upstream calls and per-caller latency (needs matplotlib)",
    )
    return p


def _check_plot_path(path: str) -> str | None:
    """An error for a --plot path we cannot write, checked before any burst runs."""
    target = Path(path)
    if target.is_dir():
        return f"--plot {path}: is a directory; give a file name such as demo.png"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"--plot {path}: directory {parent} does not exist"
    if target.exists() and not os.access(target, os.W_OK):
        return f"--plot {path}: not writable"
    if not target.exists() and not os.access(parent, os.W_OK):
        return f"--plot {path}: cannot create a file in {parent}"
    return None


def _check_url(url: str) -> str | None:
    """An error for a --url that does not answer, checked with one GET before the bursts."""
    import httpx

    try:
        httpx.get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        return f"--url {url} is not reachable: {_one_line(exc)}"
    return None


def preflight(args: argparse.Namespace) -> tuple[int, str] | None:
    """Everything that can be known before the run: (exit status, one-line message) or None."""
    try:
        import aiohttp  # noqa: F401
        import httpx  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        return 2, f'the demo needs {exc.name}: pip install "singleflight-http[demo]"'
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return 2, '--plot needs matplotlib: pip install "singleflight-http[plot]"'
        problem = _check_plot_path(args.plot)
        if problem:
            return 2, problem
    if args.stale and not _stale_supported():
        return 2, (
            "--stale needs stale_ttl support in AsyncSingleflightTransport, which this version "
            "does not have yet; run without --stale"
        )
    if args.url is not None:
        problem = _check_url(args.url)
        if problem:
            return 1, problem
    return None


def _one_line(exc: BaseException, width: int = 72) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 1] + "…"


def _stale_supported() -> bool:
    from .httpx import AsyncSingleflightTransport

    return "stale_ttl" in inspect.signature(AsyncSingleflightTransport).parameters
