"""Coalesced writes without sockets: a burst of broker publications reaches each connection in
one transport write, in order, and the brokers pass bursts through (docs/benchmarks.md,
"Coalesced writes"). The real link and real connections: tests/integration/test_coalesce.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from hub.brokers import Publication
from hub.brokers.base import batch_handler
from hub.brokers.memory import MemoryBroker
from hub.brokers.sharded import ShardedBroker
from hub.connection import begin_burst, end_burst, fan_out, flush_burst
from hub.control import VERSION
from hub.node import Node


class WireConn:
    """An open connection without extensions whose transport keeps each write apart."""

    def __init__(self, user: str, *, open_: bool = True) -> None:
        self.user = user
        self.dropping = False
        self.protocol = SimpleNamespace(state=State.OPEN if open_ else State.CLOSED,
                                        extensions=[])
        self.writes: list[bytes] = []
        self.transport = SimpleNamespace(write=self.writes.append, is_closing=lambda: False,
                                         abort=lambda: None)
        self.closed: list[int] = []

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed.append(code)
        self.protocol.state = State.CLOSED

    def frames(self) -> list[dict]:
        """Every text frame written, in order, parsed (unmasked server frames)."""
        data = b"".join(self.writes)
        out = []
        while data:
            length = data[1] & 0x7F
            start = 2
            if length == 126:
                length, start = int.from_bytes(data[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(data[2:10], "big"), 10
            assert data[0] == 0x81  # FIN, text
            out.append(orjson.loads(data[start:start + length]))
            data = data[start + length:]
        return out


def pub(channel: str, n: int) -> Publication:
    return Publication(channel, orjson.dumps({"n": n}))


async def _node_with(subscriptions: dict[str, list[str]]) -> tuple[Node, dict[str, WireConn]]:
    node = Node(MemoryBroker())
    await node.start()
    conns = {}
    for user, channels in subscriptions.items():
        conn = conns[user] = WireConn(user)
        node.attach(conn)
        for channel in channels:
            await node.subscribe(conn, channel)
    return node, conns


def seen(conn: WireConn) -> list[tuple[str, int]]:
    return [(f["channel"], f["data"]["n"]) for f in conn.frames()]


async def test_a_burst_is_one_write_per_connection_in_order_over_several_channels():
    node, conns = await _node_with({"ab": ["a", "b"], "bc": ["b", "c"], "abc": ["a", "b", "c"],
                                    "a": ["a"], "none": []})
    closed = WireConn("closed", open_=False)
    node.attach(closed)
    await node.subscribe(closed, "a")
    burst = [pub("abc"[i % 3], i) for i in range(30)]
    node.on_publications(burst)
    for user, conn in conns.items():
        expected = [(p.channel, i) for i, p in enumerate(burst) if p.channel in user]
        assert seen(conn) == expected, user
        assert len(conn.writes) == (1 if expected else 0), user
    assert closed.writes == []
    assert node.metrics.burst_messages._value.get() == 30
    assert node.metrics.coalesced_writes._value.get() == 4
    # as for single messages, every registered recipient counts (the closed one too)
    assert node.metrics.deliveries._value.get() == 10 * 4 + 10 * 3 + 10 * 2


async def test_one_channel_bursts_share_one_concatenation_and_single_messages_are_written_alone():
    node, conns = await _node_with({f"u{i}": ["a"] for i in range(3)})
    node.on_publications([pub("a", 0)])  # a burst of one: the ordinary path
    node.on_publication(pub("a", 1))
    node.on_publications([pub("a", n) for n in range(2, 6)])
    for conn in conns.values():
        assert [len(w) for w in conn.writes[:2]] == [len(conn.writes[0])] * 2
        assert len(conn.writes) == 3
        assert seen(conn) == [("a", n) for n in range(6)]
    assert node.metrics.burst_messages._value.get() == 4
    assert node.metrics.coalesced_writes._value.get() == 3


async def test_a_control_message_inside_a_burst_sees_the_frames_before_it_written():
    node, conns = await _node_with({"alice": ["a"], "bob": ["a"]})
    await node.subscribe_reserved("$control")
    disconnect = Publication("$control", orjson.dumps(
        {"v": VERSION, "type": "disconnect", "user": "alice", "code": 4003, "reason": ""}))
    node.on_publications([pub("a", 0), pub("a", 1), disconnect, pub("a", 2)])
    await asyncio.sleep(0.01)
    assert seen(conns["alice"]) == [("a", 0), ("a", 1)]  # before its disconnect, not after
    assert conns["alice"].closed == [4003]
    assert seen(conns["bob"]) == [("a", 0), ("a", 1), ("a", 2)]
    assert len(conns["bob"].writes) == 2  # flushed at the control message, then the rest
    assert node.metrics.coalesced_writes._value.get() == 2  # alice's and bob's first


async def test_a_failing_publication_costs_only_itself():
    node, conns = await _node_with({"alice": ["a"]})
    calls = []
    original = node.on_publication

    def flaky(publication: Publication) -> None:
        calls.append(publication)
        if publication.payload == b"boom":
            raise RuntimeError("boom")
        original(publication)

    node.on_publication = flaky  # type: ignore[method-assign]
    node.on_publications([pub("a", 0), Publication("a", b"boom"), pub("a", 2)])
    assert seen(conns["alice"]) == [("a", 0), ("a", 2)]
    assert len(calls) == 3


def test_bursts_do_not_nest_and_flush_keeps_the_burst_open():
    conn = WireConn("alice")
    text = b'{"type":"message","channel":"a","data":1}'
    wire = Frame(Opcode.TEXT, text).serialize(mask=False, extensions=[])
    assert begin_burst()
    try:
        assert not begin_burst()  # the outer burst's owner ends it
        fan_out([conn], text)
        fan_out([conn], text)
        assert conn.writes == []
        flush_burst()
        assert conn.writes == [wire + wire]
        fan_out([conn], text)
    finally:
        assert end_burst() == 1  # the flushed write of two frames; the last was alone
    assert conn.writes == [wire + wire, wire]
    fan_out([conn], text)  # outside a burst: written at once
    flush_burst()
    assert conn.writes[-1] == wire and end_burst() == 0


class Recorder:
    def __init__(self) -> None:
        self.single: list[Publication] = []
        self.bursts: list[list[Publication]] = []

    def on_publication(self, publication: Publication) -> None:
        self.single.append(publication)

    def on_publications(self, publications: list[Publication]) -> None:
        self.bursts.append(publications)

    def on_gap(self, channels: list[str]) -> None:
        pass

    def on_state(self, connected: bool) -> None:
        pass


class SingleOnly:
    def __init__(self) -> None:
        self.single: list[Publication] = []

    def on_publication(self, publication: Publication) -> None:
        if publication.payload == b"boom":
            raise RuntimeError("boom")
        self.single.append(publication)

    def on_gap(self, channels: list[str]) -> None:
        pass

    def on_state(self, connected: bool) -> None:
        pass


def test_batch_handler_uses_on_publications_or_loops_over_on_publication():
    recorder = Recorder()
    burst = [pub("a", 0), pub("b", 1)]
    batch_handler(recorder)(burst)
    assert recorder.bursts == [burst] and recorder.single == []
    single = SingleOnly()
    batch_handler(single)([pub("a", 0), Publication("a", b"boom"), pub("a", 2)])
    assert [p.payload for p in single.single] == [b'{"n":0}', b'{"n":2}']


def test_the_sharded_relay_passes_bursts_to_the_handler():
    sharded = ShardedBroker([MemoryBroker(), MemoryBroker()])
    recorder = Recorder()
    sharded.bind(recorder)
    for shard in sharded.shards:
        relay = shard.handler
        burst = [pub("a", 0), pub("a", 1)]
        batch_handler(relay)(burst)
        assert recorder.bursts[-1] == burst
    assert recorder.single == []
