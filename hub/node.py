"""The node: joins the local registry, the broker and the fan-out of one hub process.

One message's way: the broker hands a :class:`~hub.brokers.base.Publication` to
:meth:`Node.on_publication` (the node is the broker's handler, bound once in its constructor),
which looks the channel up in the registry, returns at once if nobody local listens, builds the
delivery frame once (JSON text and its RFC 6455 wire bytes), and writes those same bytes to
every local subscriber (:func:`fan_out`); a connection whose write buffer passes the limit on
the way is dropped right after as a slow consumer (close code 4008).

The registry decides the broker subscriptions: the broker subscribes a channel when its first
local connection subscribes and unsubscribes it when the last one leaves, so ``PUBSUB NUMSUB``
counts hub processes, not clients. Operations on one channel are serialised by a lock so that
a subscribe racing an unsubscribe always ends in the state the registry asks for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable, Iterable
from typing import Any, Protocol

import orjson
from websockets.asyncio.server import broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from .brokers.base import Broker, Publication
from .exceptions import BrokerUnavailable
from .metrics import Metrics
from .protocol import CLOSE_SLOW_CONSUMER, gap_frame, message_frame, payload_to_json
from .registry import Registry

__all__ = ["SLOW_CLOSE_TIMEOUT", "SUBSCRIBE_TIMEOUT", "Node", "fan_out"]

logger = logging.getLogger("hub.node")

#: Seconds a subscribe waits for the broker's confirmation before answering ``unavailable``.
SUBSCRIBE_TIMEOUT = 5.0
#: Seconds a closing handshake may take before the TCP connection is aborted.
SLOW_CLOSE_TIMEOUT = 2.0


class Conn(Hashable, Protocol):
    """What the node needs of a connection (a :class:`hub.server.HubConnection`)."""

    user: str | None
    dropping: bool
    protocol: Any
    transport: Any

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


def fan_out(conns: Iterable[Conn], text: bytes) -> None:
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

    A write that raises (transport torn down mid-loop) skips that connection only; its
    ``connection_lost`` cleans it up. ``conns`` must not change during the call.
    """
    wire = None
    others: list[Conn] = []
    for conn in conns:
        protocol = conn.protocol
        if protocol.state is not State.OPEN:
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
        # the Conn protocol is the part of a websockets Connection that fan_out reads
        broadcast(others, text, text=True)  # type: ignore[arg-type]


