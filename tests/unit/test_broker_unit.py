"""Broker pieces without a network: stop_task, the memory broker, the factory, binding."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from websockets.protocol import State

from hub.brokers import Publication, create_broker
from hub.brokers.link import redact_url, stop_task
from hub.brokers.memory import MemoryBroker
from hub.brokers.redis import RedisBroker
from hub.brokers.sharded import ShardedBroker
from hub.config import Config
from hub.node import Node
from hub.sharding import shard_index


class Recorder:
    """A broker handler that writes down what it is told."""

    def __init__(self, broker=None) -> None:
        self.broker = broker
        self.publications: list[tuple[str, bytes]] = []
        self.gaps: list[list[str]] = []
        self.states: list[bool] = []

    def on_publication(self, publication: Publication) -> None:
        self.publications.append((publication.channel, publication.payload))

    def on_gap(self, channels: list[str]) -> None:
        self.gaps.append(channels)

    def on_state(self, connected: bool) -> None:
        self.states.append(connected)


def factory_args(config: Config) -> dict:
    return {"urls": config.redis_url, "cluster": config.redis_cluster,
            "prefix": config.redis_prefix, "probe_interval": config.probe_interval,
            "probe_timeout": config.probe_timeout}


async def test_stop_task_ends_a_task_that_swallows_a_cancellation():
    swallowed = 0

    async def stubborn():
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:  # what asyncio.wait_for can do on Python 3.11
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await stop_task(task, timeout=2.0)
    assert task.cancelled() and swallowed == 1


async def test_stop_task_gives_up_after_its_timeout():
    async def immortal():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    assert not await stop_task(task, timeout=0.3)
    task.get_coro().close()  # end it by force for the test's own teardown
    assert await stop_task(None)


async def test_memory_broker_delivers_in_order_after_the_publish_returns():
    broker = MemoryBroker()
    recorder = Recorder()
    broker.bind(recorder)
    got = recorder.publications
    await broker.start()
    assert broker.connected
    assert await broker.publish("news", b"0") == 0  # nobody subscribed
    await broker.subscribe("news", 1.0)
    assert broker.is_live("news")
    assert [await broker.publish("news", str(i).encode()) for i in range(3)] == [1, 1, 1]
    assert got == []  # deferred to the next loop iteration, like a real broker
    await asyncio.sleep(0)
    assert got == [("news", b"0"), ("news", b"1"), ("news", b"2")]
    await broker.unsubscribe("news")
    await broker.publish("news", b"x")
    await asyncio.sleep(0)
    assert len(got) == 3


def test_factory_picks_the_broker_from_the_config():
    assert isinstance(create_broker(**factory_args(Config())), MemoryBroker)
    one = Config(redis_url=("redis://127.0.0.1:1/0",))
    assert isinstance(create_broker(**factory_args(one)), RedisBroker)
    three = Config(redis_url=tuple(f"redis://127.0.0.1:{p}/0" for p in (1, 2, 3)))
    sharded = create_broker(**factory_args(three))
    assert isinstance(sharded, ShardedBroker) and len(sharded.shards) == 3


def test_redact_url_hides_passwords():
    assert redact_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


async def test_a_broker_is_bound_once_and_never_starts_unbound():
    broker = MemoryBroker()
    with pytest.raises(RuntimeError, match="bind"):
        await broker.start()
    broker.bind(Recorder())
    with pytest.raises(RuntimeError, match="already bound"):
        broker.bind(Recorder())
    sharded = ShardedBroker([MemoryBroker(), MemoryBroker()])
    with pytest.raises(RuntimeError, match="bind"):
        await sharded.start()
    node = Node(sharded)
    with pytest.raises(RuntimeError, match="already bound"):
        Node(sharded)  # a second node would steal the first one's messages
    with pytest.raises(RuntimeError, match="already bound"):
        sharded.shards[0].bind(node)  # the composite bound its shards


async def test_a_sharded_broker_passes_gaps_on_and_reports_its_own_state():
    sharded = ShardedBroker([MemoryBroker(), MemoryBroker()])
    recorder = Recorder()
    sharded.bind(recorder)
    await sharded.start()
    assert recorder.states == [False, True]  # shard 0 up (shard 1 not yet), then both
    sharded.shards[1].handler.on_gap(["news"])  # what a shard does after an outage
    assert recorder.gaps == [["news"]]


class WireConn:
    """An open connection without extensions whose transport keeps what is written."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.dropping = False
        self.protocol = SimpleNamespace(state=State.OPEN, extensions=[])
        self.written: list[bytes] = []
        self.transport = SimpleNamespace(write=self.written.append, is_closing=lambda: False)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        raise AssertionError("not closed in this test")


async def test_a_sharded_broker_built_outside_delivers_to_the_node():
    # Built by hand and passed in, as Node(broker) always receives it: every shard must
    # report to the node, not to callbacks set before the node existed.
    sharded = ShardedBroker([MemoryBroker(), MemoryBroker()])
    node = Node(sharded)
    await node.start()
    names = [f"news{i}" for i in range(20)]
    channels = [next(n for n in names if shard_index(n, 2) == i) for i in range(2)]
    conn = WireConn("alice")
    node.attach(conn)
    for channel in channels:
        await node.subscribe(conn, channel)
        assert await node.publish(channel, b'"hi"') == 1
    await asyncio.sleep(0)
    assert len(conn.written) == 2
    for channel, wire in zip(channels, conn.written, strict=True):
        assert b'"channel":"%s","data":"hi"' % channel.encode() in wire
    await node.stop()
