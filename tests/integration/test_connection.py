"""Guards of what hub.connection relies on in websockets' internals (the raw fan-out).

If websockets changes how its asyncio connections frame, flush or expose their protocol and
transport, these fail before users see corrupt streams: then re-check hub/connection.py and
move the pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from hub.connection import HubConnection, fan_out, send_text

ROOT = Path(__file__).resolve().parents[2]


def test_websockets_is_pinned_to_the_major_version_the_fan_out_was_checked_against():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"websockets\b", d)]
    assert spec.replace(" ", "") == "websockets>=17,<18"
    assert websockets.__version__.split(".")[0] == "17"


def test_the_raw_frame_is_the_bytes_the_library_sends_for_a_text_message():
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    text = '{"type":"message","channel":"c","data":"é"}'.encode()
    protocol.send_text(text)
    assert protocol.data_to_send() == [Frame(Opcode.TEXT, text).serialize(mask=False,
                                                                          extensions=[])]


def test_the_connection_attributes_the_hub_reads_exist():
    assert issubclass(HubConnection, ServerConnection)
    for name in ("pause_writing", "connection_lost", "respond", "close", "send", "recv"):
        assert callable(getattr(ServerConnection, name)), name
    protocol = ServerProtocol()
    for name in ("state", "extensions", "handshake_exc"):
        assert hasattr(protocol, name), name
    assert {s.name for s in State} >= {"CONNECTING", "OPEN", "CLOSING", "CLOSED"}


class _Owner:
    def __init__(self) -> None:
        self.forgotten: list[HubConnection] = []

    def forget(self, conn: HubConnection) -> None:
        self.forgotten.append(conn)

    def accepted(self, conn: HubConnection) -> None:
        pass

    def handshake_over(self, conn: HubConnection, reason: str | None) -> None:
        pass

    def slow_consumer(self, conn: HubConnection) -> None:
        raise AssertionError("no slow consumer here")


async def test_raw_fan_out_interleaves_with_library_frames_on_a_real_connection():
    owner = _Owner()
    conns: list[HubConnection] = []
    opened = asyncio.Event()

    async def handler(conn: HubConnection) -> None:
        conns.append(conn)
        opened.set()
        await conn.wait_closed()

    cls = type("TestConnection", (HubConnection,), {"owner": owner})
    async with serve(handler, "127.0.0.1", 0, create_connection=cls,  # type: ignore[arg-type]
                     compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
            await asyncio.wait_for(opened.wait(), 5)
            (conn,) = conns
            assert conn.is_open and conn.buffered == 0
            await conn.send('{"n":0}', text=True)  # a library frame
            fan_out(conns, b'{"n":1}')
            send_text(conn, b'{"n":2}')
            pong = await client.ping()  # control frames in between
            fan_out(conns, b'{"n":3}')
            await asyncio.wait_for(pong, 5)
            got = [await asyncio.wait_for(client.recv(), 5) for _ in range(4)]
            assert got == ['{"n":0}', '{"n":1}', '{"n":2}', '{"n":3}']
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert not conn.is_open
        fan_out(conns, b'{"n":4}')  # skipped: not open
        send_text(conn, b'{"n":5}')
    assert owner.forgotten == [conn]


def test_the_library_internals_the_pong_fast_path_reads():
    """HubConnection.data_received's fast path for a lone pong (hub/connection.py,
    ``_lone_pong``) decides from the parser's generator frames and a few attributes that it
    knows what the library would do. Pinned here, sans-I/O: an OPEN server protocol waits
    for a frame in ``ServerProtocol.parse`` -> ``Protocol.parse`` -> ``StreamReader.at_eof``
    (in ``Frame.parse`` once part of a frame is in), and an unsolicited pong only becomes an
    event: nothing to send, nothing else changed."""
    from websockets.protocol import Protocol
    from websockets.streams import StreamReader

    from hub import connection

    assert connection._SERVER_PARSE is ServerProtocol.parse.__code__
    assert connection._FRAMES_PARSE is Protocol.parse.__code__
    assert connection._AT_EOF is StreamReader.at_eof.__code__
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    client = ClientProtocol(parse_uri("ws://hub.test/ws"))
    client.send_request(client.connect())
    protocol = ServerProtocol()
    for data in client.data_to_send():
        protocol.receive_data(data)
    (request,) = protocol.events_received()
    protocol.send_response(protocol.accept(request))  # type: ignore[arg-type]
    assert protocol.state is State.OPEN
    protocol.data_to_send()
    for name in ("current_size", "extensions", "debug", "writes", "events",
                 "max_message_size", "max_fragment_size"):
        assert hasattr(protocol, name), name
    assert protocol.reader.buffer == b"" and protocol.reader.eof is False

    def waiting_in() -> object:
        frames = protocol.parser.gi_yieldfrom  # type: ignore[attr-defined]
        assert protocol.parser.gi_code is ServerProtocol.parse.__code__  # type: ignore[attr-defined]
        assert frames.gi_code is Protocol.parse.__code__
        return frames.gi_yieldfrom.gi_code

    assert waiting_in() is StreamReader.at_eof.__code__
    pong = bytes([0x8A, 0x84]) + bytes(4) + b"\0\0\0\7"
    protocol.receive_data(pong[:2])
    assert waiting_in() is Frame.parse.__code__
    protocol.receive_data(pong[2:])
    assert waiting_in() is StreamReader.at_eof.__code__
    assert protocol.reader.buffer == b""
    assert protocol.data_to_send() == []
    assert protocol.events_received() == [Frame(Opcode.PONG, b"\0\0\0\7")]
    assert protocol.state is State.OPEN and protocol.current_size is None
    # The asyncio connection: pings of its own wait in pending_pings; an unsolicited pong
    # only reaches acknowledge_pings, which ignores it.
    from websockets.asyncio.connection import Connection

    assert Connection.process_event.__code__.co_names.count("acknowledge_pings") == 1
    assert "pending_pings" in Connection.acknowledge_pings.__code__.co_names
