"""The only module that knows websockets' internals: the connection class, the raw-frame
fan-out, sending one frame, and close-or-abort.

The node and the session see a connection through these functions and the attributes of
:class:`HubConnection`; nothing else in hub reads ``protocol`` or ``transport``. The raw
fan-out and the lone-pong fast path of ``data_received`` rely on details of websockets'
asyncio implementation of major version 17 (pyproject.toml pins ``websockets>=17,<18``;
tests/integration/test_connection.py guards them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from websockets import http11
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event, State
from websockets.protocol import Protocol as _LibraryProtocol
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.typing import Data

if TYPE_CHECKING:
    from .keepalive import Keepalive

__all__ = ["ConnectionOwner", "HubConnection", "begin_burst", "close_or_abort", "end_burst",
           "fan_out", "flush_burst", "limit_requests", "ping", "send_text"]

logger = logging.getLogger("hub.connection")

#: The code objects of the generators websockets' server protocol parses frames with: its
#: parser (``ServerProtocol.parse``) runs ``Protocol.parse``, which waits for the next frame
#: in ``StreamReader.at_eof`` (tests/integration/test_connection.py pins them).
_SERVER_PARSE = ServerProtocol.parse.__code__
_FRAMES_PARSE = _LibraryProtocol.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__
#: Whether :meth:`HubConnection.data_received` may take its fast path for a lone pong (a
#: switch for tests and ``bench.keepalive_probe``), and how many pongs took it.
_fast_pong = True
fast_pongs = 0

#: The logger websockets' server gives every connection (``serve(logger=...)`` default),
#: shared: the library wraps it in a LoggerAdapter per connection (with a weak proxy and a
#: dict, about 300 bytes), which only its own debug lines would use.
_LIBRARY_LOGGER = logging.getLogger("websockets.server")


class _SmallDeque(list[Any]):
    """A list standing in for two ``collections.deque`` of websockets' connection that hold
    a few items at most: the frames received and not yet read (``SimpleQueue.queue``, at
    most ``max_queue`` = 16 frames) and the writers waiting for the buffer to drain
    (``drain_waiters``). An empty deque allocates a 64-slot block, about 600 bytes per
    connection each, where an empty list is 56. Only the deque methods the library calls."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def extendleft(self, items: Iterable[Any]) -> None:
        self[0:0] = list(items)[::-1]  # as deque.extendleft: each item in turn to the front


class ConnectionOwner(Protocol):
    """What a :class:`HubConnection` reports to (the hub process, :class:`hub.server.Hub`)."""

    def accepted(self, conn: HubConnection) -> None:
        """A TCP connection was just accepted: its opening handshake starts."""

    def handshake_over(self, conn: HubConnection, reason: str | None) -> None:
        """``conn``'s opening handshake ended, at most once per connection: answered (101
        or a refusal) or given up (``reason`` None), ``"timeout"`` (the opening timeout
        passed) or ``"malformed"`` (an unparsable request)."""

    def forget(self, conn: HubConnection) -> None:
        """The TCP connection of ``conn`` is gone."""

    def slow_consumer(self, conn: HubConnection) -> None:
        """``conn``'s write buffer passed ``--max-buffer-bytes``; called outside any
        fan-out, on the loop iteration after the transport said so."""

    def frame_flood(self, conn: HubConnection) -> None:
        """``conn`` sent more frames than its frame budget allows (``--max-frame-rate``);
        called outside the protocol's callbacks, on the loop iteration after the frame that
        passed it, at most once per connection."""


