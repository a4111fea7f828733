"""Smoke tests of ``python -m bench.history`` and ``python -m bench.storm`` at tiny sizes, and
of the probes ``python -m bench.lua_floor`` and ``python -m bench.keepalive_probe``.

Only completion and correctness are asserted (exit code, nothing lost, no duplicate, no hole,
every client recovered); the figures are the benchmarks' output, never assertions. Each bench
starts its own redis-server and hub processes and stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

REPO = str(ROOT)

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"),
    reason="needs the redis-server binary")


def _run(module: str, *flags: str, timeout: float = 140) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.timeout(150)
@needs_redis
def test_bench_history_runs_and_loses_nothing(tmp_path) -> None:
    out = tmp_path / "history"
    done = _run("bench.history", "--layouts", "1x20,4x5", "--rates", "200,max", "--messages",
                "30", "--repeat", "1", "--idle", "0.5", "--drain", "15", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((out / "history.json").read_text())
    assert body["meta"]["errors"] == []
    runs = body["runs"]
    assert len(runs) == 2 * 2 * 2  # layouts x rates x (plain, history)
    assert {r["mode"] for r in runs} == {"plain", "history"}
    for run in runs:
        assert run["published"] == 30, run
        assert run["expected"] == 30 * int(run["layout"].split("x")[1]), run
        assert run["lost"] == 0, run
        assert run["publish_errors"] == 0, run
        check = run["offset_check"]
        assert check["dups"] == check["holes"] == check["missing"] == 0, check
        assert check["errors"] == check["failed"] == 0, check
        assert "fcall" in run["commandstats"] if run["mode"] == "history" else True
    assert "Redis CPU history/plain" in (out / "history.md").read_text()


@pytest.mark.timeout(150)
@needs_redis
def test_bench_storm_recovers_every_client_once(tmp_path) -> None:
    out = tmp_path / "storm"
    done = _run("bench.storm", "--clients", "20", "--channels", "4", "--rate", "30",
                "--warm", "1", "--after", "1", "--timeout", "60", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((out / "storm.json").read_text())
    assert body["meta"]["errors"] == []
    result = body["result"]
    assert result["ok"] is True, result
    assert result["recovered_all"] is True
    checks = result["checks"]
    assert checks["recovered"] >= 20 and checks["recovery_failed"] == 0, checks
    assert checks["duplicates"] == checks["holes"] == checks["missing"] == 0, checks
    assert checks["behind_at_end"] == checks["wrong_epoch_at_end"] == 0, checks
    assert checks["open_at_end"] == 20, checks
    assert result["codes"].get("1001") == 20  # every client saw the graceful stop
    assert result["published"] > 0 and result["publish_errors"] == 0


@pytest.mark.timeout(120)
@needs_redis
@pytest.mark.skipif(shutil.which("redis-benchmark") is None
                    and not os.path.exists("/usr/bin/redis-benchmark"),
                    reason="needs the redis-benchmark binary")
def test_bench_lua_floor_runs_every_command(tmp_path) -> None:
    out = tmp_path / "floor"
    done = _run("bench.lua_floor", "--requests", "300", "--repeat", "1", "--batch", "3",
                "--out", str(out), timeout=100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((out / "lua_floor.json").read_text())
    names = [row["command"] for row in body["table"]]
    assert names == ["publish", "fcall-empty", "fcall-pub", "fcall-min", "fcall-min~",
                     "hub_publish", "fcall-batch"]
    for row in body["table"]:
        assert row["calls"] == 300, row
        # every command ran inside Redis as many times as asked (the functions' own calls too)
        top = "publish" if row["command"] == "publish" else "fcall"
        assert row["inside"][top]["calls"] == 300, row
    batch = body["table"][-1]
    assert batch["messages"] == 900 and batch["inside"]["xadd"]["calls"] == 900
    assert "| hub_publish |" in done.stdout


@pytest.mark.timeout(120)
@needs_redis
def test_bench_keepalive_probe_runs(tmp_path) -> None:
    done = _run("bench.keepalive_probe", "--clients", "30", "--window", "1", "--settle", "1",
                "--micro", "200", timeout=100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "30 connections open" in done.stdout
    assert "pongs on the fast path" in done.stdout
