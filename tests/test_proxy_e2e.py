"""Three hubs behind the real nginx (and haproxy) with deploy/'s configurations, one Redis.

300 clients connect through the proxy and subscribe to one channel; a backend publishes a
numbered message every 0.1 s; one hub is SIGKILLed. Its clients' connections drop; they
reconnect through the proxy, which must pass them to the surviving hubs on the first attempt
(nginx: proxy_next_upstream + max_fails; haproxy: retries + redispatch), and they receive every
message published after their new subscription is acknowledged. The clients of the other two
hubs see nothing of it: every message exactly once, in order, no drop, no error frame.

The proxy runs in the foreground with a configuration rendered from deploy/nginx.conf or
deploy/haproxy.cfg for loopback ports (tests/test_deploy_files.py: render_nginx,
render_haproxy), every file it writes under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import re
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

from tests.conftest import free_port, wait_until
from tests.test_deploy_files import HAPROXY, NGINX, nginx_command, render_haproxy, write_nginx
from tests.test_workers import until
from tests.wsutil import open_ws

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


def hub_connections(hub) -> int:
    status, body = hub.http_get("/metrics")
    assert status == 200, status
    return int(float(re.search(rb"^hub_connections (\S+)$", body, re.MULTILINE).group(1)))


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def proxy(tmp_path) -> Iterator[Callable[[str, list[int]], int]]:
    """``proxy(kind, hub_ports) -> port``: nginx or haproxy in front of the hubs, until teardown."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, hub_ports: list[int]) -> int:
        port = free_port()
        prefix = tmp_path / kind
        prefix.mkdir()
        hubs = [f"127.0.0.1:{p}" for p in hub_ports]
        if kind == "nginx":
            cmd = nginx_command(prefix, write_nginx(prefix, f"127.0.0.1:{port}", hubs))
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
        await until(lambda: all(c.subscribed.is_set() for c in clients), 60,
                    f"{CLIENTS} clients subscribed through {kind}")
        counts = [hub_connections(hub) for hub in hubs]
        assert sum(counts) == CLIENTS, counts
        # Least connections: every hub got a fair share.
        assert min(counts) >= CLIENTS // 6, counts

        await publisher.publish_many(BEFORE_KILL)
        hubs[0].kill()  # SIGKILL: its clients' connections drop at once
        # Keep publishing while the dropped clients come back.
        background = asyncio.create_task(publisher.publish_many(10_000))
        await until(lambda: sum(c.drops for c in clients) >= counts[0], 20,
                    f"the {counts[0]} clients of the killed hub to drop")
        dropped = [c for c in clients if c.drops]
        await until(lambda: all(c.subscribed.is_set() for c in dropped), 30,
                    "the dropped clients to subscribe again")
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await publisher.publish_many(AFTER_RECONNECT)
        last = publisher.next - 1
        await until(lambda: all(c.received and c.received[-1] == last for c in clients), 20,
                    "every client to receive the last message")
        # The survivors now hold every client.
        assert sum(hub_connections(hub) for hub in hubs[1:]) == CLIENTS
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
