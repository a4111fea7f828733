"""The test suite's helpers, one per job; the fixtures that use them are in tests/conftest.py.

- processes: :data:`ROOT`, :func:`free_port` and :class:`RedisServer` (bench.procs', shared with
  the bench), :class:`HubProcess` (a ``python -m hub serve``), :class:`Cluster` (a real Redis
  Cluster: the ``cluster`` fixtures), :func:`run_python` / :func:`run_cli` and
  :func:`config_error`;
- waiting: :func:`wait_until` (blocking) and :func:`wait_until_async` (from a coroutine), the
  only polling loop of the suite, and :func:`wait_for_status` on top of it;
- the hub's figures and credentials: :func:`metric`, :func:`make_token`;
- WebSocket clients: :func:`open_ws`, :func:`recv_json`, :func:`send_recv`, :func:`command`,
  :func:`subscribe`, :func:`assert_alive`, :func:`message`, :func:`no_message`,
  :func:`expect_message`, :func:`expect_messages`, :func:`handshake_status`, :func:`wait_close`;
- deploy/'s proxy configurations rendered for loopback: :func:`render_nginx`,
  :func:`write_nginx`, :func:`nginx_command`, :func:`render_haproxy`; Markdown:
  :func:`fenced_blocks`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
import redis
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.procs import RedisServer, free_port

__all__ = [
    "DEPLOY",
    "HAPROXY",
    "HAPROXY_CFG",
    "NGINX",
    "NGINX_CONF",
    "REDIS_CLI",
    "REDIS_SERVER",
    "ROOT",
    "Cluster",
    "HubProcess",
    "RedisServer",
    "assert_alive",
    "command",
    "config_error",
    "expect_message",
    "expect_messages",
    "fenced_blocks",
    "free_port",
    "handshake_status",
    "make_token",
    "message",
    "metric",
    "nginx_command",
    "no_message",
    "open_ws",
    "recv_json",
    "render_haproxy",
    "render_nginx",
    "run_cli",
    "run_python",
    "send_recv",
    "subscribe",
    "wait_close",
    "wait_for_status",
    "wait_until",
    "wait_until_async",
    "write_nginx",
]

T = TypeVar("T")

#: The repository (the worktree these tests are in).
ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx.conf"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)


# -- waiting ------------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.05,
               what: str = "condition") -> T:
    """Call ``predicate()`` every ``interval`` s until it returns something truthy, and return
    that; raise AssertionError once ``timeout`` s have passed (the last call is made after the
    deadline). Blocks the calling thread."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float, *,
                           interval: float = 0.05, what: str = "condition") -> T:
    """:func:`wait_until` from a coroutine: the same semantics, but ``predicate`` runs in a worker
    thread (so it may block: HTTP probes, psutil, redis-py) and the event loop keeps serving the
    test's own connections between the calls."""
    return await asyncio.to_thread(wait_until, predicate, timeout, interval=interval,
                                   what=what)


async def poll(predicate: Callable[[], Awaitable[T]], timeout: float = 10.0,
               what: str = "condition", *, interval: float = 0.05) -> T:
    """:func:`wait_until` for an async ``predicate`` awaited on the test's own loop (a
    Redis or WebSocket client of the test): its first truthy value, AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(interval)


async def wait_for_status(hub: Any, path: str, status: int, timeout: float) -> float:
    """Poll ``hub.http_get(path)`` (:func:`wait_until_async`) until it answers ``status``; return
    the seconds that took. AssertionError after ``timeout`` s."""
    start = time.monotonic()
    await wait_until_async(lambda: hub.http_get(path, timeout=0.5)[0] == status, timeout,
                           interval=0.02, what=f"{path} to answer {status}")
    return time.monotonic() - start


# -- processes ----------------------------------------------------------------------------------

def run_python(*args: str, env: dict[str, str] | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from the repository, output captured as text, no ``HUB_*`` variable
    inherited (``env`` is added on top), this worktree first on PYTHONPATH; never raises on a
    non-zero exit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})}, cwd=ROOT, check=False)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m hub ARGS`` (:func:`run_python`)."""
    return run_python("-m", "hub", *args, env=env, timeout=timeout)


def config_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a configuration error (asserts exit 2 and exactly one line)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hub: "), lines[0]
    return lines[0]


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