class Node:
    """Registry, broker and fan-out of one process; the handler of its broker.

    ``broker`` is an unbound broker (:func:`hub.brokers.create_broker`); the node binds itself
    to it here, once (:meth:`hub.brokers.base.Broker.bind` raises if it is already bound).
    ``metrics`` is updated as messages flow. Call :meth:`start` before use and :meth:`stop` at
    shutdown.
    """

    def __init__(self, broker: Broker, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.registry: Registry[Any] = Registry()
        self.broker = broker
        self._locks: dict[str, list[Any]] = {}  # channel -> [Lock, users]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnects_seen = 0
        self.metrics.bind(
            connections=lambda: len(self.registry),
            subscriptions=lambda: sum(len(c) for c in self.registry.channels_of.values()),
            channels=lambda: len(self.registry.by_channel),
            broker_connected=lambda: 1.0 if self.broker.connected else 0.0,
        )
        broker.bind(self)

    async def start(self) -> None:
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()
        for task in list(self._tasks):
            task.cancel()

    @property
    def ready(self) -> bool:
        return self.broker.connected

    # -- the broker's handler: fan-out (the hot path), gaps, link state --------------------

    def on_publication(self, publication: Publication) -> None:
        """Fan one broker message out to the local subscribers of its channel."""
        self.metrics.received.inc()
        channel = publication.channel
        conns = self.registry.by_channel.get(channel)
        if not conns:
            return
        frame = message_frame(orjson.dumps(channel), payload_to_json(publication.payload))
        # A connection whose write buffer passes --max-buffer-bytes during this call is
        # reported by its transport (pause_writing) and dropped right after: see
        # HubConnection.pause_writing. No per-recipient check here.
        fan_out(conns, frame)
        self.metrics.deliveries.inc(len(conns))

    def drop_slow_consumer(self, conn: Conn) -> None:
        """Stop sending to ``conn`` now and close it with 4008 (abort if that stalls).

        Call it outside a broadcast: it removes ``conn`` from the registry's sets."""
        if conn.dropping or conn not in self.registry.channels_of:
            return
        logger.warning("closing slow consumer user=%s buffer=%d bytes", conn.user,
                       conn.transport.get_write_buffer_size())
        self.metrics.slow_consumers.inc()
        self.detach(conn)
        self.close_connection(conn, CLOSE_SLOW_CONSUMER, "slow consumer", SLOW_CLOSE_TIMEOUT)

    def on_gap(self, channels: list[str]) -> None:
        """Tell every local subscriber of ``channels`` that messages may have been lost."""
        affected: dict[Any, list[str]] = {}
        for channel in channels:
            for conn in self.registry.by_channel.get(channel, ()):
                affected.setdefault(conn, []).append(channel)
        for conn, names in affected.items():
            broadcast((conn,), gap_frame(names), text=True)
        self.metrics.gaps.inc(len(affected))
        logger.warning("broker gap: %d channels, %d connections told", len(channels),
                       len(affected))

    def on_state(self, connected: bool) -> None:
        """Count the broker's reconnects into ``hub_broker_reconnects_total``."""
        total = self.broker.reconnects
        if total > self._reconnects_seen:
            self.metrics.broker_reconnects.inc(total - self._reconnects_seen)
            self._reconnects_seen = total

    # -- connections and subscriptions -----------------------------------------------------

    def attach(self, conn: Conn) -> None:
        """Register ``conn`` (its ``user`` may be None)."""
        self.registry.add_connection(conn, conn.user)

    def detach(self, conn: Conn) -> None:
        """Forget ``conn`` and release the channels it was the last local subscriber of.
        Idempotent."""
        if conn not in self.registry.channels_of:
            return
        for channel in self.registry.remove_connection(conn, conn.user):
            self.spawn(self.sync(channel))

    async def subscribe(self, conn: Conn, channel: str) -> None:
        """Subscribe ``conn``; return once the broker subscription is live.

        Raises :class:`BrokerUnavailable` (and leaves ``conn`` unsubscribed) if the broker does
        not confirm within :data:`SUBSCRIBE_TIMEOUT` seconds.
        """
        self.registry.subscribe(conn, channel)
        # Fast path only when no sync of this channel is under way: an unsubscribe in flight
        # may still show the channel live and end it right after.
        if channel not in self._locks and self.broker.is_live(channel):
            return
        try:
            await self.sync(channel)
        except BrokerUnavailable:
            if self.registry.unsubscribe(conn, channel):
                self.spawn(self.sync(channel))
            raise

    def unsubscribe(self, conn: Conn, channel: str) -> None:
        """Unsubscribe ``conn``; the broker lets go of the channel in the background."""
        if self.registry.unsubscribe(conn, channel):
            self.spawn(self.sync(channel))

    async def sync(self, channel: str) -> None:
        """Make the broker subscription of ``channel`` match the registry."""
        entry = self._locks.get(channel)
        if entry is None:
            entry = self._locks[channel] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                if self.registry.has_channel(channel):
                    await self.broker.subscribe(channel, SUBSCRIBE_TIMEOUT)
                else:
                    await self.broker.unsubscribe(channel)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[channel]

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish through the broker (so every process delivers it); see Broker.publish."""
        return await self.broker.publish(channel, payload)

    # -- closing ---------------------------------------------------------------------------

    def close_connection(self, conn: Conn, code: int, reason: str, timeout: float
                         ) -> asyncio.Task[None]:
        """Close ``conn`` with ``code`` in the background; abort the TCP connection if the
        closing handshake has not finished within ``timeout`` seconds."""
        conn.dropping = True
        self.metrics.closes.labels(str(code)).inc()
        return self.spawn(_close_or_abort(conn, code, reason, timeout))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, BrokerUnavailable):
                logger.error("background task failed", exc_info=exc)


async def _close_or_abort(conn: Conn, code: int, reason: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(conn.close(code, reason), timeout)
    except Exception:
        pass
    finally:
        if conn.protocol.state is not State.CLOSED:
            conn.transport.abort()
