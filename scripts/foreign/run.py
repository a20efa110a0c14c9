"""Run httpx's and aiohttp's own test suites with singleflight wrapped into every client (CI)."""

# Usage (from the repository root; .ci/run calls it after scripts/test):
#   python3 scripts/foreign/run.py                      # both suites, modes default, ttl, follower
#   python3 scripts/foreign/run.py --suite httpx --mode follower -- -x -k redirect
#   python3 scripts/foreign/run.py --mode plain          # the suites' own baseline, unwrapped
#
# What it does (issue 12, section 4):
# 1. Reads the httpx and aiohttp versions installed in the project's venv (.venv, as CI builds it).
# 2. Builds .venvs/foreign: those exact versions, the suites' test requirements
#    (scripts/foreign/requirements.txt) and this checkout (editable). Rebuilt only when the
#    versions or the requirements change.
# 3. Downloads each version's sdist from PyPI (it ships the tests; cached in
#    .venvs/foreign-sdists), unpacks only its tests and pytest config, and runs them with the
#    plugins of this folder: every httpx.Client/AsyncClient transport and mount, and every
#    aiohttp.ClientSession, goes through singleflight. SF_FOREIGN_MODE picks default, ttl=30 or
#    follower (each request of the suite is served as a follower of an identical decoy).
#    aiohttp's ttl and follower runs keep to the tests that made a ClientSession in the
#    default run: no other test can differ.
# 4. Compares the outcomes with scripts/foreign/expected.txt: a failure not listed there fails
#    this script; a listed difference that now passes is printed under FIXED (remove it).
# The suites talk only to their own loopback servers; tests that need the internet are
# deselected (listed in expected.txt with the reason).

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("Entry", "compare", "main", "parse_expected")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODES = ("default", "ttl", "follower")
SUITES = ("httpx", "aiohttp")
PER_TEST_TIMEOUT = 10  # pytest-timeout: a hang fails that test, fast
PER_RUN_TIMEOUT = 600  # one suite in one mode; the whole job stays well under CI's limit

# What each suite runs, relative to its unpacked sdist, and its own pytest options.
SUITE_ARGS = {
    "httpx": ["tests", "-m", "not network"],
    "aiohttp": [
        # aiohttp's pytest.ini adds xdist, coverage and doctests: not wanted here.
        "-o",
        "addopts=",
        "-m",
        "not dev_mode and not autobahn and not internal",
        "-p",
        "no:pytest_codspeed",
    ],
}
AIOHTTP_FILES = "tests/test_client_*.py"
EXTRAS = {"httpx": "httpx[brotli,cli,http2,socks,zstd]", "aiohttp": "aiohttp"}
KEPT = {"httpx": ("tests", "pyproject.toml"), "aiohttp": ("tests", "pytest.ini")}


# ---------------------------------------------------------------------------------------------
# The expected-difference list


@dataclass
class Entry:
    """One line of expected.txt: tests (a pattern, ``*`` matches anything) of a suite in modes."""

    suite: str
    modes: tuple[str, ...]  # () for "deselect": never run
    pattern: str
    reason: str
    cause: str
    line: int
    regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.regex = re.compile(".*".join(re.escape(part) for part in self.pattern.split("*")))

    def matches(self, nodeid: str) -> bool:
        return self.regex.fullmatch(nodeid) is not None


def parse_expected(text: str) -> list[Entry]:
    """Parse expected.txt: ``## cause`` headings, then ``SUITE MODES PATTERN -- reason`` lines."""
    entries: list[Entry] = []
    cause = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("## "):
            cause = line[3:].strip()
            continue
        if not line or line.startswith("#"):
            continue
        head, sep, reason = line.partition(" -- ")
        parts = head.split()
        if not sep or not reason.strip() or len(parts) != 3:
            raise ValueError(f"expected.txt:{number}: want 'SUITE MODES PATTERN -- reason': {raw}")
        suite, modes, pattern = parts
        if suite not in SUITES:
            raise ValueError(f"expected.txt:{number}: suite {suite!r} is not one of {SUITES}")
        if modes == "deselect":
            chosen: tuple[str, ...] = ()
        elif modes == "*":
            chosen = MODES
        else:
            chosen = tuple(modes.split(","))
            unknown = set(chosen) - set(MODES)
            if unknown:
                raise ValueError(f"expected.txt:{number}: unknown modes {sorted(unknown)}")
        entries.append(Entry(suite, chosen, pattern, reason.strip(), cause, number))
    return entries


