"""The stacks under test: how to start each one, when it is ready, how clients reach it.

=========  ============================================================================
ceiling    ``bench/ceiling_server.py``: websockets ``broadcast()`` fed by one redis-py
           PubSub; no protocol (the floor any Python hub can reach)
socketio   ``bench/socketio_server.py``: python-socketio AsyncServer + aiohttp +
           AsyncRedisManager; the publisher is an external write-only manager
hub        ``python -m hub serve`` with one process
hub2       ``python -m hub serve --workers 2`` (SO_REUSEPORT on one port)
hub-asyncio  ``hub serve --loop asyncio``: one process on the default asyncio loop, to
           show what the optional uvloop extra buys
=========  ============================================================================
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .procs import start, wait_port

__all__ = ["REPO", "STACKS", "Stack", "hub_available"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Stack:
    """One server stack and the Redis channel its backends publish to."""

    name: str
    protocol: str  # key of bench.client.PROTOCOLS
    publish: str  # "redis" (PUBLISH channel) or "socketio" (write-only AsyncRedisManager)
    channel: str  # Redis channel of the publisher and of the server subscription(s)
    processes: int  # server processes that subscribe to ``channel``
    uvloop: bool = True  # False: the default asyncio loop (for the hub: --loop asyncio)

    def command(self, port: int, redis_url: str) -> list[str]:
        py = sys.executable
        loop = [] if self.uvloop else ["--no-uvloop"]
        if self.name == "ceiling":
            return [py, "-m", "bench.ceiling_server", "--port", str(port),
                    "--redis-url", redis_url, "--channel", self.channel, *loop]
        if self.name == "socketio":
            return [py, "-m", "bench.socketio_server", "--port", str(port),
                    "--redis-url", redis_url, *loop]
        workers = ["--workers", str(self.processes)] if self.processes > 1 else []
        return [py, "-m", "hub", "serve", "--port", str(port), "--redis-url", redis_url,
                "--redis-prefix", "hub:", "--log-level", "warning",
                "--loop", "uvloop" if self.uvloop else "asyncio", *workers]

    def start(self, port: int, redis_url: str, log_path: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return start(self.command(port, redis_url), log_path=log_path, cwd=REPO, env=env)

    def wait_ready(self, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """Wait until the server accepts clients (the hub: until /readyz answers 200)."""
        if not self.name.startswith("hub"):
            wait_port(port, timeout, proc)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: /readyz not 200 after {timeout} s")

    def urls(self, port: int) -> list[str]:
        return [f"ws://127.0.0.1:{port}"]


STACKS: dict[str, Stack] = {
    "ceiling": Stack("ceiling", "ceiling", "redis", "hub:bench", 1),
    "socketio": Stack("socketio", "socketio", "socketio", "socketio", 1),
    "hub": Stack("hub", "hub", "redis", "hub:bench", 1),
    "hub2": Stack("hub2", "hub", "redis", "hub:bench", 2),
    "hub-asyncio": Stack("hub-asyncio", "hub", "redis", "hub:bench", 1, uvloop=False),
}


def hub_available() -> str | None:
    """None when ``python -m hub serve --help`` works here, else why not."""
    if not os.path.exists(os.path.join(REPO, "hub", "server.py")):
        return "hub/server.py does not exist yet"
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        done = subprocess.run([sys.executable, "-m", "hub", "serve", "--help"],
                              check=False, cwd=REPO,
                              env=env, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "python -m hub serve --help timed out"
    if done.returncode != 0:
        return f"python -m hub serve --help exited {done.returncode}: {done.stderr[-300:]!r}"
    return None