class Cluster:
    """Three masters (each with ``replicas`` replicas) on loopback. A killed master restarts
    on its port with its own ``nodes.conf``, so it rejoins with the slots it had."""

    def __init__(self, workdir: Path, replicas: int = 0):
        if REDIS_SERVER is None or REDIS_CLI is None:
            pytest.fail("redis-server and redis-cli are needed (bash .ci/run installs them)")
        version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
        major = int(version.split("v=")[1].split(".")[0])
        if major < 7:
            pytest.skip(f"sharded pub/sub needs Redis >= 7, found {version.strip()}")
        self.workdir = workdir
        self.replicas = replicas
        count = 3 * (1 + replicas)
        ports: set[int] = set()
        while len(ports) < 2 * count:
            ports.add(free_port())
        self.ports, self.bus_ports = sorted(ports)[:count], sorted(ports)[count:]
        self.procs: dict[int, subprocess.Popen] = {}

    def create(self) -> None:
        """Start every node, join them into one cluster and wait until it settles."""
        for port in self.ports:
            self.start(port)
        addrs = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run([REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas",
                               str(self.replicas), "--cluster-yes"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(self._settled, 30, interval=0.1, what="cluster_state:ok on every node")

    def masters(self, ask: int | None = None) -> list[int]:
        """Ports of the masters, in slot order, as node ``ask`` sees them."""
        slots = self.client(ask or self.ports[0]).execute_command("CLUSTER", "SLOTS")
        return [int(entry[2][1]) for entry in sorted(slots)]

    @property
    def url(self) -> str:
        """The seed URL the hubs are given: the first master."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, port: int) -> None:
        bus = self.bus_ports[self.ports.index(port)]
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        with open(node_dir / "redis.log", "ab") as log:
            self.procs[port] = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                 "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no",
                 "--dir", str(node_dir)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._pings(port), 10, what=f"redis-server on {port}")

    def _pings(self, port: int) -> bool:
        if self.procs[port].poll() is not None:
            raise AssertionError(f"redis-server {port} exited with {self.procs[port].returncode}")
        try:
            return bool(self.client(port, timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _settled(self) -> bool:
        for port in self.ports:
            info = self.client(port).execute_command("CLUSTER", "INFO").decode()
            known = f"cluster_known_nodes:{len(self.ports)}"
            if "cluster_state:ok" not in info or known not in info:
                return False
            slots = self.client(port).execute_command("CLUSTER", "SLOTS")
            if [len(entry) for entry in slots] != [3 + self.replicas] * 3:
                return False
        return True

    def client(self, port: int, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def owner(self, channel: str, ask: int | None = None) -> int:
        """The port of the master that serves hub channel ``channel``, as ``ask`` sees it."""
        slot = key_slot(f"hub:{channel}".encode())
        for first, last, (_, port, *_), *_ in self.client(ask or self.ports[0]).execute_command(
                "CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(port)
        raise AssertionError(f"slot {slot} is not served")

    def shardnumsub(self, port: int, channel: str) -> int:
        reply = self.client(port).execute_command("PUBSUB", "SHARDNUMSUB", f"hub:{channel}")
        return int(reply[1])

    def spublish(self, channel: str, data: str) -> int:
        """``redis-cli -c SPUBLISH hub:<channel> <data>`` through the first master."""
        done = subprocess.run([REDIS_CLI, "-c", "-p", str(self.ports[0]), "SPUBLISH",
                               f"hub:{channel}", data], capture_output=True, text=True,
                              timeout=10, check=False)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)

    def restart(self, port: int) -> None:
        self.kill(port)
        self.start(port)

    def move_slot(self, slot: int, src: int, dst: int) -> None:
        """Give ``slot`` (no keys in it) from master ``src`` to master ``dst``
        (https://redis.io/docs/latest/commands/cluster-setslot/)."""
        ids = {p: self.client(p).execute_command("CLUSTER", "MYID").decode() for p in (src, dst)}
        self.client(dst).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        self.client(src).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        for port in (dst, src):
            self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])

    def close(self) -> None:
        for port in self.procs:
            self.kill(port)


# -- the hub's figures and credentials ----------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \S+)?$", re.MULTILINE)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(source: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` (none by default) in a Prometheus
    text exposition, as a float; None when there is no such sample.

    ``source`` is the exposition text, the URL of a /metrics page, or a hub (anything with
    ``http_get``, such as :class:`HubProcess`); fetching a page asserts that it answers 200.
    """
    if hasattr(source, "http_get"):
        status, body = source.http_get("/metrics")
        assert status == 200, status
        text = body.decode()
    elif source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=5) as resp:
            assert resp.status == 200, resp.status
            text = resp.read().decode()
    else:
        text = source
    want = labels or {}
    for sample, label_text, value in _SAMPLE.findall(text):
        if sample == name and dict(_LABEL.findall(label_text or "")) == want:
            return float(value)
    return None


def metric_total(source: Any, name: str) -> float:
    """The sum of every sample of ``name``, whatever its labels (0.0 when there is none), from
    the same sources as :func:`metric`."""
    text = source if isinstance(source, str) and not source.startswith("http") else None
    if text is None:
        if hasattr(source, "http_get"):
            status, body = source.http_get("/metrics")
            assert status == 200, status
            text = body.decode()
        else:
            with urllib.request.urlopen(source, timeout=5) as resp:
                assert resp.status == 200, resp.status
                text = resp.read().decode()
    return sum(float(value) for sample, _, value in _SAMPLE.findall(text) if sample == name)


def make_token(secret: str, sub: object = "alice", *, ttl: float | None = 300,
               algorithm: str = "HS256", **claims: object) -> str:
    """A JWT signed with ``secret``: ``{"sub": sub, "exp": int(now + ttl), **claims}``.

    ``sub=None`` leaves the ``sub`` claim out, ``ttl=None`` the ``exp`` claim; an ``exp`` (or
    any other claim) given in ``claims`` wins, e.g. ``channels=[...]`` or ``exp=1700000000``.
    """
    payload: dict[str, object] = {} if sub is None else {"sub": sub}
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=algorithm)


# -- WebSocket clients --------------------------------------------------------------------------

def open_ws(url: str, **kwargs: Any) -> connect:
    """``connect(url)`` with loopback-friendly defaults (no proxy, no compression)."""
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(url, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame, JSON-decoded; TimeoutError after ``timeout`` s."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send_recv(ws: ClientConnection, frame: dict | str | bytes,
                    timeout: float = 5.0) -> Any:
    """Send one frame (a dict is JSON-encoded) and return the very next frame the hub sends."""
    await ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)
    return await recv_json(ws, timeout)


async def command(ws: ClientConnection, timeout: float = 10.0, **cmd: Any) -> dict:
    """Send one command and return the first frame that answers it (same id), skipping others."""
    await ws.send(json.dumps(cmd))
    while True:
        reply = await recv_json(ws, timeout)
        if reply.get("type") in ("ack", "pong", "error") and reply.get("id") == cmd.get("id"):
            return reply


async def subscribe(ws: ClientConnection, channel: str, id: int = 1) -> None:
    """Subscribe and assert the ack."""
    reply = await command(ws, op="subscribe", channel=channel, id=id)
    assert reply == {"type": "ack", "id": id}, reply


async def assert_alive(ws: ClientConnection, tag: object = "alive") -> None:
    """The connection is open and the hub answers a ping at once."""
    assert await send_recv(ws, {"op": "ping", "id": tag}) == {"type": "pong", "id": tag}


def message(channel: str, data: object) -> dict:
    """The frame the hub sends for a message on ``channel``."""
    return {"type": "message", "channel": channel, "data": data}


async def no_message(ws: ClientConnection, wait: float = 0.3) -> None:
    """Assert that nothing arrives within ``wait`` seconds."""
    try:
        frame = await asyncio.wait_for(ws.recv(), wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame!r}")


async def expect_message(ws: ClientConnection, channel: str, data: object,
                         timeout: float = 5.0) -> None:
    """The next frame is exactly this message."""
    frame = await recv_json(ws, timeout)
    assert frame == {"type": "message", "channel": channel, "data": data}, frame


async def expect_messages(ws: ClientConnection, expected: list[tuple[str, object]],
                          timeout: float = 5.0) -> None:
    """The next ``len(expected)`` frames are exactly these messages, each channel's in the
    given order. Channels on different Redis servers may interleave: no order between them."""
    frames = [await recv_json(ws, timeout) for _ in expected]
    assert all(frame["type"] == "message" for frame in frames), frames

    def by_channel(pairs: Any) -> dict[str, list]:
        out: dict[str, list] = {}
        for channel, data in pairs:
            out.setdefault(channel, []).append(data)
        return out

    assert by_channel((f["channel"], f["data"]) for f in frames) == by_channel(expected)


async def handshake_status(url: str, **kwargs: Any) -> int:
    """The HTTP status of a refused handshake (fails the test if it is accepted)."""
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(url, **kwargs):
            pass
    return info.value.response.status_code


async def wait_close(ws: ClientConnection, timeout: float) -> tuple[int | None, float]:
    """Read (and drop) frames until the hub closes ``ws``: (the close code it sent or None,
    time.time() at the close). TimeoutError after ``timeout`` s."""

    async def drain() -> tuple[int | None, float]:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), time.time()

    return await asyncio.wait_for(drain(), timeout)


# -- deploy/'s proxy configurations, rendered for loopback --------------------------------------

def render_nginx(listen: str, hubs: list[str], prefix: Path | None = None,
                 worker_processes: int | None = None) -> str:
    """deploy/nginx.conf with ``listen`` (``127.0.0.1:PORT``) and one upstream line per hub.

    Each hub line keeps the parameters (``max_fails=...``) of the shipped ``server`` line. With
    ``prefix`` (a directory) the log files under /var/log/nginx/ and the temporary directories go
    there, so that nginx runs as any user; ``worker_processes`` replaces ``auto`` (a test that
    must not depend on the core count). The rest of the file is unchanged.
    """
    text = NGINX_CONF.read_text()
    [(indent, params)] = re.findall(r"^([ \t]*)server[ \t]+\S+((?:[ \t]+[^;\s]+)*);$", text,
                                   re.MULTILINE)
    lines = "".join(f"{indent}server {hub}{params};\n" for hub in hubs)
    text = _replace_lines(text, r"^[ \t]*server[ \t]+\S+(?:[ \t]+[^;\s]+)*;\n", lines)
    text, n = re.subn(r"^([ \t]*)listen[ \t]+\S+;", rf"\g<1>listen {listen};", text,
                      flags=re.MULTILINE)
    assert n == 1, "deploy/nginx.conf should have one listen line"
    if worker_processes is not None:
        text, n = re.subn(r"^worker_processes \S+;", f"worker_processes {worker_processes};",
                          text, flags=re.MULTILINE)
        assert n == 1, "deploy/nginx.conf should have one worker_processes line"
    if prefix is not None:
        text = text.replace("/var/log/nginx/", f"{prefix}/")
        temp = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        text, n = re.subn(r"^http \{\n", lambda m: m.group(0) + temp, text, flags=re.MULTILINE)
        assert n == 1, "deploy/nginx.conf should have one http block"
    return text


def nginx_command(prefix: Path, conf: Path, *extra: str) -> list[str]:
    """Run nginx in the foreground with every file it writes under ``prefix``."""
    assert NGINX is not None
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'};", *extra]


def write_nginx(prefix: Path, listen: str, hubs: list[str],
                worker_processes: int | None = None) -> Path:
    """Write deploy/nginx.conf rendered for ``prefix`` (:func:`render_nginx`); return its path.

    nginx then logs to ``prefix``/access.log and ``prefix``/error.log.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx(listen, hubs, prefix, worker_processes))
    return conf


