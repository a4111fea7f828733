"""HubConnection.data_received's fast path for a lone pong (hub/connection.py) on real
connections: taken for one whole masked pong read at a frame boundary, and for nothing else;
whichever path a read takes, the connection ends in the same state.

Every scenario feeds the server side of a live connection the reads it names (calls of
``data_received``, as the transport makes them), once with the fast path allowed and once
with it switched off (``hub.connection._fast_pong``), and compares what is observable: the
protocol's state and close frames, the keepalive's ``ping_sent``, the frame budget, the
messages delivered, the close code the client got.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from hub import connection
from hub.connection import HubConnection, ping


def masked(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True) -> bytes:
    """One client frame (RFC 6455 section 5.2), payload under 126 bytes."""
    assert len(payload) < 126
    if not mask:
        return bytes([(0x80 if fin else 0) | opcode, len(payload)]) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + key + body


PONG = masked(0xA, b"\0\0\0\7")


class _Owner:
    def __init__(self) -> None:
        self.floods: list[HubConnection] = []

    def accepted(self, conn: HubConnection) -> None:
        pass

    def handshake_over(self, conn: HubConnection, reason: str | None) -> None:
        pass

    def forget(self, conn: HubConnection) -> None:
        pass

    def slow_consumer(self, conn: HubConnection) -> None:
        raise AssertionError("no slow consumer here")

    def frame_flood(self, conn: HubConnection) -> None:
        self.floods.append(conn)


@asynccontextmanager
async def pair(frame_rate: float = 0.0, frame_burst: float = 0.0,
               max_size: int | None = 2**20) -> AsyncIterator[
                   tuple[HubConnection, ClientConnection, _Owner]]:
    """One server-side HubConnection and its client, OPEN and idle."""
    owner = _Owner()
    conns: list[HubConnection] = []
    opened = asyncio.Event()

    async def handler(conn: HubConnection) -> None:
        conns.append(conn)
        opened.set()
        await conn.wait_closed()

    cls = type("TestConnection", (HubConnection,),
               {"owner": owner, "frame_rate": frame_rate, "frame_burst": frame_burst})
    async with serve(handler, "127.0.0.1", 0, create_connection=cls,  # type: ignore[arg-type]
                     compression=None, ping_interval=None, max_size=max_size) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None,
                           ping_interval=None) as client:
            await asyncio.wait_for(opened.wait(), 5)
            yield conns[0], client, owner


async def outcome(conn: HubConnection, client: ClientConnection,
                  owner: _Owner) -> dict[str, Any]:
    """What the reads did, once the loop has run what they scheduled."""
    await asyncio.sleep(0.05)
    protocol = conn.protocol
    messages = []
    while conn.recv_messages.frames.queue:
        messages.append(await asyncio.wait_for(conn.recv(), 1))
    closed_with = None
    if protocol.close_sent is not None:
        try:
            await asyncio.wait_for(client.recv(), 2)
        except ConnectionClosed as exc:
            closed_with = exc.rcvd.code if exc.rcvd else None
    return {"state": protocol.state.name, "ping_sent": conn.ping_sent,
            "close_sent": protocol.close_sent and protocol.close_sent.code,
            "close_rcvd": protocol.close_rcvd and protocol.close_rcvd.code,
            "frames": round(conn.frames, 3), "dropping": conn.dropping,
            "floods": len(owner.floods), "messages": messages, "client_got": closed_with,
            "pending_pings": len(conn.pending_pings)}


async def feed(reads: Sequence[bytes], fast: bool, before: Any = None,
               **limits: Any) -> tuple[dict[str, Any], int]:
    """Run ``reads`` through a fresh connection; return its outcome and the pongs that took
    the fast path."""
    saved = connection._fast_pong
    connection._fast_pong = fast
    try:
        async with pair(**limits) as (conn, client, owner):
            if before is not None:
                await before(conn)
            conn.ping_sent = 12.5  # a keepalive ping awaits its pong
            taken = connection.fast_pongs
            for data in reads:
                conn.data_received(data)
            taken = connection.fast_pongs - taken
            result = await outcome(conn, client, owner)
            if limits.get("frame_rate"):
                result["frames"] = None  # refilled with the clock: compared by floods only
            return result, taken
    finally:
        connection._fast_pong = saved


async def both(reads: Sequence[bytes], before: Any = None, **limits: Any) -> tuple[
        dict[str, Any], int]:
    """``reads`` with and without the fast path: the outcomes must be equal."""
    fast, taken = await feed(reads, True, before, **limits)
    slow, untaken = await feed(reads, False, before, **limits)
    assert untaken == 0
    assert fast == slow
    return fast, taken


async def test_a_lone_pong_takes_the_fast_path_and_leaves_the_parser_at_a_frame_boundary():
    text = masked(0x1, b'{"n":1}')
    result, taken = await both([PONG, text, PONG])
    assert taken == 2
    assert result["ping_sent"] == 0.0 and result["state"] == "OPEN"
    assert result["messages"] == ['{"n":1}']


async def test_an_empty_and_a_125_byte_pong_take_it_too():
    result, taken = await both([masked(0xA), masked(0xA, b"x" * 125)])
    assert taken == 2 and result["ping_sent"] == 0.0


async def test_a_pong_split_over_two_reads_goes_to_the_library():
    for cut in (1, 2, 5):
        result, taken = await both([PONG[:cut], PONG[cut:]])
        assert taken == 0
        assert result["ping_sent"] == 0.0 and result["state"] == "OPEN"


async def test_a_pong_glued_to_a_data_frame_goes_to_the_library():
    text = masked(0x1, b'{"n":2}')
    for reads in ([PONG + text], [text + PONG]):
        result, taken = await both(reads)
        assert taken == 0
        assert result["ping_sent"] == 0.0 and result["messages"] == ['{"n":2}']


async def test_bytes_looking_like_a_pong_after_a_frame_header_are_that_frame_s_payload():
    """The boundary check: a binary frame's header (and masking key) arrived alone; its 8
    payload bytes look like a whole masked pong of 2 bytes."""
    looks = bytes([0x8A, 0x82, 1, 2, 3, 4, 5, 6])
    header = bytes([0x82, 0x80 | len(looks)]) + bytes(4)  # a zero masking key: as is
    result, taken = await both([header, looks])
    assert taken == 0
    assert result["messages"] == [looks]
    assert result["ping_sent"] == 12.5  # no pong came: the keepalive's ping is unanswered


async def test_an_unmasked_pong_fails_the_connection_with_1002_as_the_library_does():
    result, taken = await both([masked(0xA, b"\0\0\0\7", mask=False)])
    assert taken == 0
    assert result["close_sent"] == 1002 and result["client_got"] == 1002
    assert result["ping_sent"] == 12.5


async def test_a_pong_with_a_reserved_bit_or_without_fin_goes_to_the_library():
    for first in (0xCA, 0x0A):  # RSV1; no FIN (a fragmented control frame)
        data = bytes([first]) + PONG[1:]
        result, taken = await both([data])
        assert taken == 0 and result["close_sent"] == 1002


async def test_a_pong_while_closing_goes_to_the_library():
    async def start_closing(conn: HubConnection) -> None:
        conn.protocol.send_close(1000, "bye")
        conn.send_data()

    result, taken = await both([PONG], before=start_closing)
    assert taken == 0 and result["state"] in ("CLOSING", "CLOSED")


async def test_a_pong_in_the_middle_of_a_fragmented_message_goes_to_the_library():
    first = masked(0x1, b'{"n":', fin=False)
    rest = masked(0x0, b'3}')
    result, taken = await both([first, PONG, rest])
    assert taken == 0
    assert result["ping_sent"] == 0.0 and result["messages"] == ['{"n":3}']


async def test_a_pong_over_the_size_limit_goes_to_the_library():
    result, taken = await both([masked(0xA, b"x" * 20)], max_size=10)
    assert taken == 0 and result["close_sent"] == 1009


async def test_a_pong_the_library_waits_for_goes_to_the_library():
    waiter: list[Any] = []

    async def library_ping(conn: HubConnection) -> None:
        waiter.append(await conn.ping(b"\0\0\0\7"))

    result, taken = await both([PONG], before=library_ping)
    assert taken == 0 and result["pending_pings"] == 0
    assert waiter[0].done()  # the library's ping got its pong


@pytest.mark.parametrize("pongs", [3, 6])
async def test_the_frame_budget_counts_fast_path_pongs(pongs: int):
    """--max-frame-rate: 1 frame/s, a bucket of 4; the fifth frame in a row is a flood."""
    result, taken = await both([PONG] * pongs, frame_rate=1.0, frame_burst=4.0)
    assert taken == pongs
    assert result["floods"] == (1 if pongs > 4 else 0)
    assert result["dropping"] is (pongs > 4)


async def test_a_keepalive_ping_answered_over_a_real_socket_takes_the_fast_path():
    async with pair() as (conn, client, _owner):
        taken = connection.fast_pongs
        conn.ping_sent = 1.0
        assert ping([conn], b"\0\0\0\1") == 1  # the client (websockets) answers it
        for _ in range(100):
            if conn.ping_sent == 0.0:
                break
            await asyncio.sleep(0.01)
        assert conn.ping_sent == 0.0
        assert connection.fast_pongs == taken + 1
        await client.send("after")  # the parser is still at a frame boundary
        assert await asyncio.wait_for(conn.recv(), 2) == "after"
