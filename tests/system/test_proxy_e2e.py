"""Three hubs behind the real nginx (and haproxy) with deploy/'s configurations, one Redis.

300 clients connect through the proxy and subscribe to one channel; a backend publishes a
numbered message every 0.1 s; one hub is SIGKILLed. Its clients' connections drop; they
reconnect through the proxy, which must pass them to the surviving hubs on the first attempt
(nginx: proxy_next_upstream + max_fails; haproxy: retries + redispatch), and they receive every
message published after their new subscription is acknowledged. The clients of the other two
hubs see nothing of it: every message exactly once, in order, no drop, no error frame.

The proxy runs in the foreground with a configuration rendered from deploy/nginx.conf or
deploy/haproxy.cfg for loopback ports (tests/helpers.py: render_nginx,
render_haproxy), every file it writes under the test's tmp_path.

Two more checks of the shipped files: nginx carries more WebSocket clients than Debian's
default nginx.conf would (``worker_connections 768``: each proxied WebSocket takes two), and
neither proxy writes a ``?token=`` query string into its access log.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis.asyncio
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.helpers import (
    HAPROXY,
    NGINX,
    free_port,
    make_token,
    metric,
    nginx_command,
    open_ws,
    recv_json,
    render_haproxy,
    subscribe,
    wait_until,
    wait_until_async,
    write_nginx,
)

CLIENTS = 300
CHANNEL = "news"
PUBLISH_EVERY = 0.1  # seconds between two published messages
BEFORE_KILL = 10  # messages published before the SIGKILL
AFTER_RECONNECT = 10  # messages published once every dropped client is subscribed again


class Publisher:
    """A backend: PUBLISH hub:news {"seq": n} with n = 0, 1, 2, ..."""

    def __init__(self, url: str) -> None:
        self.redis = redis.asyncio.Redis.from_url(url)
        self.next = 0  # the seq of the next message; every seq below it has been sent or is

    async def publish(self) -> None:
        seq, self.next = self.next, self.next + 1
        await self.redis.publish(f"hub:{CHANNEL}", json.dumps({"seq": seq}))

    async def publish_many(self, count: int) -> None:
        for _ in range(count):
            await self.publish()
            await asyncio.sleep(PUBLISH_EVERY)


class Client:
    """One subscriber that reconnects through the proxy whenever its connection drops.

    ``received`` holds the seq of every message in arrival order; ``drops`` counts lost
    connections, ``failed_connects`` handshakes that did not succeed, ``errors`` any frame other
    than an ack or a message; ``resubscribed_from`` is the first seq published after the last
    ack, from which on every message must arrive.
    """

    def __init__(self, url: str, publisher: Publisher) -> None:
        self.url = url
        self.publisher = publisher
        self.received: list[int] = []
        self.errors: list[object] = []
        self.drops = 0
        self.failed_connects = 0
        self.resubscribed_from = 0
        self.subscribed = asyncio.Event()

    async def run(self, gate: asyncio.Semaphore) -> None:
        while self.failed_connects < 20:
            try:
                async with gate:
                    ws = await open_ws(self.url)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.failed_connects += 1
                self.errors.append(repr(exc))
                await asyncio.sleep(0.2)
                continue
            try:
                await ws.send(json.dumps({"op": "subscribe", "channel": CHANNEL, "id": 1}))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame == {"type": "ack", "id": 1}:
                        self.resubscribed_from = self.publisher.next
                        self.subscribed.set()
                    elif frame.get("type") == "message" and frame.get("channel") == CHANNEL:
                        self.received.append(frame["data"]["seq"])
                    else:
                        self.errors.append(frame)
            except ConnectionClosed:
                pass
            finally:
                await ws.close()
            self.drops += 1
            self.subscribed.clear()


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def proxy(tmp_path) -> Iterator[Callable[..., int]]:
    """``proxy(kind, hub_ports, **render) -> port``: nginx or haproxy in front of the hubs, until
    teardown. Its files are under ``tmp_path / kind``: nginx's access.log and error.log,
    haproxy's log in proxy.log. ``render``: keyword arguments of :func:`write_nginx`."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, hub_ports: list[int], **render) -> int:
        port = free_port()
        prefix = tmp_path / kind
        prefix.mkdir()
        hubs = [f"127.0.0.1:{p}" for p in hub_ports]
        if kind == "nginx":
            cmd = nginx_command(prefix, write_nginx(prefix, f"127.0.0.1:{port}", hubs, **render))
        else:
            cfg = prefix / "haproxy.cfg"
            cfg.write_text(render_haproxy(f"127.0.0.1:{port}", hubs))
            cmd = [str(HAPROXY), "-db", "-f", str(cfg)]
        with open(prefix / "proxy.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{kind} exited: {(prefix / 'proxy.log').read_text()}"
                                     f"{_read(prefix / 'error.log')}")
            return http_status(f"http://127.0.0.1:{port}/readyz") == 200
        wait_until(ready, 15, what=f"{kind} on {port}")
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):  # nginx workers
                child.kill()
            proc.kill()
            proc.wait(10)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def failover(kind: str, proxy, redis_server, hub_factory) -> None:
    hubs = [hub_factory(redis=redis_server) for _ in range(3)]
    port = proxy(kind, [hub.port for hub in hubs])
    publisher = Publisher(redis_server.url)
    clients = [Client(f"ws://127.0.0.1:{port}/ws", publisher) for _ in range(CLIENTS)]
    gate = asyncio.Semaphore(50)  # handshakes in flight at once
    tasks = [asyncio.create_task(c.run(gate)) for c in clients]
    try:
        await wait_until_async(lambda: all(c.subscribed.is_set() for c in clients), 60,
                               what=f"{CLIENTS} clients subscribed through {kind}")
        counts = [int(metric(hub, "hub_connections")) for hub in hubs]
        assert sum(counts) == CLIENTS, counts
        # Least connections: every hub got a fair share.
        assert min(counts) >= CLIENTS // 6, counts

        await publisher.publish_many(BEFORE_KILL)
        hubs[0].kill()  # SIGKILL: its clients' connections drop at once
        # Keep publishing while the dropped clients come back.
        background = asyncio.create_task(publisher.publish_many(10_000))
        await wait_until_async(lambda: sum(c.drops for c in clients) >= counts[0], 20,
                               what=f"the {counts[0]} clients of the killed hub to drop")
        dropped = [c for c in clients if c.drops]
        await wait_until_async(lambda: all(c.subscribed.is_set() for c in dropped), 30,
                               what="the dropped clients to subscribe again")
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await publisher.publish_many(AFTER_RECONNECT)
        last = publisher.next - 1
        await wait_until_async(lambda: all(c.received and c.received[-1] == last
                                           for c in clients), 20,
                               what="every client to receive the last message")
        # The survivors now hold every client.
        assert sum(int(metric(hub, "hub_connections")) for hub in hubs[1:]) == CLIENTS
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.redis.aclose()

    total = publisher.next
    dropped = [c for c in clients if c.drops]
    kept = [c for c in clients if not c.drops]
    # Exactly the clients of the killed hub dropped, each once.
    assert len(dropped) == counts[0], (len(dropped), counts)
    assert all(c.drops == 1 for c in dropped)
    # The others: every message, exactly once, in order, and nothing else.
    for c in kept:
        assert c.received == list(range(total))
        assert c.errors == [] and c.failed_connects == 0
    # The dropped ones reconnected at the first attempt, through the proxy, to a live hub, and got
    # everything published before the kill and after their new subscription, in order, once.
    for c in dropped:
        assert c.failed_connects == 0 and c.errors == [], c.errors
        assert c.received == sorted(set(c.received))
        assert set(range(BEFORE_KILL)) <= set(c.received)
        assert set(range(c.resubscribed_from, total)) <= set(c.received)
        assert c.resubscribed_from <= total - AFTER_RECONNECT


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
async def test_nginx_failover_keeps_other_clients_whole(proxy, redis_server, hub_factory):
    await failover("nginx", proxy, redis_server, hub_factory)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
