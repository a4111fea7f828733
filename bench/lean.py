"""A lean WebSocket client connection for the load generator.

Why not ``websockets.asyncio.client.connect`` for the clients: on the 2-core machines the
benchmark runs on, servers and clients share the cores, so every microsecond a client spends
per delivery is taken from the server under test. Measured on such a machine, the library's
sans-I/O reader alone costs about 9-10 us per 150-byte frame (``Protocol.receive_data`` +
``events_received``), and the asyncio connection on top of it (message assembler, ``recv()``
future, one task wake-up per message) brought a client delivery to about 20 us: more than
the servers' own 8-13 us per delivery. This connection keeps the library where correctness
lives and only replaces the per-frame read path:

* the opening handshake is built and *validated* by ``websockets.client.ClientProtocol``
  (request, ``Sec-WebSocket-Accept``, status; RFC 6455 section 4): the response bytes are
  fed to it up to the blank line that ends them;
* every frame this client sends (subscribe, Engine.IO answers, pongs, close) is serialized
  and masked by ``websockets.frames.Frame.serialize`` (RFC 6455 section 5.3);
* frames from the server are read by :meth:`LeanConnection.data_received`: RFC 6455
  section 5.2 base framing of *unmasked* server frames (7-bit, 16-bit and 64-bit payload
  lengths, continuation frames reassembled, ping answered with pong, close answered with
  close). It does no UTF-8 validation and no extensions: the benchmark turns compression
  off for every stack.

Deliveries are handed to ``on_message(payload: bytes)`` straight from ``data_received``:
no queue, no task wake-up per message. While a stack's join coroutine runs, messages go
to an :class:`asyncio.Queue` read by :meth:`recv` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

__all__ = ["LeanConnection", "lean_connect"]

_MAX_HEADER_BYTES = 16384  # a handshake response larger than this is refused


class LeanConnection(asyncio.Protocol):
    """One client WebSocket connection (see the module docstring).

    ``state`` is ``"CONNECTING"``, ``"OPEN"`` or ``"CLOSED"`` (the last once a close frame
    arrived or the TCP connection was lost). ``max_size`` bounds a message in bytes; a larger
    one closes the connection with 1009 (RFC 6455 section 7.4.1).
    """

    def __init__(self, uri: str, max_size: int = 2**20) -> None:
        self.handshake = ClientProtocol(parse_uri(uri), max_size=max_size)
        self.max_size = max_size
        self.state = "CONNECTING"
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.on_message: Callable[[bytes], None] | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._buf = b""
        self._fragments: list[bytes] = []
        self._header_bytes = b""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's is no subclass
        request = self.handshake.connect()
        self.handshake.send_request(request)
        transport.write(b"".join(self.handshake.data_to_send()))

    def data_received(self, data: bytes) -> None:
        if self.state == "CONNECTING":
            data = self._read_handshake(data)
            if not data:
                return
        buf = self._buf + data if self._buf else data
        end, pos = len(buf), 0
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                self._fail(1002, "masked frame from the server")
                return
            length, head = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if length > self.max_size:
                self._fail(1009, "message too big")
                return
            stop = pos + head + length
            if stop > end:
                break
            self._frame(b0, buf[pos + head:stop])
            pos = stop
        self._buf = buf[pos:] if pos < end else b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "CLOSED"
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("connection closed in handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.queue.put_nowait(None)

    # -- frames ----------------------------------------------------------------------------

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode in (1, 2):  # text, binary
            if b0 & 0x80:
                self._message(payload)
            else:
                self._fragments = [payload]
        elif opcode == 0:  # continuation
            self._fragments.append(payload)
            if b0 & 0x80:
                message, self._fragments = b"".join(self._fragments), []
                self._message(message)
        elif opcode == 9:  # ping -> pong with the same payload (RFC 6455 section 5.5.3)
            self._send(Frame(Opcode.PONG, payload))
        elif opcode == 8:  # close -> echo the code, then the server closes TCP
            if self.state == "OPEN":
                code = Close.parse(payload).code if payload else 1005
                self._send(Frame(Opcode.CLOSE, Close(code if code != 1005 else 1000,
                                                      "").serialize()))
            self.state = "CLOSED"
            self.queue.put_nowait(None)

    def _message(self, payload: bytes) -> None:
        if self.on_message is not None:
            self.on_message(payload)
        else:
            self.queue.put_nowait(payload)

    def _read_handshake(self, data: bytes) -> bytes:
        """Feed the response head to ClientProtocol; return what follows it."""
        self._header_bytes += data
        head_end = self._header_bytes.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._header_bytes) > _MAX_HEADER_BYTES:
                self._abort(InvalidHandshake("handshake response too large"))
            return b""
        head, rest = self._header_bytes[:head_end + 4], self._header_bytes[head_end + 4:]
        self._header_bytes = b""
        self.handshake.receive_data(head)
        events = self.handshake.events_received()
        if self.handshake.handshake_exc is not None or not events \
                or not isinstance(events[0], Response):
            self._abort(self.handshake.handshake_exc
                        or InvalidHandshake("no handshake response"))
            return b""
        self.state = "OPEN"
        if not self.opened.done():  # else its connect timed out: the caller gave up on it
            self.opened.set_result(None)
        return rest

    # -- API used by the load generator ----------------------------------------------------

    async def recv(self, decode: bool = False) -> bytes:
        """The next message (only while ``on_message`` is None); ConnectionError if closed."""
        message = await self.queue.get()
        if message is None:
            self.queue.put_nowait(None)
            raise ConnectionError("connection closed")
        return message

    async def send(self, data: bytes, text: bool = True) -> None:
        """Send one text (or binary) message, masked."""
        if self.state != "OPEN":
            raise ConnectionError("connection closed")
        self._send(Frame(Opcode.TEXT if text else Opcode.BINARY, data))

    def send_now(self, data: bytes) -> None:
        """Send one text message from a callback (no await)."""
        if self.state == "OPEN":
            self._send(Frame(Opcode.TEXT, data))

    async def close(self, timeout: float = 2.0) -> None:
        """Close handshake with 1000, then the TCP connection (at most ``timeout`` s)."""
        if self.state == "OPEN":
            self._send(Frame(Opcode.CLOSE, Close(1000, "").serialize()))
            self.state = "CLOSED"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if self.transport is not None:
            self.transport.close()

    def _send(self, frame: Frame) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(frame.serialize(mask=True, extensions=[]))

    def _fail(self, code: int, reason: str) -> None:
        if self.state == "OPEN":
            self._send(Frame(Opcode.CLOSE, Close(code, reason).serialize()))
        self.state = "CLOSED"
        if self.transport is not None:
            self.transport.close()

    def _abort(self, exc: BaseException) -> None:
        self.state = "CLOSED"
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def lean_connect(uri: str, timeout: float, max_size: int = 2**20) -> LeanConnection:
    """Open a TCP connection to ``uri`` (ws:// only) and complete the opening handshake.

    Raises ``OSError`` when the TCP connect fails, ``InvalidHandshake`` when the server's
    response is not a valid 101, ``asyncio.TimeoutError`` after ``timeout`` seconds.
    """
    parts = urlsplit(uri)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URIs: {uri!r}")
    loop = asyncio.get_running_loop()

    async def go() -> LeanConnection:
        _, conn = await loop.create_connection(lambda: LeanConnection(uri, max_size),
                                               parts.hostname, parts.port or 80)
        try:
            await conn.opened
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        return conn

    return await asyncio.wait_for(go(), timeout)
