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