def render_haproxy(bind: str, hubs: list[str]) -> str:
    """deploy/haproxy.cfg with ``bind`` (``127.0.0.1:PORT``) and one server line per hub.

    Each line ``server hubN ADDRESS ...`` keeps the parameters of the first shipped line.
    """
    text = HAPROXY_CFG.read_text()
    server_re = r"^([ \t]*)server[ \t]+\S+[ \t]+\S+(.*)$"
    [(indent, params), *_] = re.findall(server_re, text, re.MULTILINE)
    lines = "".join(f"{indent}server hub{i} {hub}{params}\n" for i, hub in enumerate(hubs, 1))
    text = _replace_lines(text, r"^[ \t]*server[ \t]+\S+[ \t]+\S+.*\n", lines)
    text, n = re.subn(r"^([ \t]*)bind[ \t]+\S+", rf"\g<1>bind {bind}", text, flags=re.MULTILINE)
    assert n == 1, "deploy/haproxy.cfg should have one bind line"
    return text


def _replace_lines(text: str, pattern: str, lines: str) -> str:
    """``text`` with the first line matching ``pattern`` replaced by ``lines``, the others cut."""
    seen = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal seen
        seen += 1
        return lines if seen == 1 else ""

    return re.sub(pattern, replace, text, flags=re.MULTILINE)


# -- Markdown -----------------------------------------------------------------------------------

def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of a Markdown text; indented ones (inside a
    list item) dedented by their fence's indent."""
    blocks = []
    for indent, lang, code in re.findall(r"^([ \t]*)```(\w*)\n(.*?)^\1```", text,
                                         re.MULTILINE | re.DOTALL):
        lines = [line.removeprefix(indent) for line in code.splitlines()]
        blocks.append((lang, "\n".join(lines) + "\n"))
    return blocks