@dataclass
class Verdict:
    """How one suite's run in one mode compares with the expected list."""

    suite: str
    mode: str
    run: int = 0
    passed: int = 0
    skipped: int = 0
    expected: int = 0  # failures the list expects
    unexpected: list[tuple[str, str]] = field(default_factory=list)  # (nodeid, message)
    fixed: list[Entry] = field(default_factory=list)  # listed, but every match passed
    flaky: list[tuple[str, str]] = field(default_factory=list)  # failed, then passed alone
    stats: dict[str, object] = field(default_factory=dict)


def compare(suite: str, mode: str, outcomes: dict[str, list[str]], entries: list[Entry]) -> Verdict:
    """Sort one run's outcomes into passed, expected differences, unexpected failures, fixed."""
    verdict = Verdict(suite, mode)
    mine = [e for e in entries if e.suite == suite and mode in e.modes]
    failing: set[int] = set()
    seen: set[int] = set()
    for nodeid, (outcome, message) in sorted(outcomes.items()):
        if outcome in ("skipped", "xfailed"):
            verdict.skipped += 1
            continue
        verdict.run += 1
        hits = [e for e in mine if e.matches(nodeid)]
        seen.update(e.line for e in hits)
        if outcome == "passed":
            verdict.passed += 1
        elif hits:
            verdict.expected += 1
            failing.update(e.line for e in hits)
        else:
            verdict.unexpected.append((nodeid, message))
    # An entry whose tests all ran and passed is fixed; one that matched nothing is reported too
    # (renamed test, or not run in this mode's selection): both mean the list should shrink.
    verdict.fixed = [e for e in mine if e.line not in failing and e.line in seen]
    return verdict


# ---------------------------------------------------------------------------------------------
# Building the environment and running the suites


def _sh(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def _pip(python: Path, *args: str) -> None:
    """pip install, quietly; its warnings about an unreachable extra index are dropped."""
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        text=True,
        capture_output=True,
    )
    noise = re.compile(r"^WARNING: Location .* is ignored")
    for line in (done.stdout + done.stderr).splitlines():
        if not noise.match(line):
            print(line)
    if done.returncode:
        raise SystemExit(f"foreign: pip install {' '.join(args)} failed")


def installed_versions(main_python: str) -> dict[str, str]:
    code = "import httpx, aiohttp; print(httpx.__version__, aiohttp.__version__)"
    out = _sh([main_python, "-c", code], capture_output=True).stdout.split()
    return {"httpx": out[0], "aiohttp": out[1]}


