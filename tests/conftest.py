"""Shared fixtures: real redis-server and real ``hub serve`` processes on free loopback ports.

Nothing here touches a Redis on 6379 or any non-loopback address. Every process a fixture
starts is killed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns truthy; raise AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server this test owns, on a free loopback port; killable and restartable."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (bash .ci/run installs it)")
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._pings, 10, what=f"redis-server on {self.port}")

    def _pings(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client(timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the server and wait for it to exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def numsub(self, channel: str) -> int:
        return dict(self.client().pubsub_numsub(channel)).get(channel.encode(), 0)


class HubProcess:
    """A ``python -m hub serve`` subprocess on a free port, with its log in a file."""

    def __init__(self, args: tuple[str, ...], workdir: Path, redis: RedisServer | None,
                 env: dict[str, str] | None, port: int | None):
        self.port = port or free_port()
        self.log_path = workdir / f"hub-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "hub", "serve", "--port", str(self.port),
               "--ping-interval", "5", *args]
        if redis is not None:
            cmd += ["--redis-url", redis.url]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         cwd=str(workdir))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def http_get(self, path: str, timeout: float = 2.0, headers: dict | None = None):
        """``(status, body bytes)`` of a GET; ``(None, b"")`` when nothing answers."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, urllib.error.URLError):
            return None, b""

    def wait_ready(self, timeout: float = 15.0, path: str = "/readyz") -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}:\n{self.log_text()}")
            return self.http_get(path, timeout=0.5)[0] == 200
        try:
            wait_until(ready, timeout, what=f"hub {path} on {self.port}")
        except AssertionError:
            print(self.log_text())
            raise

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path):
    """Start more redis-servers: ``redis_factory(extra_args=())``."""
    servers: list[RedisServer] = []

    def make(extra: tuple[str, ...] = ()) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", extra=extra)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def hub_factory(tmp_path):
    """Start hubs: ``hub_factory(*args, redis=None, env=None, wait_ready=True, port=None)``."""
    hubs: list[HubProcess] = []

    def make(*args: str, redis: RedisServer | None = None, env: dict | None = None,
             wait_ready: bool = True, port: int | None = None) -> HubProcess:
        hub = HubProcess(tuple(args), tmp_path, redis, env, port)
        hubs.append(hub)
        if wait_ready:
            hub.wait_ready()
        return hub

    yield make
    for hub in hubs:
        hub.terminate()
    for hub in hubs:
        try:
            hub.wait(15)
        except subprocess.TimeoutExpired:
            hub.kill()
