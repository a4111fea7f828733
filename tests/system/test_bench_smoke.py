"""Smoke test of ``python -m bench``: it runs end to end and loses nothing at tiny sizes.

Only correctness is asserted (exit code, results.json, lost == 0); timings are figures the
benchmark prints, never assertions. The benchmark starts its own redis-server.

The peer stacks (node-ws, node-socketio, channels, channels-pubsub) run when their runtime is
installed here and are skipped with the reason otherwise: `npm ci --prefix bench/node` for the
Node ones, the `bench` extra (Django, channels, channels-redis, uvicorn) for Channels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.stacks import STACKS
from tests.helpers import ROOT

REPO = str(ROOT)


def _run_bench(out, *flags: str, stacks: list[str] | None = None) -> dict:
    """Run ``python -m bench`` on ``stacks`` (default ceiling, and hub when importable), 20
    clients, 20 messages; assert it exited 0 and return results.json."""
    stacks = stacks or ["ceiling"] + (["hub"] if _hub_importable() else [])
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


NEEDS_REDIS = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"),
    reason="needs the redis-server binary")
PEERS = ["node-ws", "node-socketio", "channels", "channels-pubsub"]


def _hub_importable() -> bool:
    try:
        return importlib.util.find_spec("hub.server") is not None
    except ImportError:
        return False


@pytest.mark.timeout(150)
@NEEDS_REDIS
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
@NEEDS_REDIS
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


@pytest.mark.timeout(150)
@NEEDS_REDIS
@pytest.mark.parametrize("stack", PEERS)
def test_bench_peer_stack_runs_and_loses_nothing(tmp_path, stack: str) -> None:
    """Each peer stack, when its runtime is installed: 20 clients, 20 messages, rates 50 and
    max, every delivery arrives."""
    why = STACKS[stack].missing()
    if why:
        pytest.skip(f"{stack}: {why}")
    out = tmp_path / "results"
    body = _run_bench(out, "--rates", "50,max", stacks=[stack])
    assert body["meta"]["skipped"] == {}
    assert len(body["runs"]) == 2
    for run in body["runs"]:
        assert run["connected"] == 20, run
        assert run["published"] == 20, run
        assert run["lost"] == 0, run


def test_bench_skips_a_stack_whose_runtime_is_missing(tmp_path) -> None:
    """A stack whose runtime is missing is skipped with a note, never a crash (exit 2 when
    nothing is left to run)."""
    env = dict(os.environ, PYTHONPATH=REPO, PATH="/nonexistent")  # no node on the PATH
    done = subprocess.run([sys.executable, "-m", "bench", "--stacks", "node-ws",
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "skipping node-ws: node is not on the PATH" in done.stderr


@pytest.mark.timeout(60)
def test_socketio_emitter_wire_format_is_the_node_emitters(redis_server) -> None:
    """The Python publisher's node-socketio messages are byte for byte what
    ``@socket.io/redis-emitter`` publishes for ``emitter.to("bench").emit("msg", data)``."""
    why = STACKS["node-socketio"].missing()
    if why:
        pytest.skip(why)
    import redis

    from bench.publisher import SOCKETIO_EMITTER_CHANNEL, socketio_emitter_message

    data = {"r": 3, "s": 250, "t": 1764771234.123456, "p": "x" * 60}
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("socket.io#*")
    try:
        pubsub.get_message(timeout=1)  # reads the psubscribe confirmation
        subprocess.run(["node", os.path.join(REPO, "bench", "node", "emit_once.js"),
                        "--redis-url", redis_server.url, "--payload", json.dumps(data)],
                       check=True, timeout=30, capture_output=True)
        got = None
        for _ in range(50):
            got = pubsub.get_message(timeout=0.2)
            if got is not None:
                break
        assert got is not None, "the Node emitter published nothing"
        assert got["channel"].decode() == SOCKETIO_EMITTER_CHANNEL
        assert got["data"] == socketio_emitter_message(data)
    finally:
        pubsub.close()
        client.close()
