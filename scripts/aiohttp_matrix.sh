#!/usr/bin/env bash
# Run tests/aiohttp against every aiohttp minor version we support (3.12, 3.13, 3.14).
#
# singleflight.aiohttp sets a few private ClientResponse attributes and reads a request's timeouts
# from ClientSession._request (singleflight/_aiohttp.py), so an aiohttp upgrade that breaks them
# must fail here, not for users.
#
# One venv per version under $SF_VENVS (default .venvs/, gitignored), built in parallel. A venv
# is rebuilt only when this script, the package's dependencies or the version spec change (a
# stamp file records them); the editable install is redone only when the checkout moved. So
# re-runs cost only the test time, and code changes need no reinstall.
#
# Usage: scripts/aiohttp_matrix.sh [version-spec ...] [-- pytest args]
#   scripts/aiohttp_matrix.sh                  # 3.12.*, 3.13.*, 3.14.*
#   scripts/aiohttp_matrix.sh 3.14.* -- -x -q
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENVS=${SF_VENVS:-$ROOT/.venvs}
PYTHON=${PYTHON:-python3}

versions=()
while [[ $# -gt 0 && $1 != "--" ]]; do versions+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
[[ ${#versions[@]} -eq 0 ]] && versions=("3.12.*" "3.13.*" "3.14.*")

# Test dependencies of tests/aiohttp (the package brings cachetools; testing.py uses anyio);
# hatchling + editables make the editable install work without a throwaway build env.
TEST_DEPS=(hatchling editables "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3" "anyio>=4" "trustme>=1.1")

venv_of() {
    local name="aiohttp-${1//[^0-9.]/}"
    echo "$VENVS/${name%.}"
}

pip_install() {
    # pip's -q still prints one warning per package for an unreachable extra index; drop those.
    local venv=$1 out rc=0
    shift
    out=$("$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1) || rc=$?
    grep -v "^WARNING: Location .* is ignored" <<<"$out" || true
    return "$rc"
}

build() {
    local spec=$1 venv stamp
    venv=$(venv_of "$spec")
    stamp=$(cat "$0" <(grep -E '^(dependencies|aiohttp) *=' pyproject.toml) <(echo "$spec") |
        sha256sum | cut -c1-16)
    if [[ ! -x $venv/bin/python || $(cat "$venv/.stamp" 2>/dev/null) != "$stamp" ]]; then
        echo "== building $venv (aiohttp==$spec)"
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        pip_install "$venv" "aiohttp==$spec" "${TEST_DEPS[@]}"
        echo "$stamp" >"$venv/.stamp"
    fi
    if [[ $(cat "$venv/.root" 2>/dev/null) != "$ROOT" ]]; then
        pip_install "$venv" --no-build-isolation -e "$ROOT"
        echo "$ROOT" >"$venv/.root"
    fi
}

mkdir -p "$VENVS"
pids=()
for spec in "${versions[@]}"; do
    build "$spec" >"$(venv_of "$spec").log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    log="$(venv_of "${versions[$i]}").log"
    if ! wait "${pids[$i]}"; then
        cat "$log"
        echo "aiohttp matrix: could not build the venv for aiohttp==${versions[$i]}"
        exit 1
    fi
    cat "$log"
done

failed=()
for spec in "${versions[@]}"; do
    venv=$(venv_of "$spec")
    version=$("$venv/bin/python" -c "import aiohttp; print(aiohttp.__version__)")
    echo "== aiohttp $version"
    # --confcutdir: only tests/aiohttp's own conftest, whatever the rest of tests/ imports.
    if ! "$venv/bin/python" -m pytest tests/aiohttp -p no:cacheprovider \
            --confcutdir=tests/aiohttp "$@"; then
        failed+=("$version")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "aiohttp matrix FAILED on: ${failed[*]}"
    exit 1
fi
echo "aiohttp matrix passed on: ${versions[*]}"