class HubConnection(ServerConnection):
    """A WebSocket connection with the hub's per-connection state.

    ``user`` is the user id (None: anonymous, or not yet authenticated); ``private`` the
    private channel patterns of its token; ``pending`` is True from a handshake without a
    token (with ``--jwt-secret``) until its ``connect`` is accepted; ``remote`` is the client
    address for log lines (``--trusted-proxy``); ``dropping`` is True once the hub decided to
    close it; ``counted`` while it counts against ``--max-connections``; ``handshaking`` from
    the TCP accept to the end of the opening handshake; ``expiry`` the timer of its token's
    ``exp``. ``tokens``, ``refilled``, ``commands`` and ``refused`` are the command rate
    limiter's state (:mod:`hub.session`); ``frames`` and ``frames_at`` the frame budget's
    (:meth:`process_event`); ``ping_sent`` (the clock of the keepalive ping not answered yet,
    0.0 for none) and ``ping_slice`` (-1 outside) the keepalive's (:mod:`hub.keepalive`).

    Build a subclass per server with ``owner``, ``frame_rate``, ``frame_burst`` and
    ``keepalive_timer`` set (see :class:`ConnectionOwner`).

    Memory: an idle connection costs about 10 KiB of Python objects, most of them websockets'
    (docs/benchmarks.md, "100,000 connections"); this class trims what it can without
    changing behaviour: no keepalive task (the process's :class:`hub.keepalive.Keepalive`
    instead), a list instead of two ``collections.deque`` (the frames queue, the drain
    waiters), the shared library logger instead of a LoggerAdapter per connection, and an
    iterator instead of an async generator for ``async for``.
    """

    owner: ConnectionOwner  # set on the per-server subclass
    #: The process's keepalive (``--ping-interval``); None: no keepalive pings. Set on the
    #: per-server subclass, which passes ``ping_interval=None`` to websockets.
    keepalive_timer: ClassVar[Keepalive | None] = None
    #: Frames per second the peer may send (every frame: data, continuation, ping, pong,
    #: close) and the bucket's size, in frames; 0 disables the frame budget. Set on the
    #: per-server subclass (``--max-frame-rate``).
    frame_rate: ClassVar[float] = 0.0
    frame_burst: ClassVar[float] = 0.0
    #: Seconds from the TCP accept to the whole handshake request (``--handshake-timeout``);
    #: set on the per-server subclass.
    request_timeout: float = 10.0

    # Slots, not __dict__ entries: eight more keys made every connection's instance dict
    # resize (the figure is in docs/benchmarks.md, "Where the time goes").
    __slots__ = ("commands", "counted", "deadline", "dropping", "expiry", "frames", "frames_at",
                 "handshaking", "lost", "pending", "ping_sent", "ping_slice", "private",
                 "refilled", "refused", "remote", "tokens", "user")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol.logger = self.logger = _LIBRARY_LOGGER
        self.drain_waiters = _SmallDeque()  # type: ignore[assignment] # append/remove/iterate
        self.ping_sent = 0.0
        self.ping_slice = -1
        self.user: str | None = None
        self.private: tuple[str, ...] = ()
        self.pending = False
        self.remote = "?"
        self.dropping = False
        self.counted = False
        #: True from ``connection_lost`` on: the owner has forgotten it, and nothing may
        #: count or register it again (a request and the EOF read in one loop iteration
        #: reach the handshake callbacks after connection_lost).
        self.lost = False
        self.tokens = 0.0
        self.refilled = 0.0
        self.commands = 0
        self.refused = 0
        # The first frame finds the bucket full: it refills from time 0.
        self.frames = 0.0
        self.frames_at = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        self.handshaking = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TCP accept (after the TLS handshake, with TLS): the handshake counts as in
        progress from here (:meth:`ConnectionOwner.accepted`), and the whole request must
        arrive within :attr:`request_timeout` seconds."""
        super().connection_made(transport)  # starts websockets' handler task
        self.recv_messages.frames.queue = _SmallDeque()  # type: ignore[assignment]
        self.handshaking = True
        self.deadline = self.loop.call_later(self.request_timeout, self._request_late)
        self.owner.accepted(self)

    def _request_late(self) -> None:
        self.deadline = None
        if self.request is None:
            self._handshake_over("timeout")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer. Once they complete the handshake request, its deadline is
        off. When they made it unparsable (past the header limits, or not HTTP), websockets
        has queued its 414/431 answer (or nothing) but would buffer whatever follows until
        the opening timeout: stop reading at once and close once that answer is written.

        A read that is exactly one whole masked pong (the answer to a keepalive ping, the
        commonest read of an idle connection) skips the library's frame parser when the
        outcome is known without it (:meth:`_lone_pong`)."""
        size = len(data)
        # 0x8A: FIN, no RSV bit, opcode PONG; then MASK and a 7-bit length that is exactly
        # what follows the 4-byte masking key (0x80 + size - 6 = size + 0x7A), at most 125.
        if (size <= 131 and size >= 6 and data[0] == 0x8A and data[1] == size + 0x7A
                and _fast_pong and self._lone_pong(size - 6)):
            return
        super().data_received(data)
        if self.deadline is not None and self.request is not None:
            self.deadline.cancel()
            self.deadline = None
        elif self.request is None and self.protocol.handshake_exc is not None:
            self._handshake_over("malformed")
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection now (RST), unsent bytes included."""
        self.transport.abort()

    def start_keepalive(self) -> None:
        """Called by websockets when the opening handshake succeeded (where it would start
        its keepalive task): join the process's :class:`hub.keepalive.Keepalive`, if any."""
        if self.keepalive_timer is not None:
            self.keepalive_timer.add(self)

    def keepalive_timeout(self) -> None:
        """The keepalive's ping went unanswered: fail the connection as websockets' own
        keepalive does (close frame 1011 ``"keepalive ping timeout"``, the TCP connection
        half-closed, RFC 6455 section 7.1.7) and abort it if it is not gone within
        ``close_timeout`` seconds. Nothing when the connection is no longer open."""
        if self.protocol.state is not State.OPEN:
            return
        self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        self.send_data()
        self.loop.call_later(self.close_timeout or 0.0, self._abort_unless_closed)

    def _abort_unless_closed(self) -> None:
        if self.protocol.state is not State.CLOSED:
            self.transport.abort()

    def __aiter__(self) -> HubConnection:
        """``async for message in conn``: as websockets' (every message until a normal
        close; ConnectionClosedError after an abnormal one), without an async generator
        per connection."""
        return self

    async def __anext__(self) -> Data:
        try:
            return await self.recv()
        except ConnectionClosedOK:
            raise StopAsyncIteration from None

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """websockets' opening handshake, reporting its end to the owner whatever the
        outcome (the opening timeout cancels this coroutine)."""
        reason = None
        try:
            await super().handshake(*args, **kwargs)
        except asyncio.CancelledError:
            reason = "timeout"
            raise
        finally:
            self._handshake_over(reason)

    def _handshake_over(self, reason: str | None) -> None:
        if self.handshaking:
            self.handshaking = False
            self.owner.handshake_over(self, reason)

    def process_event(self, event: Event) -> None:
        """Count every frame the peer sends against the frame budget, then let the library
        handle it.

        websockets 17 calls this for each event ``data_received`` parses: the handshake
        request first, then every frame (a fragment or control frame too; the library has
        already queued the automatic pong of a ping). A token bucket of ``frame_burst``
        frames refilled at ``frame_rate`` per second; the frame that finds it empty makes
        the owner close the connection (:meth:`ConnectionOwner.frame_flood`, 4029). Frames
        keep being handled as usual until the close: the session skips the commands of a
        connection that is being dropped."""
        if isinstance(event, Frame):
            if event.opcode is Opcode.PONG:
                self.ping_sent = 0.0  # the keepalive's ping is answered (any pong: alive)
            if self.frame_rate > 0:
                self._count_frame()
        super().process_event(event)

    def _count_frame(self) -> None:
        """Take one frame from the frame budget; the frame that finds it empty makes the
        owner close the connection, once (:meth:`process_event`)."""
        rate = self.frame_rate
        now = time.monotonic()
        frames = self.frames + (now - self.frames_at) * rate
        self.frames_at = now
        if frames > self.frame_burst:
            frames = self.frame_burst
        if frames >= 1.0:
            self.frames = frames - 1.0
        else:
            self.frames = frames
            if not self.dropping:
                self.dropping = True  # once: the owner closes it
                self.loop.call_soon(self.owner.frame_flood, self)

    def _lone_pong(self, length: int) -> bool:
        """The read in hand is one whole masked pong frame of ``length`` (<= 125) payload
        bytes: handle it here, as the library and :meth:`process_event` would, and return
        True; or return False (nothing done) for the library to parse it.

        True only when the library's outcome is certain without parsing: the connection is
        OPEN (no close frame sent or received), its parser waits for the first byte of a
        frame (``Protocol.parse`` suspended in ``StreamReader.at_eof``, nothing buffered: a
        read that completes a frame begun earlier goes to the library), no fragmented message
        is in progress and the size limits allow the payload, no extension is negotiated,
        the library's debug logging is off, it has nothing queued to send, and no ping of its
        own waits for a pong (``Connection.ping()``, which the hub does not use). Then the
        library would parse an unsolicited pong frame (RFC 6455 section 5.5.3), send
        nothing, and ignore it: what is left is the hub's part, the keepalive's ping
        answered and the frame counted against the frame budget. The payload is not even
        unmasked: nothing reads it."""
        protocol = self.protocol
        if (protocol.state is not State.OPEN or protocol.current_size is not None
                or protocol.extensions or protocol.debug or protocol.writes
                or protocol.events or self.pending_pings or self.deadline is not None):
            return False
        limit = protocol.max_message_size
        if limit is not None and length > limit:
            return False
        limit = protocol.max_fragment_size
        if limit is not None and length > limit:
            return False
        reader = protocol.reader
        if reader.buffer or reader.eof:
            return False
        parser: Any = protocol.parser
        if parser.gi_code is not _SERVER_PARSE:
            return False
        frames = parser.gi_yieldfrom
        if frames is None or frames.gi_code is not _FRAMES_PARSE:
            return False
        waiting = frames.gi_yieldfrom
        if waiting is None or waiting.gi_code is not _AT_EOF:
            return False
        global fast_pongs
        fast_pongs += 1
        self.ping_sent = 0.0
        if self.frame_rate > 0:
            self._count_frame()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        super().connection_lost(exc)
        if self.keepalive_timer is not None:
            self.keepalive_timer.discard(self)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self._handshake_over(None)  # a handshake task that never ran
        # The connection object sits in reference cycles (its handler task, futures) that
        # only the cyclic garbage collector frees, maybe much later: let go now of what can
        # be big. A request cut short holds up to its header limits in the bytes read but
        # not parsed and in the headers parsed so far, which the parser's frames keep, and
        # the traceback of the handshake error (EOF in the middle of the request) keeps
        # those frames.
        self.protocol.reader.buffer.clear()
        self.drop_handshake()
        error: BaseException | None = self.protocol.handshake_exc
        for _ in range(8):  # the chain's length is small; a cycle must not loop forever
            if error is None:
                break
            error.__traceback__ = None
            error = error.__cause__ or error.__context__
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
    def close_sent_by_library(self) -> int | None:
        """The close code websockets itself sent, not answering the peer's close and not
        asked by the hub (``dropping`` is False): 1011 on a keepalive ping timeout, 1009,
        1007, 1002 for a frame it refused. None otherwise, or while no close frame went
        out."""
        protocol = self.protocol
        close = protocol.close_sent
        if close is None or self.dropping or protocol.close_rcvd_then_sent:
            return None
        return close.code

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


