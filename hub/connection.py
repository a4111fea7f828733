"""The only module that knows websockets' internals: the connection class, the raw-frame
fan-out, sending one frame, and close-or-abort.

The node and the session see a connection through these functions and the attributes of
:class:`HubConnection`; nothing else in hub reads ``protocol`` or ``transport``. The raw
fan-out relies on details of websockets' asyncio implementation of major version 17
(pyproject.toml pins ``websockets>=17,<18``; tests/unit/test_connection.py guards them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

__all__ = ["ConnectionOwner", "HubConnection", "close_or_abort", "fan_out", "send_text"]

logger = logging.getLogger("hub.connection")


class ConnectionOwner(Protocol):
    """What a :class:`HubConnection` reports to (the hub process, :class:`hub.server.Hub`)."""

    def forget(self, conn: HubConnection) -> None:
        """The TCP connection of ``conn`` is gone."""

    def slow_consumer(self, conn: HubConnection) -> None:
        """``conn``'s write buffer passed ``--max-buffer-bytes``; called outside any
        fan-out, on the loop iteration after the transport said so."""


class HubConnection(ServerConnection):
    """A WebSocket connection with the hub's per-connection state.

    ``user`` is the user id (None: anonymous, or not yet authenticated); ``private`` the
    private channel patterns of its token; ``pending`` is True from a handshake without a
    token (with ``--jwt-secret``) until its ``connect`` is accepted; ``remote`` is the client
    address for log lines (``--trusted-proxy``); ``dropping`` is True once the hub decided to
    close it; ``counted`` while it counts against ``--max-connections``; ``expiry`` the timer
    of its token's ``exp``. ``tokens``, ``refilled`` and ``strikes`` are the rate limiter's
    state (:mod:`hub.session`).

    Build a subclass per server with ``owner`` set (see :class:`ConnectionOwner`).
    """

    owner: ConnectionOwner  # set on the per-server subclass

    # Slots, not __dict__ entries: eight more keys made every connection's instance dict
    # resize (the figure is in docs/benchmarks.md, "Where the time goes").
    __slots__ = ("counted", "dropping", "expiry", "pending", "private", "refilled", "remote",
                 "strikes", "tokens", "user")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user: str | None = None
        self.private: tuple[str, ...] = ()
        self.pending = False
        self.remote = "?"
        self.dropping = False
        self.counted = False
        self.tokens = 0.0
        self.refilled = 0.0
        self.strikes = 0
        self.expiry: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.owner.forget(self)

    def pause_writing(self) -> None:
        """The transport's write buffer passed ``--max-buffer-bytes`` (its high-water mark):
        a slow consumer. Called from inside ``transport.write()``, possibly in the middle of
        a fan-out, so the owner hears of it on the next loop iteration."""
        super().pause_writing()
        if not self.dropping:
            self.loop.call_soon(self.owner.slow_consumer, self)

    def send_data(self) -> None:
        """Write what the protocol has to send (pongs, close frames, replies), as websockets'
        own ``send_data()`` does, but stop at the first chunk the transport is closing or lost
        for (reset by the peer): asyncio's transport would log ``socket.send() raised
        exception.`` for every later write, one line per pong of a ping burst. The rest is
        discarded; the connection is going away."""
        transport = self.transport
        for data in self.protocol.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # half-close the TCP connection (no TLS)
                with contextlib.suppress(Exception):  # OSError, uvloop's RuntimeError
                    transport.write_eof()
            else:
                transport.close()

    def drop_handshake(self) -> None:
        """Hold none of the handshake's headers (cookies, a token in the query or in
        Authorization) for the life of the connection, where they would cost every idle
        connection memory (docs/benchmarks.md) and keep a secret. Cleared in place, since the
        library's handshake parser keeps a reference to the same Request; the path stays,
        without its query."""
        if self.request is not None:
            self.request.headers.clear()
            self.request.path = self.request.path.partition("?")[0]
        self.response = None

    @property
    def handshake_error(self) -> Exception | None:
        """Why websockets itself refused the handshake (no Upgrade header, a bad key...),
        or None."""
        return self.protocol.handshake_exc

    @property
    def buffered(self) -> int:
        """Bytes waiting in the transport's write buffer."""
        size: int = self.transport.get_write_buffer_size()
        return size

    @property
    def is_open(self) -> bool:
        """True while the WebSocket is OPEN (RFC 6455 section 4: handshake done, no close
        frame sent or received)."""
        return self.protocol.state is State.OPEN


def fan_out(conns: Iterable[HubConnection], text: bytes) -> None:
    """Send the UTF-8 JSON ``text`` as one text message to every open connection of ``conns``.

    The frame is serialized once (``websockets.frames.Frame.serialize``: FIN, opcode 0x1,
    unmasked, as a server sends it; RFC 6455 section 5.2) and the same bytes are written to
    each connection's transport, where ``websockets``' ``broadcast()`` would build and
    serialize a ``Frame`` per recipient (``python -m bench.fanout`` measures both;
    docs/benchmarks.md). This is sound for the library's asyncio connections because:

    * a connection gets bytes only while ``protocol.state`` is OPEN (as ``broadcast()``
      checks), so nothing follows a close frame;
    * the library flushes every frame it makes (``send_data()`` after each ``send_*``), and
      transports write whole frames in order, so a raw frame never splits one of its frames
      (pings, pongs, replies); the hub never sends fragmented messages;
    * a connection with a negotiated extension (permessage-deflate, ``--compression
      deflate``) needs its own encoded frame: those go through ``broadcast()``.

    A connection whose transport is closing (reset by the peer, not yet ``connection_lost``)
    is skipped: asyncio would log a line per write to it. A write that raises (transport torn
    down mid-loop) skips that connection only; its ``connection_lost`` cleans it up. ``conns``
    must not change during the call.
    """
    wire = None
    others: list[HubConnection] = []
    for conn in conns:
        protocol = conn.protocol
        if protocol.state is not State.OPEN or conn.transport.is_closing():
            continue
        if protocol.extensions:
            others.append(conn)
            continue
        if wire is None:
            wire = Frame(Opcode.TEXT, text).serialize(mask=False, extensions=[])
        try:
            conn.transport.write(wire)
        except Exception as exc:
            logger.debug("fan-out write failed: %s", exc)
    if others:
        broadcast(others, text, text=True)


def send_text(conn: HubConnection, text: bytes) -> None:
    """Send the UTF-8 JSON ``text`` to ``conn`` now, without waiting (like :func:`fan_out`
    for one connection); nothing is sent when ``conn`` is not open."""
    broadcast((conn,), text, text=True)


async def close_or_abort(conn: HubConnection, code: int, reason: str, timeout: float) -> None:
    """Close ``conn`` with ``code`` and ``reason`` (RFC 6455 section 7.1.2); abort the TCP
    connection if the closing handshake has not finished within ``timeout`` seconds.
    Never raises."""
    try:
        await asyncio.wait_for(conn.close(code, reason), timeout)
    except Exception:
        pass
    finally:
        if conn.protocol.state is not State.CLOSED:
            conn.transport.abort()
