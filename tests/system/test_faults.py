"""Fault injection against real redis-server and real `hub serve` processes (docs/reliability.md).

Timings are printed (run pytest with -s to see them), never asserted: the bounds below are
failure limits for a hung hub, far above what a healthy hub needs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

from hub import AsyncPublisher
from tests.helpers import (
    RedisServer,
    free_port,
    make_token,
    metric,
    no_message,
    open_ws,
    recv_json,
    subscribe,
    wait_for_status,
    wait_until_async,
)

PROBE = ("--probe-interval", "0.5", "--probe-timeout", "1")


async def expect_gap(ws, channels: list[str], timeout: float = 20.0) -> None:
    frame = await recv_json(ws, timeout)
    assert frame == {"type": "gap", "channels": sorted(channels)}, frame


class CountingListener:
    """A TCP listener that accepts and closes at once, counting connection attempts."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


async def test_redis_down_at_start_then_up(tmp_path, hub_factory):
    port = free_port()
    listener = CountingListener(port)
    redis = None
    try:
        fake = type("Fake", (), {"url": f"redis://127.0.0.1:{port}/0"})()
        hub = hub_factory(*PROBE, redis=fake, wait_ready=False)
        hub.wait_ready(path="/healthz")
        await asyncio.sleep(3.0)
        # It serves, says it is not ready, and retries with backoff, not in a hot loop.
        assert hub.http_get("/healthz")[0] == 200
        assert hub.http_get("/readyz")[0] == 503
        attempts = listener.accepted
        print(f"\nconnection attempts in 3 s with Redis down: {attempts}")
        assert 1 <= attempts <= 40
        # A WebSocket client with a personal channel cannot be served: 503, not a hang.
        from websockets.exceptions import InvalidStatus
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(hub.ws_url + "?user=alice"):
                pass
        assert info.value.response.status_code == 503
    finally:
        listener.close()
    redis = RedisServer(tmp_path / "late-redis", port=port)
    try:
        took = await wait_for_status(hub, "/readyz", 200, 20)
        print(f"ready {took:.2f}s after Redis appeared")
        async with open_ws(hub.ws_url) as ws:
            await subscribe(ws, "news")
            redis.client().publish("hub:news", "1")
            assert (await recv_json(ws))["data"] == 1
        assert hub.proc.poll() is None
    finally:
        redis.kill()


async def test_redis_restart_resubscribes_and_signals_gap(redis_server, hub_factory):
    hubs = [hub_factory(*PROBE, redis=redis_server) for _ in range(2)]
    a = await open_ws(hubs[0].ws_url + "?user=alice")
    b = await open_ws(hubs[1].ws_url)
    c = await open_ws(hubs[1].ws_url)
    await subscribe(a, "news")
    await subscribe(a, "sports")
    await subscribe(b, "news")
    # c has no subscription: it must not be told of a gap.

    killed = time.monotonic()
    redis_server.kill()
    detected = await wait_for_status(hubs[0], "/readyz", 503, 10)
    redis_server.start()
    recovered = await wait_for_status(hubs[0], "/readyz", 200, 20)
    await wait_for_status(hubs[1], "/readyz", 200, 20)
    print(f"\nrestart: outage seen by /readyz after {detected:.2f}s, "
          f"ready again {recovered:.2f}s after restart ({time.monotonic() - killed:.2f}s total)")

    await expect_gap(a, ["news", "sports", "user:alice"])
    await expect_gap(b, ["news"])
    await no_message(c)
    for channel, hubs_with_subscribers in (("news", 2), ("sports", 1), ("user:alice", 1)):
        assert redis_server.numsub("hub:" + channel) == hubs_with_subscribers, channel
    redis_server.client().publish("hub:news", '"after"')
    assert (await recv_json(a))["data"] == "after"
    assert (await recv_json(b))["data"] == "after"
    assert metric(hubs[0], "hub_broker_reconnects_total") == 1
    assert metric(hubs[0], "hub_gaps_signalled_total") == 1
    for ws in (a, b, c):
        await ws.close()


@pytest.mark.parametrize("how", ["sigstop", "pubsub_client_killed"])
async def test_frozen_or_silently_dropped_link_is_detected(redis_server, hub_factory, how):
    hub = hub_factory(*PROBE, redis=redis_server)
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")
        start = time.monotonic()
        if how == "sigstop":
            redis_server.pause()
            try:
                detected = await wait_for_status(hub, "/readyz", 503, 10)
            finally:
                redis_server.resume()
        else:
            # Redis closes the hub's subscriber the way it does past the output buffer limit.
            redis_server.client().client_kill_filter(_type="pubsub")
            detected = float("nan")
        await expect_gap(ws, ["news"])
        gap_after = time.monotonic() - start
        await wait_for_status(hub, "/readyz", 200, 20)
        print(f"\n{how}: /readyz 503 after {detected:.2f}s (bound 0.5+1 s), gap frame "
              f"{gap_after:.2f}s after the fault")
        assert redis_server.numsub("hub:news") == 1
        redis_server.client().publish("hub:news", "2")
        assert (await recv_json(ws))["data"] == 2