async def test_haproxy_failover_keeps_other_clients_whole(proxy, redis_server, hub_factory):
    await failover("haproxy", proxy, redis_server, hub_factory)


# -- capacity: more clients than Debian's default nginx.conf carries --------------------------

MANY_CLIENTS = 1000
#: Debian's /etc/nginx/nginx.conf: `worker_connections 768;`, i.e. 384 WebSockets per worker.
DEBIAN_WORKER_CONNECTIONS = 768


@pytest.fixture
def fd_limit() -> Iterator[None]:
    """RLIMIT_NOFILE soft raised to hard for the test (and the hubs and nginx it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # This process holds every client socket; a single nginx worker that may not raise its own
    # limit (worker_rlimit_nofile needs privileges) holds two descriptors per client.
    need = 2 * MANY_CLIENTS + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} file descriptors this test needs")
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
async def test_nginx_carries_more_clients_than_debians_default(
        fd_limit, proxy, redis_server, hub_factory, tmp_path):
    # One nginx worker, whatever the core count: 1000 clients are 2000 connections in it, which
    # Debian's 768 cannot hold (it would carry 384), while the shipped 32768 can.
    assert 2 * MANY_CLIENTS > DEBIAN_WORKER_CONNECTIONS
    hubs = [hub_factory(redis=redis_server) for _ in range(3)]
    port = proxy("nginx", [hub.port for hub in hubs], worker_processes=1)
    url = f"ws://127.0.0.1:{port}/ws"
    gate = asyncio.Semaphore(100)  # handshakes in flight at once
    conns = []

    async def connect() -> None:
        async with gate:
            ws = await open_ws(url)
        conns.append(ws)
        await subscribe(ws, CHANNEL)

    try:
        async with asyncio.timeout(120):
            results = await asyncio.gather(*(connect() for _ in range(MANY_CLIENTS)),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, (f"{len(failed)} of {MANY_CLIENTS} clients failed through nginx,"
                                f" first: {failed[0]!r}\n{_read(tmp_path / 'nginx' / 'error.log')}")
            assert sum(int(metric(hub, "hub_connections")) for hub in hubs) == MANY_CLIENTS

            publisher = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                # Every hub holds subscribers: the message reaches all three.
                assert await publisher.publish(f"hub:{CHANNEL}", json.dumps({"seq": 0})) == 3
            finally:
                await publisher.aclose()
            frames = await asyncio.gather(*(recv_json(ws, timeout=30) for ws in conns))
            expected = {"type": "message", "channel": CHANNEL, "data": {"seq": 0}}
            assert sum(frame == expected for frame in frames) == MANY_CLIENTS
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    assert "worker_connections are not enough" not in _read(tmp_path / "nginx" / "error.log")


# -- access logs: no token -----------------------------------------------------------------------

NEEDS_NGINX = pytest.mark.skipif(NGINX is None,
                                 reason="nginx is not installed (apt-get install nginx)")
NEEDS_HAPROXY = pytest.mark.skipif(HAPROXY is None,
                                   reason="haproxy is not installed (apt-get install haproxy)")


@pytest.mark.parametrize("kind", [pytest.param("nginx", marks=[pytest.mark.nginx, NEEDS_NGINX]),
                                  pytest.param("haproxy", marks=NEEDS_HAPROXY)])
async def test_access_log_leaves_out_the_token(kind, proxy, hub_factory, tmp_path):
    secret = "test-secret-of-at-least-32-bytes-for-hs256"
    hub = hub_factory("--jwt-secret", secret)
    port = proxy(kind, [hub.port])
    log = tmp_path / kind / ("access.log" if kind == "nginx" else "proxy.log")
    token = make_token(secret, "alice", ttl=None)
    # A valid token: the handshake succeeds through the proxy; the line is logged at its end.
    async with open_ws(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
        await subscribe(ws, CHANNEL)
    # An invalid one (401 from the hub) and one on a plain request.
    assert http_status(f"http://127.0.0.1:{port}/ws?token=secret123") == 401
    assert http_status(f"http://127.0.0.1:{port}/readyz?token=secret123") == 200

    def logged() -> bool:
        text = _read(log)
        return "GET /ws " in text and "GET /readyz " in text and text.count("GET /ws ") == 2
    wait_until(logged, 10, what=f"{kind} to log the three requests in {log}")
    text = _read(log)
    assert "secret123" not in text and token not in text and "token=" not in text, text
    # The path, method and status are still there.
    assert re.search(r'"GET /ws HTTP/1\.1" 401', text) or re.search(r" 401 .*GET /ws ", text), text
