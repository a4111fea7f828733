"""The JavaScript client (clients/js/hub.js) against real hub processes: runs its Node tests
(``node --test clients/js/test/``), which spawn ``python -m hub serve`` themselves with this
interpreter and the redis-server of the ``redis_server`` fixture (docs/clients.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

JS = ROOT / "clients" / "js"
TIMEOUT = 300  # seconds for the whole node run
INSTALL_HINT = ("node 20+ and npm are needed for the JS client's tests: "
                "apt-get install nodejs npm (or https://nodejs.org/en/download)")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed. {INSTALL_HINT}")
    return path


def test_js_client(redis_server) -> None:
    node = _tool("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    major = int(version.lstrip("v").split(".")[0] or 0)
    assert major >= 20, f"node {version} is too old. {INSTALL_HINT}"
    if not (JS / "node_modules" / "ws").is_dir():
        npm = _tool("npm")
        install = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS,
                                 capture_output=True, text=True, timeout=TIMEOUT)
        assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(HUB_PYTHON=sys.executable, HUB_TEST_REDIS_URL=redis_server.url,
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    # --test-concurrency=1: one test file at a time (each starts its own hubs; 2 shared cores)
    files = sorted(str(p) for p in (JS / "test").glob("*.test.mjs"))
    assert files, "no clients/js/test/*.test.mjs"
    cmd = [node, "--test", "--test-concurrency=1", "--test-reporter=spec", *files]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"node --test did not finish within {TIMEOUT} s:\n{out or ''}")
    assert run.returncode == 0, f"node --test failed (rc {run.returncode}):\n{run.stdout}\n" \
                                f"{run.stderr}"