async def test_output_buffer_limit_drop_recovers(redis_server, hub_factory):
    hub = hub_factory(*PROBE, redis=redis_server)
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")
        r = redis_server.client()
        r.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
        big = json.dumps("x" * 300_000)
        r.publish("hub:news", big)  # past the hard limit: Redis drops the hub's subscriber
        frame = await recv_json(ws, 20)
        if frame["type"] == "message":  # the hub may have read it before the drop
            frame = await recv_json(ws, 20)
        assert frame == {"type": "gap", "channels": ["news"]}
        r.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
        await wait_for_status(hub, "/readyz", 200, 20)
        r.publish("hub:news", "3")
        assert (await recv_json(ws))["data"] == 3
        assert "link lost" in hub.log_text()


async def test_slow_consumer_is_closed_and_others_keep_receiving(redis_server, hub_factory):
    hub = hub_factory("--max-buffer-bytes", "262144", redis=redis_server)
    slow = await open_ws(hub.ws_url, max_size=None)
    await subscribe(slow, "feed")
    fast = []
    for _ in range(5):
        ws = await open_ws(hub.ws_url, max_size=None)
        await subscribe(ws, "feed")
        fast.append(ws)
    slow.transport.pause_reading()  # the slow client stops reading entirely

    count, size = 300, 32_000
    latencies: list[float] = []

    async def consume(ws):
        for n in range(count):
            frame = await recv_json(ws, 20)
            latencies.append(time.time() - frame["data"]["t"])
            assert frame["data"]["n"] == n

    consumers = [asyncio.create_task(consume(ws)) for ws in fast]
    async with AsyncPublisher(redis_server.url) as pub:
        for n in range(count):
            await pub.publish("feed", {"n": n, "t": time.time(), "pad": "x" * size})
            if n % 20 == 0:
                await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*consumers), 60)

    closed = await wait_until_async(
        lambda: metric(hub, "hub_slow_consumers_closed_total") == 1, 15,
        what="hub_slow_consumers_closed_total 1")
    assert closed
    await wait_until_async(lambda: metric(hub, "hub_connections") == 5, 15,
                           what="hub_connections 5")
    latencies.sort()
    print(f"\nslow consumer closed; other clients' latency over {len(latencies)} deliveries: "
          f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    slow.transport.resume_reading()
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(slow.recv(), 10)
    assert slow.close_code in (4008, 1006, None)
    for ws in fast:
        await ws.close()


async def test_connection_stuck_in_closing_is_reaped(redis_server, hub_factory):
    secret = "s" * 40
    hub = hub_factory("--jwt-secret", secret, redis=redis_server)
    exp = int(time.time()) + 3
    token = make_token(secret, "alice", exp=exp)
    ws = await open_ws(hub.ws_url + "?token=" + token)
    ws.transport.pause_reading()  # it will never answer the closing handshake
    assert metric(hub, "hub_connections") == 1
    await wait_until_async(lambda: metric(hub, "hub_connections") == 0, 20,
                           what="hub_connections 0")
    print(f"\nexpired connection that never answered the close was reaped "
          f"{time.time() - exp:.2f}s after its exp")
    assert time.time() >= exp - 1  # not before its expiry (1 s of clock rounding)
    ws.transport.abort()


async def test_sigterm_with_hundreds_of_clients_some_frozen(redis_server, hub_factory):
    hub = hub_factory("--shutdown-timeout", "3", "--max-buffer-bytes", "100000000",
                      "--max-payload-bytes", "1000000", redis=redis_server)
    clients = []
    for _ in range(300):
        ws = await open_ws(hub.ws_url, max_size=None)
        clients.append(ws)
    frozen = clients[:20]
    for ws in frozen:
        await subscribe(ws, "big")
        ws.transport.pause_reading()
    # Fill the frozen clients' buffers so that even the close frame cannot get through.
    async with AsyncPublisher(redis_server.url) as pub:
        for _ in range(60):
            await pub.publish("big", "x" * 200_000)
    await asyncio.sleep(1.0)
    start = time.monotonic()
    hub.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(hub.wait, 30)
    took = time.monotonic() - start
    print(f"\nSIGTERM with 300 clients (20 frozen): exited {code} after {took:.2f}s "
          f"(--shutdown-timeout 3)")
    assert code == 0
    for ws in clients[20:]:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    for ws in frozen:
        ws.transport.abort()


async def test_sigkill_of_one_hub_leaves_the_others_untouched(redis_server, hub_factory):
    hubs = [hub_factory(redis=redis_server) for _ in range(3)]
    survivors = []
    for i in range(30):
        ws = await open_ws(hubs[i % 3].ws_url)
        await subscribe(ws, "ticks")
        if i % 3 != 2:
            survivors.append(ws)
    count = 200

    async def consume(ws):
        got = []
        while len(got) < count:
            frame = await recv_json(ws, 20)
            assert frame["type"] == "message", frame  # no gap, no error
            got.append(frame["data"])
        return got

    consumers = [asyncio.create_task(consume(ws)) for ws in survivors]
    async with AsyncPublisher(redis_server.url) as pub:
        for n in range(count):
            if n == count // 2:
                hubs[2].kill()
            await pub.publish("ticks", n)
            await asyncio.sleep(0.005)
    results = await asyncio.wait_for(asyncio.gather(*consumers), 60)
    for got in results:
        assert got == list(range(count))
    assert redis_server.numsub("hub:ticks") == 2
    for ws in survivors:
        await no_message(ws, 0.2)
        await ws.close()
