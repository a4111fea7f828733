"""Smoke test of ``python -m bench.scale``: at a tiny size it completes every phase (connect,
memory, idle keepalive, broadcasts, personal pushes, the restart storm, the broadcast after
it) and every message reaches every connection.

Only completion and delivery are asserted; the figures are the benchmark's to print
(docs/benchmarks.md, "100,000 connections"). The mode starts its own redis-server and hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.timeout(170)
@pytest.mark.skipif(shutil.which("redis-server") is None and not os.path.exists(
    "/usr/bin/redis-server"), reason="needs the redis-server binary")
def test_bench_scale_smoke_delivers_everything(tmp_path) -> None:
    out = tmp_path / "scale"
    cmd = [sys.executable, "-m", "bench.scale", "--smoke", "--clients", "30", "--out", str(out)]
    done = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=160,
                          check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((out / "scale.json").read_text())
    assert body["error"] is None
    for phase in ("connect", "storm"):
        assert body[phase]["connected"] == 30 and body[phase]["failed"] == 0, body[phase]
    memory = body["memory"]
    assert sum(w["connections"] for w in memory["workers"]) == 30
    assert len(memory["workers"]) == 2
    assert body["idle"]["open"] == 30
    for message in [*body["broadcast"], *body["broadcast_after_storm"]]:
        assert message["open"] == 30 and message["received"] == 30, message
        assert message["lost"] == 0
    pushes = body["pushes"]
    assert pushes["published"] == 30 and pushes["received"] == 30 and pushes["wrong"] == 0
