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
node-ws    ``bench/node/ws_server.js``: Node.js ``ws`` + one ioredis subscriber, a send to
           every client per message (Node's ceiling)
node-socketio  ``bench/node/socketio_server.js``: Socket.IO 4 + ``@socket.io/redis-adapter``;
           published to in ``@socket.io/redis-emitter``'s wire format
channels   ``bench/channels_server.py --layer core``: Django Channels 4 on uvicorn with
           ``channels_redis``' RedisChannelLayer; published to with ``group_send``
channels-pubsub  the same with ``RedisPubSubChannelLayer``
=========  ============================================================================

Every stack has a runtime check (:meth:`Stack.missing`): a stack whose runtime is not
installed (no ``node`` or no ``bench/node/node_modules``, no Channels packages, a hub that
does not start) is skipped by ``python -m bench`` with a note.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import redis

from .procs import start, wait_port

__all__ = ["NODE_DIR", "REPO", "STACKS", "Stack", "channels_missing", "hub_available",
           "node_missing"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_DIR = os.path.join(REPO, "bench", "node")


@dataclass(frozen=True)
class Stack:
    """One server stack and the Redis channel its backends publish to."""

    name: str
    protocol: str  # key of bench.client.PROTOCOLS
    publish: str  # publisher kind, one of bench.publisher.KINDS (how backends publish)
    channel: str  # Redis channel of the publisher and of the server subscription(s)
    processes: int  # server processes that subscribe to ``channel``
    uvloop: bool = True  # False: the default asyncio loop (for the hub: --loop asyncio)
    # How the servers listen on Redis, for the wait before the first run: "channel"
    # (SUBSCRIBE channel: PUBSUB NUMSUB), "pattern" (PSUBSCRIBE: PUBSUB NUMPAT) or "none"
    # (RedisChannelLayer pops lists; a client is in the group once its handshake completed).
    subscription: str = "channel"

    def command(self, port: int, redis_url: str) -> list[str]:
        """argv of the server process of this stack on 127.0.0.1:``port``."""
        py = sys.executable
        loop = [] if self.uvloop else ["--no-uvloop"]
        if self.name == "ceiling":
            return [py, "-m", "bench.ceiling_server", "--port", str(port),
                    "--redis-url", redis_url, "--channel", self.channel, *loop]
        if self.name == "socketio":
            return [py, "-m", "bench.socketio_server", "--port", str(port),
                    "--redis-url", redis_url, *loop]
        if self.name == "node-ws":
            return [_node(), os.path.join(NODE_DIR, "ws_server.js"), "--port", str(port),
                    "--redis-url", redis_url, "--channel", self.channel]
        if self.name == "node-socketio":
            return [_node(), os.path.join(NODE_DIR, "socketio_server.js"), "--port", str(port),
                    "--redis-url", redis_url]
        if self.name.startswith("channels"):
            layer = "pubsub" if self.name == "channels-pubsub" else "core"
            return [py, "-m", "bench.channels_server", "--port", str(port),
                    "--redis-url", redis_url, "--layer", layer, *loop]
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

    def missing(self) -> str | None:
        """None when this stack's runtime is installed here, else why it is not (a sentence)."""
        if self.name.startswith("hub"):
            return hub_available()
        if self.name == "node-socketio":  # the publisher encodes the emitter's msgpack
            return node_missing() or _modules_missing("msgpack")
        if self.name.startswith("node-"):
            return node_missing()
        if self.name.startswith("channels"):
            return channels_missing()
        if self.name == "socketio":
            return _modules_missing("socketio", "aiohttp")
        return None

    def subscribers(self, client: redis.Redis) -> int | None:
        """How many server-side Redis subscriptions are up (None: nothing to count)."""
        if self.subscription == "pattern":
            return int(client.execute_command("PUBSUB", "NUMPAT"))
        if self.subscription == "none":
            return None
        return int(dict(client.pubsub_numsub(self.channel)).get(self.channel.encode(), 0))


STACKS: dict[str, Stack] = {
    "ceiling": Stack("ceiling", "ceiling", "redis", "hub:bench", 1),
    "socketio": Stack("socketio", "socketio", "socketio", "socketio", 1),
    "hub": Stack("hub", "hub", "redis", "hub:bench", 1),
    "hub2": Stack("hub2", "hub", "redis", "hub:bench", 2),
    "hub-asyncio": Stack("hub-asyncio", "hub", "redis", "hub:bench", 1, uvloop=False),
    "node-ws": Stack("node-ws", "ceiling", "redis", "hub:bench", 1),
    "node-socketio": Stack("node-socketio", "socketio", "socketio-emitter", "socket.io#/#*", 1,
                           subscription="pattern"),
    "channels": Stack("channels", "channels", "channels", "asgi:group:bench", 1,
                      subscription="none"),
    "channels-pubsub": Stack("channels-pubsub", "channels", "channels-pubsub",
                             "asgi__group__bench", 1),
}

#: Packages ``bench/node/package.json`` installs that the Node servers require.
NODE_PACKAGES = ("ws", "ioredis", "socket.io", "@socket.io/redis-adapter",
                 "@socket.io/redis-emitter")


def _node() -> str:
    return shutil.which("node") or "node"


def node_missing() -> str | None:
    """None when ``node`` is on the PATH and ``npm ci --prefix bench/node`` has run."""
    if shutil.which("node") is None:
        return "node is not on the PATH (Node.js 18 or later)"
    absent = [p for p in NODE_PACKAGES
              if not os.path.exists(os.path.join(NODE_DIR, "node_modules", p, "package.json"))]
    if absent:
        return (f"bench/node/node_modules lacks {', '.join(absent)}: "
                f"run `npm ci --prefix bench/node`")
    return None


def _modules_missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return (f"Python package(s) {', '.join(absent)} not installed for {sys.executable}: "
                f"pip install -e '.[bench]'")
    return None


def channels_missing() -> str | None:
    """None when Django, channels, channels_redis and uvicorn import here."""
    return _modules_missing("django", "channels", "channels_redis", "uvicorn", "msgpack")


@functools.lru_cache(maxsize=1)
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
