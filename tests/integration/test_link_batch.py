"""The link batches its (S)SUBSCRIBE and (S)UNSUBSCRIBE: a real redis-server (and a real
three-master cluster), the commands counted by Redis itself (``INFO commandstats``).

Every (un)subscribe asked of a :class:`~hub.brokers.link.PubSubLink` within one event-loop
iteration goes out as one command per flavour (one per hash slot on a cluster) at the start of
the next one; the last word on a channel wins; a link lost with a batch pending resubscribes
what its owner wants. Also guarded here: the details of redis-py the link writes through
(``Connection.pack_commands`` and the connection's stream writer, :meth:`PubSubLink._write`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

import tests.conftest
from hub.brokers.base import BrokerHandler, Publication
from hub.brokers.cluster import ClusterBroker
from hub.brokers.link import PubSubLink
from hub.brokers.redis import RedisBroker
from tests.helpers import wait_until_async

PREFIX = b"hub:"
cluster = tests.conftest.cluster


class Owner:
    """A :class:`~hub.brokers.link.LinkOwner` that wants what the test says and records
    every hook."""

    def __init__(self) -> None:
        self.want: set[str] = set()
        self.confirms: list[str] = []
        self.drops: list[str] = []
        self.ready = 0
        self.lost = 0

    def probe_channel(self, link: PubSubLink) -> bytes:
        return PREFIX + b"$probe:test"

    def wanted(self, link: PubSubLink) -> set[str]:
        return set(self.want)

    def carries(self, link: PubSubLink, channel: str) -> bool:
        return channel in self.want

    def confirmed(self, link: PubSubLink, channel: str) -> None:
        self.confirms.append(channel)

    def dropped(self, link: PubSubLink, channel: str) -> bool:
        self.drops.append(channel)
        return channel not in self.want

    def link_ready(self, link: PubSubLink, reconnect: bool) -> None:
        self.ready += 1

    def link_lost(self, link: PubSubLink, was_ready: bool) -> None:
        self.lost += 1

    def refused(self, link: PubSubLink, exc: Exception) -> None:
        raise exc


class Handler(BrokerHandler):
    def __init__(self) -> None:
        self.got: list[Publication] = []

    def on_publication(self, publication: Publication) -> None:
        self.got.append(publication)

    def on_gap(self, channels: list[str]) -> None:
        pass

    def on_state(self, connected: bool) -> None:
        pass


@pytest.fixture
async def admin(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def link(redis_server) -> AsyncIterator[tuple[PubSubLink, Owner, Handler]]:
    owner, handler = Owner(), Handler()
    link = PubSubLink(redis_server.url, owner, prefix=PREFIX, probe_interval=0.2, timeout=2.0)
    link.start(handler.on_publication)
    await wait_until_async(lambda: link.ready, 10, what="the link")
    yield link, owner, handler
    await link.stop()


async def calls(client: aioredis.Redis, command: str) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def numsub(client: aioredis.Redis, channel: str) -> int:
    return int((await client.pubsub_numsub(PREFIX + channel.encode()))[0][1])


async def test_subscribes_of_one_iteration_go_out_as_one_command(redis_server, admin):
    broker = RedisBroker(redis_server.url, probe_interval=0.2)
    handler = Handler()
    broker.bind(handler)
    await broker.start()
    try:
        await wait_until_async(lambda: broker.connected, 10, what="the broker")
        await admin.config_resetstat()
        channels = [f"user:{i}" for i in range(200)]
        # 200 handshakes' personal channels asked for at once: every one is confirmed...
        await asyncio.gather(*(broker.subscribe(c, 5.0) for c in channels))
        assert all(broker.is_live(c) for c in channels)
        # ... by Redis, after ONE SUBSCRIBE (it was 200 before the batching).
        assert await calls(admin, "subscribe") == 1
        assert [await numsub(admin, c) for c in channels[::50]] == [1, 1, 1, 1]
        await admin.publish(b"hub:user:7", b"hello")
        await wait_until_async(lambda: handler.got, 5, what="the message")
        assert [(p.channel, p.payload) for p in handler.got] == [("user:7", b"hello")]
        # The unsubscribes of one iteration: one UNSUBSCRIBE too.
        await asyncio.gather(*(broker.unsubscribe(c) for c in channels))
        assert not any(broker.is_live(c) for c in channels)
        await broker.subscribe("last", 5.0)  # confirmed after the UNSUBSCRIBE is done
        assert [await numsub(admin, c) for c in channels[::50]] == [0, 0, 0, 0]
        assert await calls(admin, "unsubscribe") == 1
    finally:
        await broker.stop()


async def test_subscribe_then_unsubscribe_in_one_iteration_ends_unsubscribed(link, admin):
    link_, owner, _ = link
    await admin.config_resetstat()
    owner.want |= {"b"}
    await link_.subscribe("a")  # wanted, then not, within the same iteration
    await link_.subscribe("b")
    await link_.unsubscribe("a")
    await wait_until_async(lambda: "b" in owner.confirms, 5, what="b confirmed")
    # Redis runs the batch's UNSUBSCRIBE before its SUBSCRIBE: both are done by now.
    assert await numsub(admin, "a") == 0
    assert await numsub(admin, "b") == 1
    assert "a" not in owner.confirms and not link_.is_live("a") and link_.is_live("b")
    assert await calls(admin, "subscribe") == 1
    assert await calls(admin, "unsubscribe") == 1


async def test_unsubscribe_then_subscribe_in_one_iteration_ends_subscribed(link, admin):
    link_, owner, _ = link
    owner.want |= {"a", "z"}
    await link_.subscribe("a")
    await wait_until_async(lambda: link_.is_live("a"), 5, what="a live")
    owner.confirms.clear()
    await admin.config_resetstat()
    await link_.unsubscribe("a")  # let go, then wanted again, within the same iteration
    assert not link_.is_live("a")
    await link_.subscribe("a")
    await wait_until_async(lambda: link_.is_live("a"), 5, what="a live again")
    assert owner.confirms == ["a"]
    assert await numsub(admin, "a") == 1
    assert await calls(admin, "unsubscribe") == 0  # the last word won: no UNSUBSCRIBE sent
    assert await calls(admin, "subscribe") == 1
    # And across iterations the order is kept: unsubscribe, a batch later subscribe.
    await link_.unsubscribe("a")
    await asyncio.sleep(0)
    await link_.subscribe("a")
    await link_.subscribe("z")
    await wait_until_async(lambda: link_.is_live("a") and link_.is_live("z"), 5, what="a, z")
    assert await numsub(admin, "a") == 1


async def test_a_link_lost_with_a_batch_pending_resubscribes_what_is_wanted(link, admin):
    link_, owner, handler = link
    owner.want |= {"x", "y"}
    await link_.subscribe("x")
    await link_.subscribe("y")
    await link_.subscribe("gone")  # queued, then not wanted, then the link is lost
    owner.want.discard("gone")
    # Lost in the same iteration, before the batch goes out: the write must not raise, the
    # link is rebuilt and subscribes what the owner wants (and only that).
    pubsub = link_._pubsub
    assert pubsub is not None and pubsub.connection is not None
    pubsub.connection._writer.transport.abort()
    await wait_until_async(lambda: link_.reconnects == 1 and link_.ready, 10, what="a new link")
    assert link_.is_live("x") and link_.is_live("y") and not link_.is_live("gone")
    assert await numsub(admin, "gone") == 0
    assert await numsub(admin, "x") == 1
    await admin.publish(b"hub:y", b"after")
    await wait_until_async(lambda: handler.got, 5, what="the message")
    assert handler.got[0].channel == "y"
    # New subscribes on the new connection are batched as before.
    owner.want |= {"n1", "n2"}
    await link_.subscribe("n1")
    await link_.subscribe("n2")
    await wait_until_async(lambda: link_.is_live("n1") and link_.is_live("n2"), 5, what="n")


def same_slot(count: int, start: int = 0) -> list[str]:
    """``count`` channel names whose keys ``hub:<name>`` share one hash slot."""
    slot = key_slot(PREFIX + f"s{start}".encode())
    names, i = [f"s{start}"], start + 1
    while len(names) < count:
        if key_slot(PREFIX + f"s{i}".encode()) == slot:
            names.append(f"s{i}")
        i += 1
    return names


@pytest.mark.cluster
async def test_a_cluster_batch_is_one_ssubscribe_per_hash_slot(cluster):
    broker = ClusterBroker(cluster.url, probe_interval=0.2)
    broker.bind(Handler())
    await broker.start()
    try:
        await wait_until_async(lambda: broker.connected, 15, what="the cluster links")
        clients = {port: aioredis.Redis(port=port) for port in cluster.masters()}
        for client in clients.values():
            await client.config_resetstat()
        grouped = same_slot(4)
        channels = grouped + [f"c{i}" for i in range(60)]
        owner = {c: cluster.owner(c) for c in channels}
        await asyncio.gather(*(broker.subscribe(c, 5.0) for c in channels))
        assert all(broker.is_live(c) for c in channels)
        for port, client in clients.items():
            mine = [c for c in channels if owner[c] == port]
            slots = {key_slot(PREFIX + c.encode()) for c in mine}
            assert len(slots) < len(mine) or not set(grouped) & set(mine)
            # One SSUBSCRIBE per hash slot of this master's channels (no CROSSSLOT refusal;
            # the probe's own is not counted: the stats were reset after it).
            assert await calls(client, "ssubscribe") == len(slots), port
            assert all(cluster.shardnumsub(port, c) == 1 for c in mine)
        await asyncio.gather(*(broker.unsubscribe(c) for c in channels))
        for c in channels:
            await wait_until_async(lambda c=c: cluster.shardnumsub(owner[c], c) == 0,
                                   5, what=f"{c} unsubscribed")
        for port, client in clients.items():
            mine = [c for c in channels if owner[c] == port]
            assert await calls(client, "sunsubscribe") == len(
                {key_slot(PREFIX + c.encode()) for c in mine}), port
        for client in clients.values():
            await client.aclose()
    finally:
        await broker.stop()
