"""Coalesced writes for real: an in-process hub, a real redis-server, real WebSocket clients.

A burst is produced for real: the test PUBLISHes synchronously (hub.Publisher) from inside the
event loop that also runs the hub, so every message lands in the hub's Redis socket before
its reader runs again, and the reader finds them all at once. Also guarded here: the details
of redis-py the link relies on to see those replies without reading the socket
(hub.brokers.link._buffered_reply).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect

from hub.brokers.link import _NOTHING, _buffered_reply, no_retry_client
from hub.channels import NamespaceOptions
from hub.config import Config
from hub.publisher import Publisher
from hub.server import Hub
from tests.helpers import wait_until_async

HISTORY = (("chat", NamespaceOptions(history_size=100)),)


@pytest.fixture
async def make_hub(redis_server) -> AsyncIterator:
    hubs: list[Hub] = []

    async def make(prepare=None, **options) -> Hub:
        hub = Hub(Config(port=0, redis_url=(redis_server.url,), log_level="warning",
                         **options))
        if prepare is not None:
            prepare(hub)
        await hub.start()
        hubs.append(hub)
        await wait_until_async(lambda: hub.node.ready, 10, what="the broker link")
        return hub

    yield make
    for hub in hubs:
        await hub.stop()


async def client(hub: Hub, user: str, channels: list[str], **kwargs) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{hub.port}/ws?user={user}", max_size=None, **kwargs)
    for n, channel in enumerate(channels):
        await ws.send(json.dumps({"op": "subscribe", "channel": channel, "id": n + 1}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "ack", reply
    return ws


async def receive(ws: ClientConnection, count: int) -> list[dict]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]


def counter(hub: Hub, name: str) -> float:
    value: float = getattr(hub.node.metrics, name)._value.get()
    return value


async def test_redis_py_shows_the_replies_already_buffered_without_reading_the_socket(
        redis_server):
    client_ = no_retry_client(redis_server.url, 5)
    publisher = no_retry_client(redis_server.url, 5)
    pubsub = client_.pubsub()
    try:
        await pubsub.subscribe(b"k")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        for n in range(3):
            await publisher.publish(b"k", str(n))
        await asyncio.sleep(0.1)  # all three are in the socket now
        first = await pubsub.get_message(timeout=None)
        assert first["type"] == "message" and first["data"] == b"0"
        rest = []
        while (reply := await _buffered_reply(pubsub)) is not _NOTHING:
            rest.append(await pubsub.handle_message(reply))
        assert [(m["type"], m["channel"], m["data"]) for m in rest] == [
            ("message", b"k", b"1"), ("message", b"k", b"2")]
        # A reply only partly there is left where it is, and nothing waits for the rest.
        parser = pubsub.connection._parser
        push = b">3\r\n$7\r\nmessage\r\n$1\r\nk\r\n$1\r\nx\r\n"
        assert pubsub.connection.protocol in (3, "3")  # redis-py 8's default: push replies
        parser._reader.feed(push[:20])
        assert await asyncio.wait_for(_buffered_reply(pubsub), 1) is _NOTHING
        parser._reader.feed(push[20:])
        message = await pubsub.handle_message(await _buffered_reply(pubsub))
        assert (message["type"], message["data"]) == ("message", b"x")
        assert await _buffered_reply(pubsub) is _NOTHING
    finally:
        await pubsub.aclose()
        await client_.aclose()
        await publisher.aclose()


async def test_a_burst_keeps_the_order_per_connection_and_channel_in_one_write(
        make_hub, redis_server):
    hub = await make_hub()
    wanted = {"ab": ["a", "b"], "bc": ["b", "c"], "abc": ["a", "b", "c"], "a": ["a"]}
    clients = {user: await client(hub, user, channels) for user, channels in wanted.items()}
    with Publisher(redis_server.url) as pub:
        pub.publish("a", {"n": -1})  # one message on a quiet link: no burst
        assert [m["data"] for m in await receive(clients["a"], 1)] == [{"n": -1}]
        for ws in (clients["ab"], clients["abc"]):
            await receive(ws, 1)
        assert counter(hub, "burst_messages") == 0
        sent = []
        for n in range(90):  # the loop is blocked meanwhile: they arrive as a burst
            channel = "abc"[(n * 7) % 3]
            pub.publish(channel, {"n": n})
            sent.append((channel, n))
    for user, ws in clients.items():
        expected = [(c, n) for c, n in sent if c in wanted[user]]
        got = [(m["channel"], m["data"]["n"]) for m in await receive(ws, len(expected))]
        assert got == expected, user
    assert counter(hub, "burst_messages") >= 45
    assert counter(hub, "coalesced_writes") >= len(clients)
    for ws in clients.values():
        await ws.close()


async def test_a_slow_consumer_inside_a_burst_gets_4008_and_the_others_everything(
        make_hub, redis_server):
    hub = await make_hub(max_buffer_bytes=32768, max_payload_bytes=16384)
    slow = await client(hub, "slow", ["feed"])
    fast = [await client(hub, f"fast{i}", ["feed"]) for i in range(3)]
    # The slow client reads nothing, and both socket buffers of its connection are small,
    # so what the hub writes to it piles up in the hub's transport.
    (conn,) = [c for c in hub.node.connections() if c.user == "slow"]
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                       4096)
    slow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                       4096)
    slow.transport.pause_reading()
    count, pad = 60, "x" * 4000
    with Publisher(redis_server.url) as pub:
        for n in range(count):
            pub.publish("feed", {"n": n, "pad": pad})
    for ws in fast:
        assert [m["data"]["n"] for m in await receive(ws, count)] == list(range(count))
    await wait_until_async(lambda: counter(hub, "slow_consumers") == 1, 10,
                           what="the slow consumer closed")
    assert hub.node.metrics.closes.labels("4008")._value.get() == 1
    assert counter(hub, "burst_messages") > 0 and counter(hub, "coalesced_writes") > 0
    assert conn.dropping and conn not in hub.node.connections()
    for ws in fast:
        await ws.close()
    slow.transport.resume_reading()
    await slow.close()


async def test_compressed_and_plain_clients_get_the_same_burst(make_hub, redis_server):
    hub = await make_hub(compression="deflate")
    plain = [await client(hub, f"plain{i}", ["a", "b"], compression=None) for i in range(2)]
    deflate = [await client(hub, f"deflate{i}", ["a", "b"]) for i in range(2)]
    assert all(not ws.protocol.extensions for ws in plain)
    assert all(ws.protocol.extensions for ws in deflate)
    sent = []
    with Publisher(redis_server.url) as pub:
        for n in range(40):
            channel = "ab"[n % 2]
            pub.publish(channel, {"n": n, "text": "hello " * 20})
            sent.append((channel, n))
    for ws in plain + deflate:
        got = [(m["channel"], m["data"]["n"]) for m in await receive(ws, len(sent))]
        assert got == sent
    assert counter(hub, "burst_messages") > 0
    assert counter(hub, "coalesced_writes") >= len(plain)
    for ws in plain + deflate:
        await ws.close()


async def test_a_history_channel_in_a_burst_keeps_its_offsets_in_order_with_repair(
        make_hub, redis_server):
    lost = []

    def prepare(hub: Hub) -> None:  # before the link starts: it takes the node's method then
        original = hub.node.on_publications

        def losing(publications):  # offset 3 of the burst is lost: a repair must fill it
            kept = [p for p in publications if not (p.channel == "chat:x" and p.offset == 3)]
            lost.extend(p for p in publications if p not in kept)
            original(kept)

        hub.node.on_publications = losing

    hub = await make_hub(prepare, namespaces=HISTORY)
    node = hub.node
    ws = await client(hub, "alice", ["chat:x", "a"])
    with Publisher(redis_server.url, namespaces=dict(HISTORY)) as pub:
        for n in range(1, 21):
            assert pub.publish("chat:x", {"n": n}).offset == n
            pub.publish("a", {"n": n})
    frames = await receive(ws, 40)
    chat = [(m["offset"], m["data"]["n"]) for m in frames if m["channel"] == "chat:x"]
    plain = [m["data"]["n"] for m in frames if m["channel"] == "a"]
    assert chat == [(n, n) for n in range(1, 21)]
    assert plain == list(range(1, 21))
    assert [p.offset for p in lost] == [3]
    assert node.metrics.history_repairs._value.get() >= 1
    assert counter(hub, "burst_messages") > 0
    await ws.close()


@pytest.mark.cluster
async def test_the_cluster_broker_hands_sharded_bursts_over_too(cluster):
    hub = Hub(Config(port=0, redis_url=(cluster.url,), redis_cluster=True, log_level="warning"))
    await hub.start()
    try:
        await wait_until_async(lambda: hub.node.ready, 20, what="the cluster links")
        ws = await client(hub, "alice", ["room"])
        with Publisher(cluster.url, cluster=True) as pub:
            for n in range(40):  # SPUBLISH, while the loop is blocked: a burst of smessages
                pub.publish("room", {"n": n})
        assert [m["data"]["n"] for m in await receive(ws, 40)] == list(range(40))
        assert counter(hub, "burst_messages") > 0
        await ws.close()
    finally:
        await hub.stop()