def build_venv(venv: Path, versions: dict[str, str], python: str) -> Path:
    """The suites' venv: the installed versions, their test requirements, this checkout."""
    requirements = HERE / "requirements.txt"
    pins = [f"{EXTRAS[name]}=={version}" for name, version in sorted(versions.items())]
    stamp_text = requirements.read_text() + " ".join(pins)
    stamp = hashlib.sha256(stamp_text.encode()).hexdigest()[:16]
    py = venv / "bin" / "python"
    stamp_file = venv / ".stamp"
    if not py.exists() or not stamp_file.exists() or stamp_file.read_text() != stamp:
        print(f"== building {venv} ({' '.join(pins)})", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        _sh([python, "-m", "venv", str(venv)])
        _pip(py, *pins, "-r", str(requirements))
        stamp_file.write_text(stamp)
    root_file = venv / ".root"
    if not root_file.exists() or root_file.read_text() != str(ROOT):
        _pip(py, "--no-build-isolation", "-e", str(ROOT))
        (venv / ".root").write_text(str(ROOT))
    return py


def fetch_tests(py: Path, name: str, version: str, cache: Path, into: Path) -> Path:
    """Download ``name==version``'s sdist (cached) and unpack its tests and pytest config."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    if not found:
        print(f"== downloading the sdist of {name}=={version}", flush=True)
        cmd = [str(py), "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        cmd += ["--no-deps", "--no-binary", ":all:", f"{name}=={version}", "-d", str(cache)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
        if not found:
            raise SystemExit(f"foreign: no sdist {name}-{version}.tar.gz was downloaded")
    target = into / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    prefix = f"{name}-{version}/"
    with tarfile.open(found[0]) as archive:
        members = []
        for member in archive.getmembers():
            rel = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if rel and any(rel == k or rel.startswith(k + "/") for k in KEPT[name]):
                member.name = rel
                members.append(member)
        archive.extractall(target, members=members, filter="data")
    return target


def run_suite(
    py: Path,
    name: str,
    mode: str,
    where: Path,
    out: Path,
    entries: list[Entry],
    only: list[str] | None,
    extra: list[str],
) -> dict[str, object]:
    """One suite in one mode; returns the results plugin's report."""
    args = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(where)]
    args += ["-p", "sf_foreign_results", "-p", f"sf_foreign_{name}"]
    args += [f"--timeout={PER_TEST_TIMEOUT}", *SUITE_ARGS[name]]
    for entry in entries:
        if entry.suite == name and not entry.modes:
            args += ["--deselect", entry.pattern]
    if only is not None:
        listing = out.with_suffix(".args")
        listing.write_text("\n".join(only) + "\n")
        args.append(f"@{listing}")
    elif name == "aiohttp":
        args += sorted(str(p.relative_to(where)) for p in where.glob(AIOHTTP_FILES))
    args += extra
    env = dict(os.environ)
    env.update(
        SF_FOREIGN_MODE=mode,
        SF_FOREIGN_OUT=str(out),
        PYTHONPATH=str(HERE),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("PYTHONSAFEPATH", None)
    log = out.with_suffix(".log")
    started = time.monotonic()
    with log.open("w") as sink:
        try:
            code = subprocess.run(
                args,
                cwd=where,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=PER_RUN_TIMEOUT,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    took = time.monotonic() - started
    lines = log.read_text(errors="replace").splitlines()
    tail = lines[-1] if lines else ""
    print(f"   {name} [{mode}] pytest exit {code} in {took:.0f}s: {tail}", flush=True)
    if code not in (0, 1) or not out.exists():
        print("\n".join(lines[-60:]))
        raise SystemExit(f"foreign: {name} [{mode}] did not complete (exit {code}); log: {log}")
    report: dict[str, object] = json.loads(out.read_text())
    return report


def print_table(verdicts: list[Verdict]) -> None:
    head = ("suite", "mode", "run", "passed", "expected diff", "unexpected", "fixed", "flaky")
    head += ("skipped",)
    rows = [head] + [
        (
            v.suite,
            v.mode,
            str(v.run),
            str(v.passed),
            str(v.expected),
            str(len(v.unexpected)),
            str(len(v.fixed)),
            str(len(v.flaky)),
            str(v.skipped),
        )
        for v in verdicts
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", action="append", choices=SUITES)
    parser.add_argument("--mode", action="append", choices=(*MODES, "plain"))
    parser.add_argument("--python", default=os.environ.get("PYTHON", "python3"))
    parser.add_argument("--main-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--venv", default=os.environ.get("SF_VENVS", str(ROOT / ".venvs")))
    parser.add_argument("--keep", help="write logs and reports here (default: a temp dir)")
    parser.add_argument(
        "--from", dest="from_dir", help="compare the reports a --keep run left there; run nothing"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest run")
    opts = parser.parse_args(argv)
    suites = opts.suite or list(SUITES)
    modes = opts.mode or list(MODES)
    entries = parse_expected((HERE / "expected.txt").read_text())

    if opts.from_dir:
        verdicts = []
        for name in suites:
            for mode in modes:
                path = Path(opts.from_dir) / f"{name}-{mode}.json"
                if path.exists():
                    verdicts.append(_verdict(name, mode, json.loads(path.read_text()), entries))
        return summarize(verdicts, entries)

    versions = installed_versions(opts.main_python)
    venv = Path(opts.venv) / "foreign"
    py = build_venv(venv, versions, opts.python)
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="sf-foreign-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"== foreign suites: httpx {versions['httpx']}, aiohttp {versions['aiohttp']}; "
        f"logs in {work}",
        flush=True,
    )

    verdicts: list[Verdict] = []
    for name in suites:
        sdists = Path(opts.venv) / "foreign-sdists"
        where = fetch_tests(py, name, versions[name], sdists, work / "src")
        touched: list[str] | None = None
        for mode in modes:
            only = touched if name == "aiohttp" and mode in ("ttl", "follower") else None
            if only is not None and not only:
                continue
            report = run_suite(
                py,
                name,
                mode,
                where,
                work / f"{name}-{mode}.json",
                entries,
                only,
                opts.pytest_args,
            )
            if mode == "default":
                touched = list(report["touched"])  # type: ignore[call-overload]
            verdict = _verdict(name, mode, report, entries)
            if verdict.unexpected and mode != "plain":
                # Once more, alone: a failure that passes then is flaky (timing on a loaded
                # machine), printed as such; one that fails again fails CI.
                again = run_suite(
                    py,
                    name,
                    mode,
                    where,
                    work / f"{name}-{mode}-again.json",
                    entries,
                    [nodeid for nodeid, _ in verdict.unexpected],
                    opts.pytest_args,
                )
                outcomes: dict[str, list[str]] = again["outcomes"]  # type: ignore[assignment]
                for nodeid, message in list(verdict.unexpected):
                    if outcomes.get(nodeid, [""])[0] == "passed":
                        verdict.unexpected.remove((nodeid, message))
                        verdict.flaky.append((nodeid, message))
            verdicts.append(verdict)
    return summarize(verdicts, entries)


def _verdict(name: str, mode: str, report: dict[str, object], entries: list[Entry]) -> Verdict:
    outcomes: dict[str, list[str]] = report["outcomes"]  # type: ignore[assignment]
    if mode == "plain":
        verdict = compare(name, "default", outcomes, [])
        verdict.mode = "plain"
    else:
        verdict = compare(name, mode, outcomes, entries)
    verdict.stats = report["stats"]  # type: ignore[assignment]
    return verdict


def summarize(verdicts: list[Verdict], entries: list[Entry]) -> int:
    """Print the counts, the unexpected failures and the fixed entries; 1 if any unexpected."""
    print("\n== foreign suites: counts per suite and mode")
    print_table(verdicts)
    for verdict in verdicts:
        if verdict.stats:
            print(f"  {verdict.suite} [{verdict.mode}] singleflight: {json.dumps(verdict.stats)}")
    failed = False
    for verdict in verdicts:
        for nodeid, message in verdict.unexpected:
            failed = True
            print(f"UNEXPECTED {verdict.suite} [{verdict.mode}] {nodeid}: {message}")
    for verdict in verdicts:
        for nodeid, message in verdict.flaky:
            print(
                f"FLAKY {verdict.suite} [{verdict.mode}] {nodeid}: failed, then passed alone: "
                f"{message}"
            )
    for verdict in verdicts:
        for entry in verdict.fixed:
            print(
                f"FIXED {verdict.suite} [{verdict.mode}] expected.txt:{entry.line} "
                f"{entry.pattern} now passes ({entry.cause}): remove it from the list"
            )
    listed = sum(1 for e in entries if e.modes)
    print(
        f"== expected.txt: {listed} expected differences, "
        f"{sum(1 for e in entries if not e.modes)} deselected"
    )
    passed = sum(v.passed for v in verdicts)
    expected = sum(v.expected for v in verdicts)
    unexpected = sum(len(v.unexpected) for v in verdicts)
    print(f"foreign: {expected} listed differences failed as expected; unexpected failures below")
    print(f"foreign: {passed} passed, {unexpected} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
