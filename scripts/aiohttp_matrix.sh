#!/usr/bin/env bash
# Run tests/aiohttp against every aiohttp minor version we support (3.12, 3.13, 3.14).
#
# singleflight.aiohttp touches a few private ClientResponse attributes (see _respond() in
# singleflight/aiohttp.py), so an aiohttp upgrade that breaks it must fail here, not for users.
#
# One venv per version under $SF_VENVS (default .venvs/, gitignored). A venv is rebuilt only
# when this script, pyproject.toml or the pinned versions change (a stamp file records them),
# so re-runs cost only the test time. The package is installed editable, so code changes need
# no reinstall.
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

# Test dependencies of tests/aiohttp (the package brings cachetools; testing.py uses anyio).
TEST_DEPS=(hatchling editables "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3" "anyio>=4")

pip_install() {
    # pip's -q still prints one warning per package for an unreachable extra index; drop those.
    local out rc=0
    out=$("$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1) || rc=$?
    grep -v "^WARNING: Location .* is ignored" <<<"$out" || true
    return "$rc"
}

mkdir -p "$VENVS"
failed=()
for spec in "${versions[@]}"; do
    name="aiohttp-${spec//[^0-9.]/}"
    name=${name%.}
    venv="$VENVS/$name"
    stamp_want=$(cat "$0" pyproject.toml <(echo "$spec ${TEST_DEPS[*]}") | sha256sum | cut -c1-16)
    if [[ ! -x $venv/bin/python || $(cat "$venv/.stamp" 2>/dev/null) != "$stamp_want" ]]; then
        echo "== building $venv (aiohttp==$spec)"
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        pip_install "aiohttp==$spec" "${TEST_DEPS[@]}"
        # --no-build-isolation: hatchling is already in the venv, so no throwaway build env;
        # the package's own dependencies come from pyproject.toml ([aiohttp] pins nothing tighter).
        pip_install --no-build-isolation -e "$ROOT"
        echo "$stamp_want" >"$venv/.stamp"
    fi
    version=$("$venv/bin/python" -c "import aiohttp; print(aiohttp.__version__)")
    echo "== aiohttp $version"
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