def limit_requests(max_headers: int, max_line_bytes: int) -> None:
    """Bound the HTTP requests this process parses: at most ``max_headers`` header lines,
    none (nor the request line) longer than ``max_line_bytes`` bytes. Past either,
    websockets closes the connection without a response.

    websockets reads these bounds from the globals ``MAX_NUM_HEADERS`` and
    ``MAX_LINE_LENGTH`` of ``websockets.http11`` each time it parses a request (their
    defaults, 128 and 8192, come from the variables ``WEBSOCKETS_MAX_NUM_HEADERS`` and
    ``WEBSOCKETS_MAX_LINE_LENGTH`` read at import); this sets them for the whole process.
    """
    http11.MAX_NUM_HEADERS = max_headers
    http11.MAX_LINE_LENGTH = max_line_bytes


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

    Inside a burst (:func:`begin_burst`) nothing is written yet: ``text`` is queued for
    ``conns`` and written by :func:`end_burst`, with the connection's other frames of the
    burst, and ``conns`` must then not change until the burst ends.
    """
    burst = _burst
    if burst is not None:
        burst.append((conns, text))
        return
    _write_now(conns, text)


def _write_now(conns: Iterable[HubConnection], text: bytes) -> None:
    _write_to(conns, _serialize(text), (text,))


def _serialize(text: bytes) -> bytes:
    return Frame(Opcode.TEXT, text).serialize(mask=False, extensions=[])


def _write_to(conns: Iterable[HubConnection], wire: bytes, texts: Sequence[bytes]) -> int:
    """Write ``wire`` (the serialized frames of ``texts``) to every open connection of
    ``conns`` without permessage-deflate, and ``texts`` through ``broadcast()``, one frame
    at a time, to those with it; return the number of ``wire`` writes."""
    others: list[HubConnection] = []
    writes = 0
    for conn in conns:
        protocol = conn.protocol
        if protocol.state is not State.OPEN or conn.transport.is_closing():
            continue
        if protocol.extensions:
            others.append(conn)
            continue
        writes += 1
        try:
            conn.transport.write(wire)
        except Exception as exc:
            logger.debug("fan-out write failed: %s", exc)
    if others:
        for text in texts:
            broadcast(others, text, text=True)
    return writes


def ping(conns: Iterable[HubConnection], payload: bytes) -> int:
    """Send one ping frame carrying ``payload`` (at most 125 bytes) to every open connection
    of ``conns``; return how many were written.

    The frame is serialized once (unmasked, as a server sends it; RFC 6455 section 5.5.2) and
    the same bytes are written to each transport, under the conditions of :func:`fan_out`
    (open, transport not closing, whole frames in order). Control frames are never
    compressed (RFC 7692 section 6), so connections with permessage-deflate get the same
    bytes. The library does not learn of these pings: their pongs are seen in
    :meth:`HubConnection.process_event`, or before the library in
    :meth:`HubConnection.data_received` when a pong comes alone in a read.
    """
    wire = Frame(Opcode.PING, payload).serialize(mask=False, extensions=[])
    sent = 0
    for conn in conns:
        transport = conn.transport
        if conn.protocol.state is not State.OPEN or transport.is_closing():
            continue
        try:
            transport.write(wire)
        except Exception as exc:
            logger.debug("keepalive ping write failed: %s", exc)
            continue
        sent += 1
    return sent


#: The frames of the burst under way (:func:`begin_burst`), in order: (connections, text).
#: None outside a burst. One per process: a burst is synchronous (it never awaits), so two
#: bursts cannot interleave on one event loop.
_burst: list[tuple[Iterable[HubConnection], bytes]] | None = None
#: Writes of several frames made by flush_burst() during the burst under way.
_flushed = 0


def begin_burst() -> bool:
    """Start queueing :func:`fan_out`'s frames instead of writing them: until
    :func:`end_burst`, every connection's frames are collected in order, then written with
    one ``transport.write`` per connection (the system-call floor: one ``send()`` carries
    all of a connection's frames of a broker burst; docs/benchmarks.md, "Coalesced writes").

    Returns False (and changes nothing) when a burst is already under way: then the caller
    must not call :func:`end_burst`, the outer burst's owner will. Call it and
    :func:`end_burst` in one synchronous step, with nothing awaited in between: nothing
    waits for more frames, only what is already at hand is coalesced.
    """
    global _burst
    if _burst is not None:
        return False
    _burst = []
    return True


def flush_burst() -> None:
    """Write what the burst under way has queued so far and keep the burst open (a no-op
    outside a burst). Call it before anything that may change the connection sets queued
    (a subscribe or disconnect decided inside the burst) or write to a connection outside
    :func:`fan_out`; :func:`send_text` does it itself. Its writes count in
    :func:`end_burst`'s result."""
    global _flushed
    burst = _burst
    if not burst:
        return
    entries = burst[:]
    burst.clear()
    _flushed += _write_burst(entries)


def end_burst() -> int:
    """End the burst begun by :func:`begin_burst`: write every connection's queued frames,
    in the order they were queued, with one ``transport.write`` of their concatenation (a
    connection with permessage-deflate gets them through ``broadcast()``, one frame at a
    time, as :func:`fan_out` does). What :func:`fan_out` checks per message (the connection
    is OPEN, its transport not closing) is checked once here, at the write: nothing inside a
    synchronous burst can close a connection. A write that passes ``--max-buffer-bytes``
    reports the connection as a slow consumer exactly as a single frame's write does
    (:meth:`HubConnection.pause_writing`: dropped with 4008 on the next loop iteration).

    Returns the number of writes of the burst that carried more than one frame (those of
    :func:`flush_burst` included; ``hub_coalesced_writes``).
    """
    global _burst, _flushed
    entries, flushed = _burst, _flushed
    _burst, _flushed = None, 0
    if not entries:
        return flushed
    return flushed + _write_burst(entries)


def _write_burst(entries: list[tuple[Iterable[HubConnection], bytes]]) -> int:
    if len(entries) == 1:
        conns, text = entries[0]
        _write_now(conns, text)
        return 0
    audience = entries[0][0]
    for conns, _ in entries:
        if conns is not audience:
            return _write_mixed(entries)
    # One audience (one channel's subscribers; the common burst): one concatenation, the
    # same bytes to every connection.
    texts = [text for _, text in entries]
    return _write_to(audience, b"".join([_serialize(text) for text in texts]), texts)


def _write_mixed(entries: list[tuple[Iterable[HubConnection], bytes]]) -> int:
    """Several audiences (channels) in one burst: each connection's frames, in order."""
    wires = [_serialize(text) for _, text in entries]
    frames: dict[HubConnection, list[int]] = {}
    for index, (conns, _) in enumerate(entries):
        for conn in conns:
            mine = frames.get(conn)
            if mine is None:
                frames[conn] = [index]
            else:
                mine.append(index)
    writes = 0
    for conn, indices in frames.items():
        protocol = conn.protocol
        if protocol.state is not State.OPEN or conn.transport.is_closing():
            continue
        if protocol.extensions:
            for index in indices:
                broadcast((conn,), entries[index][1], text=True)
            continue
        if len(indices) == 1:
            data = wires[indices[0]]
        else:
            data = b"".join([wires[index] for index in indices])
            writes += 1
        try:
            conn.transport.write(data)
        except Exception as exc:
            logger.debug("fan-out write failed: %s", exc)
    return writes


def send_text(conn: HubConnection, text: bytes) -> None:
    """Send the UTF-8 JSON ``text`` to ``conn`` now, without waiting (like :func:`fan_out`
    for one connection); nothing is sent when ``conn`` is not open. Inside a burst, what it
    has queued is written first (:func:`flush_burst`), so that ``text`` keeps its place after
    the frames fanned out before it."""
    if _burst:
        flush_burst()
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
