#!/usr/bin/env bash
# The one test command (README "Quick start"; .ci/run calls exactly this):
#
#   bash scripts/test.sh [pytest arguments]
#
# 1. Checks the system programs the suite drives (redis-server, nginx, haproxy, python3's venv
#    module, chromium, node and npm) and installs the missing ones with apt-get when it can
#    (root on Debian); otherwise it prints the exact command to run and exits 1. Then installs
#    the Node packages of clients/js, tests/browser and bench/node (npm ci, from their
#    package-lock.json, where there is one): the JS client's tests, the demo page's browser
#    tests (Debian's chromium, driven by playwright-core; no browser is downloaded) and the
#    bench's Node peer stacks (its smoke tests).
# 2. Creates a fresh virtual environment (python3 -m venv --clear; $HUB_TEST_VENV, default
#    .venv-test in the repository), so that nothing this machine already has can hide a missing
#    dependency.
# 3. Installs the project with its test extra into it, lints (ruff, mypy --strict on hub/) and
#    runs the whole suite there: python -m pip install -e '.[test]' && python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

# -- 1. system programs --------------------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
venv_probe=$(mktemp -d)
if ! python3 -m venv "$venv_probe/v" >/dev/null 2>&1; then
  # Debian's python3 ships venv without ensurepip: the python3-venv package brings it.
  pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  need_apt+=("python${pyver}-venv")
fi
rm -rf "$venv_probe"
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
    # Debian starts the packaged services; the tests start their own on free ports and must
    # not depend on these (no systemd in containers: ignore failures).
    for svc in nginx haproxy redis-server; do
      service "$svc" stop >/dev/null 2>&1 || true
    done
  else
    say "missing system packages; install them first, then run this again:"
    say "  sudo apt-get install -y ${need_apt[*]}"
    exit 1
  fi
fi

# The Node packages the suite runs (the JS client's tests, the browser tests' driver), exactly
# as their lock files say. Both need Node.js 20 or newer (playwright-core's engines).
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  say "node $(node --version) is too old: the JS client and the browser tests need Node.js 20 or"
  say "newer (Debian 13's nodejs package has it); install it, then run this again"
  exit 1
fi
for dir in clients/js tests/browser bench/node; do
  if [ -f "$dir/package-lock.json" ]; then
    say "npm ci in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done

# Tests open a few thousand sockets (the nginx capacity test among them).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# -- 2. a fresh virtual environment --------------------------------------------------------
venv=${HUB_TEST_VENV:-.venv-test}
say "creating a fresh virtual environment in $venv"
python3 -m venv --clear "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"

# -- 3. the project's test extra, then the whole suite -------------------------------------
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
say "lint: ruff (the rule set in pyproject.toml) and mypy --strict on hub/"
python -m ruff check hub tests bench examples
python -m mypy
say "running the suite with $(python --version) in $venv"
python -m pytest "$@"
