"""The node: joins the local registry, the broker and the fan-out of one hub process.

One message's way: the broker hands a :class:`~hub.brokers.base.Publication` to
:meth:`Node.on_publication` (the node is the broker's handler, bound once in its constructor),
which looks the channel up in the registry, returns at once if nobody local listens, builds the
delivery frame once and hands it to :func:`hub.connection.fan_out`, which writes the same
wire bytes to every local subscriber; a connection whose write buffer passes the limit on the
way is dropped right after as a slow consumer (close code 4008). The node knows connections
only through :mod:`hub.connection`. Several messages that reached the broker's reader at once
come in one :meth:`Node.on_publications` call: each connection then gets all its frames of
that burst in one write (docs/benchmarks.md, "Coalesced writes").

A payload larger than ``max_payload_bytes`` (``--max-payload-bytes``) is delivered to nobody:
buffered once per recipient it would cost every connection its write buffer (and 4008). It is
counted in ``hub_payloads_dropped_total{reason="too_large"}`` and logged at most once per
:data:`DROP_LOG_INTERVAL` seconds, with the count. The node is :attr:`Node.ready` while the
broker is connected and its lag (:attr:`hub.brokers.base.Broker.lag`) is within ``max_lag``.

The registry decides the broker subscriptions: the broker subscribes a channel when its first
local connection subscribes and unsubscribes it when the last one leaves, so ``PUBSUB NUMSUB``
counts hub processes, not clients. Operations on one channel are serialised by a lock so that
a subscribe racing an unsubscribe always ends in the state the registry asks for.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import orjson

from .brokers.base import Broker, Publication, StreamPosition
from .channels import ChannelRules
from .connection import (
    HubConnection,
    begin_burst,
    close_or_abort,
    end_burst,
    fan_out,
    flush_burst,
    send_text,
)
from .control import Control
from .exceptions import BrokerUnavailable
from .history.base import History
from .metrics import Metrics
from .presence.base import Presence
from .presences import Presences, event_frame
from .protocol import (
    CLOSE_SLOW_CONSUMER,
    ENVELOPE_MARK,
    MAX_ENVELOPE_OVERHEAD,
    gap_frame,
    message_frame,
    payload_to_json,
    unpack_payload,
)
from .registry import Registry
from .streams import Catchup, Streams

__all__ = ["DROP_LOG_INTERVAL", "SLOW_CLOSE_TIMEOUT", "SUBSCRIBE_TIMEOUT", "Node"]

logger = logging.getLogger("hub.node")

#: Seconds a subscribe waits for the broker's confirmation before answering ``unavailable``.
SUBSCRIBE_TIMEOUT = 5.0
#: Seconds a closing handshake may take before the TCP connection is aborted.
SLOW_CLOSE_TIMEOUT = 2.0
#: Seconds between two log lines about payloads dropped for their size (the count in between).
DROP_LOG_INTERVAL = 10.0


class Node:
    """Registry, broker and fan-out of one process; the handler of its broker.

    ``broker`` is an unbound broker (:func:`hub.brokers.create_broker`); the node binds itself
    to it here, once (:meth:`hub.brokers.base.Broker.bind` raises if it is already bound).
    ``metrics`` is updated as messages flow. ``max_payload_bytes`` is the largest payload
    delivered (bytes, as delivered: a non-JSON payload counts as its JSON string);
    ``max_lag`` the seconds of broker lag past which :attr:`ready` is False (``math.inf``:
    never); both default to no limit (``hub serve`` passes ``--max-payload-bytes`` and
    ``--max-lag``). Call :meth:`start` before use and :meth:`stop` at shutdown.
    """

    def __init__(self, broker: Broker, metrics: Metrics | None = None, *,
                 max_payload_bytes: float = math.inf, max_lag: float = math.inf,
                 history: History | None = None, rules: ChannelRules | None = None,
                 presence: Presence | None = None, version: str = "unknown") -> None:
        self.metrics = metrics or Metrics()
        self.registry: Registry[HubConnection] = Registry()
        self.broker = broker
        self.history = history
        self.rules = rules or ChannelRules()
        #: The history channels (None without a history store): hub.streams.
        self.streams = (Streams(history, self.rules, self.registry, self.deliver, self.spawn,
                                self.metrics) if history is not None else None)
        #: The presence channels (None without a presence store): hub.presences.
        self.presences = (Presences(presence, self.rules, self.registry, broker, self.spawn,
                                    metrics=self.metrics)
                          if presence is not None else None)
        #: The control channel: commands for every process, heartbeats (hub.control).
        self.control = Control(self, version=version)
        self.max_payload_bytes = max_payload_bytes
        self.max_lag = max_lag
        self._too_large = self.metrics.payloads_dropped.labels("too_large")
        self._drops_unlogged = 0  # payloads dropped since the last log line
        self._drop_logged_at = -math.inf  # loop.time() of the last log line
        self._drop_flush: asyncio.TimerHandle | None = None
        self._last_drop = ("", 0)  # (channel, bytes) of the last payload dropped
        self._locks: dict[str, list[Any]] = {}  # channel -> [Lock, users]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnects_seen = 0
        self.metrics.bind(
            connections=lambda: len(self.registry),
            subscriptions=lambda: sum(len(c) for c in self.registry.channels_of.values()),
            channels=lambda: len(self.registry.by_channel),
            broker_connected=lambda: 1.0 if self.broker.connected else 0.0,
        )
        self.metrics.bind_broker(lag=lambda: self.broker.lag,
                                 connect_attempts=lambda: self.broker.connect_attempts)
        broker.bind(self)

    async def start(self) -> None:
        await self.broker.start()
        if self.history is not None:
            self.spawn(self.history.start())  # loads the Redis function library
        if self.presences is not None:
            self.presences.start()
        self.control.start()

    async def leave_all(self) -> None:
        """The ordered shutdown's first step: remove this process's presence entries and
        announce their leaves (:meth:`hub.presences.Presences.stop`). Never raises."""
        if self.presences is not None:
            await self.presences.stop()

    async def stop(self) -> None:
        if self.presences is not None:
            await self.presences.stop()  # a no-op after leave_all
        await self.control.stop()
        await self.broker.stop()
        if self.history is not None:
            await self.history.close()
        if self.presences is not None:
            await self.presences.close()
        for task in list(self._tasks):
            task.cancel()
        if self._drop_flush is not None:
            self._drop_flush.cancel()
            self._log_drops()

    @property
    def ready(self) -> bool:
        """True while the broker is connected and lags at most ``max_lag`` seconds behind
        (drives ``/readyz``)."""
        broker = self.broker
        return broker.connected and broker.lag <= self.max_lag

    # -- the broker's handler: fan-out (the hot path), gaps, link state --------------------

    def on_publication(self, publication: Publication) -> None:
        """Fan one broker message out to the local subscribers of its channel (through
        :mod:`hub.streams` on a history channel)."""
        self.metrics.received.inc()
        channel = publication.channel
        conns = self.registry.by_channel.get(channel)
        if not conns:
            if channel[:1] == "$":  # a reserved channel: the control channel's messages
                flush_burst()  # it may subscribe or drop connections queued in a burst
                self.control.receive(publication)
            return
        if publication.presence:
            self._presence_event(publication, conns)
            return
        streams = self.streams
        if streams is not None and (publication.offset is not None
                                    or streams.keeps_history(channel)):
            streams.on_publication(publication)
            return
        self.deliver(publication, conns)

    def on_publications(self, publications: list[Publication]) -> None:
        """Several broker messages that arrived together (a burst: the link's reader had them
        at hand at once), in order: each is handled as :meth:`on_publication` handles it, but
        every connection gets all of its frames of the burst in one write
        (:func:`hub.connection.begin_burst`). Order per channel and per connection is that
        of ``publications``; nothing waits for more. An exception from one publication is
        logged and that one dropped, as the link does for a single one."""
        if len(publications) == 1:
            self.on_publication(publications[0])
            return
        self.metrics.burst_messages.inc(len(publications))
        owner = begin_burst()
        try:
            on_publication = self.on_publication
            for publication in publications:
                try:
                    on_publication(publication)
                except Exception:  # one bad message must not cost the burst
                    logger.exception("delivery failed on %r", publication.channel)
        finally:
            if owner:
                self.metrics.coalesced_writes.inc(end_burst())

    def deliver(self, publication: Publication, conns: Iterable[HubConnection]) -> None:
        """Write ``publication`` to ``conns`` (one frame for all; its offset in it when it has
        one, its sender when it is a client publish's envelope), unless its data is over
        ``max_payload_bytes``."""
        channel = publication.channel
        payload = publication.payload
        limit = self.max_payload_bytes
        sender: bytes | None = None
        if payload[:1] == ENVELOPE_MARK:  # a client publish (or a payload that looks like it)
            if len(payload) > limit + MAX_ENVELOPE_OVERHEAD:
                self._drop_too_large(channel, len(payload))
                return
            data, sender = unpack_payload(payload)
        else:
            if len(payload) > limit:  # checked before parsing: the JSON string is never shorter
                self._drop_too_large(channel, len(payload))
                return
            data = payload_to_json(payload)
        if len(data) > limit:
            self._drop_too_large(channel, len(data))
            return
        frame = message_frame(orjson.dumps(channel), data, publication.offset, sender)
        # A connection whose write buffer passes --max-buffer-bytes during this call is
        # reported by its transport (pause_writing) and dropped right after: see
        # hub.connection.HubConnection.pause_writing. No per-recipient check here.
        if not isinstance(conns, (set, list, tuple)):
            conns = list(conns)
        fan_out(conns, frame)
        self.metrics.deliveries.inc(len(conns))

    def _presence_event(self, publication: Publication, conns: set[HubConnection]) -> None:
        """A join or leave event: its frame to the local subscribers of a join_leave
        channel."""
        if not self.rules.join_leave(publication.channel):
            return
        frame = event_frame(publication)
        if frame is None:
            logger.debug("not a presence event on %r: %r", publication.channel,
                         publication.payload[:100])
            return
        fan_out(list(conns), frame)
        self.metrics.deliveries.inc(len(conns))

    def _drop_too_large(self, channel: str, size: int) -> None:
        """Count a payload over ``max_payload_bytes``; log at most once per
        :data:`DROP_LOG_INTERVAL` seconds (the first at once, the rest as a count)."""
        self._too_large.inc()
        self._drops_unlogged += 1
        self._last_drop = (channel, size)
        if self._drop_flush is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._drop_logged_at + DROP_LOG_INTERVAL - loop.time()
        if wait <= 0:
            self._log_drops()
        else:
            self._drop_flush = loop.call_later(wait, self._log_drops)

    def _log_drops(self) -> None:
        self._drop_flush = None
        if not self._drops_unlogged:
            return
        channel, size = self._last_drop
        logger.warning("dropped %d broker messages over --max-payload-bytes %g (delivered to "
                       "nobody); the last: channel=%r, %d bytes", self._drops_unlogged,
                       self.max_payload_bytes, channel, size)
        self._drops_unlogged = 0
        self._drop_logged_at = asyncio.get_running_loop().time()

    def drop_slow_consumer(self, conn: HubConnection) -> None:
        """Stop sending to ``conn`` now and close it with 4008 (abort if that stalls).

        Call it outside a broadcast: it removes ``conn`` from the registry's sets."""
        if conn.dropping or conn not in self.registry.channels_of:
            return
        logger.warning("closing slow consumer user=%s buffer=%d bytes", conn.user,
                       conn.buffered)
        self.metrics.slow_consumers.inc()
        self.detach(conn)
        self.close_connection(conn, CLOSE_SLOW_CONSUMER, "slow consumer", SLOW_CLOSE_TIMEOUT)

    def on_gap(self, channels: list[str]) -> None:
        """Tell every local subscriber of ``channels`` that messages may have been lost; a
        history channel is repaired from its history instead (:mod:`hub.streams`)."""
        if self.streams is not None:
            channels = self.streams.repair_all(channels)
            if not channels:
                return
        affected: dict[HubConnection, list[str]] = {}
        for channel in channels:
            for conn in self.registry.by_channel.get(channel, ()):
                affected.setdefault(conn, []).append(channel)
        for conn, names in affected.items():
            send_text(conn, gap_frame(names))
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

    def attach(self, conn: HubConnection) -> None:
        """Register ``conn`` (its ``user`` may be None)."""
        self.registry.add_connection(conn, conn.user)

    def channels_of(self, conn: HubConnection) -> set[str] | None:
        """The channels ``conn`` is subscribed to (do not mutate), or None when it is not
        attached (never, or detached since)."""
        return self.registry.channels_of.get(conn)

    def connections_of_user(self, user: str) -> int:
        """How many attached connections ``user`` has."""
        return len(self.registry.by_user.get(user, ()))

    def connections(self) -> list[HubConnection]:
        """Every attached connection (a copy)."""
        return list(self.registry.connections())

    def detach(self, conn: HubConnection) -> None:
        """Forget ``conn`` and release the channels it was the last local subscriber of.
        Idempotent."""
        channels = self.registry.channels_of.get(conn)
        if channels is None:
            return
        streams = self.streams
        if streams is not None:
            for channel in channels:
                streams.forget(conn, channel)
        presences = self.presences
        if presences is not None:
            for channel in channels:
                if presences.keeps_presence(channel):
                    presences.leave(conn, channel)
        for channel in self.registry.remove_connection(conn, conn.user):
            self._emptied(channel)

    async def subscribe(self, conn: HubConnection, channel: str, *, join: bool = True) -> None:
        """Subscribe ``conn``; return once the broker subscription is live (and, on a presence
        channel, once its presence entry is added, unless ``join`` is False: then call
        :meth:`join` later; the join event follows in the background).

        Raises :class:`BrokerUnavailable` (and leaves ``conn`` unsubscribed) if the broker does
        not confirm within :data:`SUBSCRIBE_TIMEOUT` seconds.
        """
        if self.streams is not None and self.streams.keeps_history(channel):
            self.streams.opened(channel)  # a history channel's state, before any delivery
        self.registry.subscribe(conn, channel)
        # Fast path only when no sync of this channel is under way: an unsubscribe in flight
        # may still show the channel live and end it right after.
        if channel in self._locks or not self.broker.is_live(channel):
            try:
                await self.sync(channel)
            except BrokerUnavailable:
                if self.streams is not None:
                    self.streams.forget(conn, channel)
                if self.registry.unsubscribe(conn, channel):
                    self._emptied(channel)
                raise
        if join:
            await self.join(conn, channel)

    async def join(self, conn: HubConnection, channel: str) -> None:
        """On a presence channel: add ``conn``'s entry (waited for) and announce the join
        (:meth:`hub.presences.Presences.join`); nothing elsewhere. Never raises for Redis."""
        presences = self.presences
        if presences is not None and presences.keeps_presence(channel):
            await presences.join(conn, channel)

    async def subscribe_reserved(self, channel: str) -> None:
        """Subscribe the broker to the reserved channel ``channel`` (``$...``, no local
        subscriber: :mod:`hub.control`) for the process's life. Raises
        :class:`BrokerUnavailable` as :meth:`subscribe` does; the channel then stays wanted
        and is subscribed when the link is up."""
        await self.broker.subscribe(channel, SUBSCRIBE_TIMEOUT)

    def keeps_history(self, channel: str) -> bool:
        """True when ``channel`` keeps a history (and this node has a history store)."""
        return self.streams is not None and self.streams.keeps_history(channel)

    async def subscribe_stream(self, conn: HubConnection, channel: str, *,
                               since: StreamPosition | None, last: int | None,
                               ack: Callable[[Catchup], bytes]) -> None:
        """Subscribe ``conn`` to the history channel ``channel`` (again, if it already is):
        the ack ``ack(catchup)``, then what ``since``/``last`` ask for, then live, with no
        gap and no duplicate between them (:meth:`hub.streams.Streams.catch_up`). Raises
        :class:`BrokerUnavailable` as :meth:`subscribe` does, or when the history cannot be
        read; ``conn`` is then not subscribed (unless it already was)."""
        streams = self.streams
        assert streams is not None
        was = channel in (self.registry.channels_of.get(conn) or ())
        streams.hold(conn, channel)
        await self.subscribe(conn, channel, join=False)
        try:
            await streams.catch_up(conn, channel, since=since, last=last, ack=ack)
        except BrokerUnavailable:
            if not was:
                self.unsubscribe(conn, channel)
            raise
        await self.join(conn, channel)  # after the ack: the join frame never precedes it

    def unsubscribe(self, conn: HubConnection, channel: str) -> None:
        """Unsubscribe ``conn``; the broker lets go of the channel in the background (and the
        presence entry goes, with its leave event, after the join)."""
        if self.streams is not None:
            self.streams.forget(conn, channel)
        subscribed = channel in (self.registry.channels_of.get(conn) or ())
        if self.registry.unsubscribe(conn, channel):
            self._emptied(channel)
        presences = self.presences
        if subscribed and presences is not None and presences.keeps_presence(channel):
            presences.leave(conn, channel)

    def _emptied(self, channel: str) -> None:
        """``channel`` lost its last local subscriber."""
        if self.streams is not None:
            self.streams.closed(channel)
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

    async def publish(self, channel: str, payload: bytes,
                      idempotency_key: str | None = None) -> int | StreamPosition:
        """Publish through the broker (so every process delivers it; see Broker.publish), or
        into the history of a history channel: then the position of the message is returned.
        Raises :class:`BrokerUnavailable` when Redis does not take it."""
        if self.streams is not None and self.streams.keeps_history(channel):
            try:
                return await self.streams.publish(channel, payload, idempotency_key)
            except Exception as exc:
                raise BrokerUnavailable(f"publish into history failed: {exc}") from None
        return await self.broker.publish(channel, payload)

    # -- closing ---------------------------------------------------------------------------

    def close_connection(self, conn: HubConnection, code: int, reason: str, timeout: float
                         ) -> asyncio.Task[None]:
        """Close ``conn`` with ``code`` in the background; abort the TCP connection if the
        closing handshake has not finished within ``timeout`` seconds."""
        conn.dropping = True
        self.metrics.closes.labels(str(code)).inc()
        return self.spawn(close_or_abort(conn, code, reason, timeout))

    def disconnect(self, conn: HubConnection, code: int, reason: str) -> None:
        """Stop sending to ``conn`` and close it with ``code`` and ``reason`` (abort the TCP
        connection if the closing handshake stalls :data:`SLOW_CLOSE_TIMEOUT` seconds)."""
        self.detach(conn)
        self.close_connection(conn, code, reason, SLOW_CLOSE_TIMEOUT)

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

