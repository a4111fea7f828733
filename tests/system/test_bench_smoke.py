"""Smoke test of ``python -m bench``: it runs end to end and loses nothing at tiny sizes.

Only correctness is asserted (exit code, results.json, lost == 0); timings are figures the
benchmark prints, never assertions. The benchmark starts its own redis-server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

REPO = str(ROOT)


def _run_bench(out, *flags: str) -> dict:
    """Run ``python -m bench`` on ceiling (and hub when importable), 20 clients, 20 messages;
    assert it exited 0 and return results.json."""
    stacks = ["ceiling"] + (["hub"] if _hub_importable() else [])
    cmd = [sys.executable, "-m", "bench", *flags, "--stacks", ",".join(stacks), "--clients",
           "20", "--messages", "20", "--duration-limit", "15", "--drain", "10", "--out",
           str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=140,
                          check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((out / "results.json").read_text())
    assert body["meta"]["errors"] == []
    assert sorted({r["stack"] for r in body["runs"]}) == sorted(stacks)
    return body


def _hub_importable() -> bool:
    try:
        return importlib.util.find_spec("hub.server") is not None
    except ImportError:
        return False


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("redis-server") is None and not os.path.exists(
    "/usr/bin/redis-server"), reason="needs the redis-server binary")
def test_bench_runs_and_loses_nothing(tmp_path) -> None:
    out = tmp_path / "results"
    body = _run_bench(out, "--rates", "50,max")
    runs = body["runs"]
    stacks = {r["stack"] for r in runs}
    assert len(runs) == 2 * len(stacks)
    for run in runs:
        assert run["connected"] == 20, run
        assert run["published"] == 20, run
        assert run["expected"] == 20 * 20, run
        assert run["lost"] == 0, run
    assert (out / "latency.png").exists()
    assert (out / "throughput.png").exists()


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("redis-server") is None and not os.path.exists(
    "/usr/bin/redis-server"), reason="needs the redis-server binary")
def test_bench_burst_mode_pauses_clients_and_loses_nothing(tmp_path) -> None:
    """--burst: the load generator is stopped while the servers write, then reads it all."""
    out = tmp_path / "results"
    body = _run_bench(out, "--burst", "--rates", "max")
    assert body["meta"]["burst"] is True
    for run in body["runs"]:
        assert run["lost"] == 0, run
        assert run["burst_fanout_s"] is not None and run["burst_fanout_s"] > 0, run
        assert run["p99_ms"] is None, run  # no latency in burst mode (NaN -> null)
    assert (out / "throughput.png").exists()
    assert not (out / "latency.png").exists()
