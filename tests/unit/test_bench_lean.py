"""The benchmark's lean client reads what the websockets library writes (bench/lean.py).

The lean client replaces the library's frame reader in the load generator; these tests feed
it frames serialized by ``websockets.frames.Frame`` (as every server under test sends them),
whole and cut into arbitrary pieces, and check every message comes out intact, pings are
answered and a close is echoed. No network: a fake transport records what it writes.
"""

from __future__ import annotations

import random

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side, State

from bench.client import decode_hub, decode_socketio, fields
from bench.lean import LeanConnection


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def server_bytes(*frames: Frame) -> bytes:
    return b"".join(f.serialize(mask=False, extensions=[]) for f in frames)


def client_frames(data: bytes) -> list[Frame]:
    """Parse what the lean client wrote, as a server would (masked frames required)."""
    server = Protocol(Side.SERVER, state=State.OPEN)
    server.receive_data(data)
    return [e for e in server.events_received() if isinstance(e, Frame)]


def open_connection() -> tuple[LeanConnection, FakeTransport, list[bytes]]:
    conn = LeanConnection("ws://127.0.0.1:9/")
    transport = FakeTransport()
    conn.transport = transport  # type: ignore[assignment]
    conn.state = "OPEN"
    got: list[bytes] = []
    conn.on_message = got.append
    return conn, transport, got


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
async def test_payload_lengths_7_16_64_bit(size):
    conn, _, got = open_connection()
    payload = bytes(random.Random(size).randrange(256) for _ in range(min(size, 1000)))
    payload = (payload * (size // max(len(payload), 1) + 1))[:size]
    conn.data_received(server_bytes(Frame(Opcode.BINARY, payload)))
    assert got == [payload]


async def test_frames_cut_anywhere_and_fragmented_messages():
    conn, transport, got = open_connection()
    messages = [b'{"r":1,"s":%d,"t":1.5,"p":"x"}' % i for i in range(50)] + [b"y" * 70000]
    frames = [Frame(Opcode.TEXT, m) for m in messages]
    # One message in three fragments (RFC 6455 section 5.4), a ping between them.
    frames += [Frame(Opcode.TEXT, b"part1-", fin=False), Frame(Opcode.PING, b"pp"),
               Frame(Opcode.CONT, b"part2-", fin=False), Frame(Opcode.CONT, b"end")]
    data = server_bytes(*frames)
    rng = random.Random(7)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 10, 200, 5000])
        conn.data_received(data[pos:pos + step])
        pos += step
    assert got == [*messages, b"part1-part2-end"]
    pongs = client_frames(b"".join(transport.written))
    assert [(f.opcode, f.data) for f in pongs] == [(Opcode.PONG, b"pp")]


async def test_close_is_echoed_and_masked_frames_refused():
    conn, transport, _ = open_connection()
    conn.data_received(server_bytes(Frame(Opcode.CLOSE, Close(1001, "bye").serialize())))
    assert conn.state == "CLOSED"
    (echo,) = client_frames(b"".join(transport.written))
    assert echo.opcode is Opcode.CLOSE and Close.parse(echo.data).code == 1001

    conn, transport, got = open_connection()
    conn.data_received(Frame(Opcode.TEXT, b"hi").serialize(mask=True, extensions=[]))
    assert got == [] and conn.state == "CLOSED" and transport.closed


async def test_sent_messages_are_masked_text_frames():
    conn, transport, _ = open_connection()
    await conn.send(b'{"op":"subscribe","channel":"bench","id":1}')
    (frame,) = client_frames(b"".join(transport.written))
    assert frame.opcode is Opcode.TEXT and frame.data.startswith(b'{"op":"subscribe"')


def test_delivery_fields_without_a_json_parse():
    body = b'{"r":3,"s":9,"t":1763800000.123456,"p":"xxxx"}'
    assert fields(body) == (3, 1763800000.123456)
    assert decode_hub(b'{"type":"message","channel":"bench","data":' + body + b"}") == (
        3, 1763800000.123456)
    assert decode_hub(b'{"type":"ack","id":1}') is None
    spaced = b'42["msg", {"r": 3, "s": 9, "t": 1763800000.5, "p": "xx"}]'
    assert decode_socketio(spaced) == (3, 1763800000.5)  # re-encoded with spaces
    assert decode_socketio(b'42["msg",{"r":3,"s":9,"t":1763800000.5,"p":"xx"}]') == (
        3, 1763800000.5)
