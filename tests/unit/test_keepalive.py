"""The hub's keepalive (hub/keepalive.py) without sockets: which connection is pinged at which
visit, a missing pong fails it at the next visit of its slice, a pong keeps it, a closed one
is skipped, and the ping written is one valid RFC 6455 ping frame for every connection.

Fake connections carry what :class:`hub.keepalive.Keepalive` and :func:`hub.connection.ping`
read (``is_open``, ``protocol.state``, ``transport``); the real ones are exercised in
tests/system/test_keepalive.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.streams import StreamReader

from hub.keepalive import Keepalive


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeProtocol:
    def __init__(self) -> None:
        self.state = State.OPEN


class FakeConn:
    """What the keepalive touches of a HubConnection."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.protocol = FakeProtocol()
        self.ping_sent = 0.0
        self.ping_slice = -1
        self.failed = 0

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN

    def keepalive_timeout(self) -> None:
        self.failed += 1
        self.protocol.state = State.CLOSING

    def pong(self) -> None:  # what HubConnection.process_event does on a pong frame
        self.ping_sent = 0.0


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


def keepalive(slices: int = 4, interval: float = 4.0) -> tuple[Keepalive, list[float]]:
    now = [100.0]
    return Keepalive(interval, slices=slices, clock=lambda: now[0]), now


def visit_round(ka: Keepalive) -> None:
    for _ in ka.slices:
        ka.visit()


def test_slices_and_tick_follow_the_interval() -> None:
    assert len(Keepalive(20.0).slices) == 20 and Keepalive(20.0).tick == 1.0
    assert len(Keepalive(1.0).slices) == 4 and Keepalive(1.0).tick == 0.25  # at least 4
    assert len(Keepalive(0.5, slices=2).slices) == 2
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Keepalive(bad)


def test_a_new_connection_is_first_pinged_one_interval_later() -> None:
    ka, _ = keepalive(slices=4)
    ka.visit()  # slice 0 visited; the next visit is slice 1
    conn = FakeConn()
    ka.add(conn)  # type: ignore[arg-type]
    assert conn.ping_slice == 0 and len(ka) == 1
    for _ in range(3):  # slices 1, 2, 3: not its turn
        ka.visit()
        assert conn.transport.written == []
    ka.visit()  # slice 0 again: one interval after it joined
    assert len(conn.transport.written) == 1


def test_ping_is_one_frame_written_to_every_connection_of_the_slice() -> None:
    ka, _ = keepalive(slices=1)
    conns = [FakeConn() for _ in range(5)]
    for conn in conns:
        ka.add(conn)  # type: ignore[arg-type]
    ka.visit()
    wires = {c.transport.written[0] for c in conns}
    assert len(wires) == 1 and all(len(c.transport.written) == 1 for c in conns)
    frame = parse(wires.pop())
    assert frame.opcode is Opcode.PING and frame.fin and len(frame.data) == 4
    assert ka.pings_sent == 5
    for conn in conns:
        conn.pong()
    ka.visit()  # the next round: a new payload, so pings of two rounds differ
    assert parse(conns[0].transport.written[-1]).data != frame.data


def test_missing_pong_fails_at_the_next_visit_a_pong_keeps_it() -> None:
    ka, now = keepalive(slices=2)
    silent, live = FakeConn(), FakeConn()
    ka.add(silent)  # type: ignore[arg-type]
    ka.add(live)  # type: ignore[arg-type]
    visit_round(ka)  # both pinged (their slice came round)
    assert silent.ping_sent == now[0] and live.ping_sent == now[0]
    live.pong()
    visit_round(ka)
    assert silent.failed == 1 and live.failed == 0
    assert len(live.transport.written) == 2  # pinged again
    assert len(silent.transport.written) == 1  # failed, not pinged again
    assert ka.timeouts == 1
    for _ in range(3):  # the failed one is closing: skipped until connection_lost
        live.pong()
        visit_round(ka)
    assert silent.failed == 1 and live.failed == 0 and len(live.transport.written) == 5


def test_discard_and_closing_transports() -> None:
    ka, _ = keepalive(slices=1)
    gone, closing = FakeConn(), FakeConn()
    for conn in (gone, closing):
        ka.add(conn)  # type: ignore[arg-type]
    ka.discard(gone)  # type: ignore[arg-type]
    ka.discard(gone)  # type: ignore[arg-type]  # idempotent
    assert gone.ping_slice == -1 and len(ka) == 1
    closing.transport.closing = True  # reset by the peer, connection_lost not yet run
    ka.visit()
    assert gone.transport.written == [] and closing.transport.written == []
    assert ka.pings_sent == 0


async def test_the_timer_visits_one_slice_per_tick() -> None:
    import asyncio

    ka = Keepalive(0.2, slices=4)  # a tick of 50 ms
    conns: list[Any] = [FakeConn() for _ in range(8)]
    ka.start()
    try:
        for i, conn in enumerate(conns):
            ka.add(conn)
            if i % 2:
                await asyncio.sleep(0.05)
        for _ in range(100):  # every connection pinged within about one interval
            if all(c.transport.written for c in conns):
                break
            await asyncio.sleep(0.02)
        assert all(c.transport.written for c in conns)
    finally:
        ka.stop()
        ka.stop()
