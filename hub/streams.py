"""History channels of one process: the offsets delivered, the repair of skipped ones, and the
catch-up of subscribers that recover (``since``) or ask for a backlog (``last``).

A channel keeps a history when its namespace says so (:class:`hub.channels.NamespaceOptions`).
For each such channel with local subscribers the process knows the epoch and the last offset
it delivered. A publication that arrives with the next offset is delivered at once; one at or
below the last is a duplicate and dropped; one that skips ahead (Redis dropped the pub/sub
link, a reconnect) makes the process read the missing range from the history and deliver it,
in order, before it; later publications of that channel (only) wait meanwhile. After a broker
reconnect every history channel is repaired from its last offset the same way. Only when the
history no longer holds the range, or its epoch changed, are the local subscribers told, with
a ``gap`` frame naming the channel and the lost range. One read per process and channel,
never per client.

A subscriber that recovers is held out of the channel's fan-out while the history is read: the
publications that arrive meanwhile are buffered for it, merged with the read by offset
(:func:`hub.recovery.merge`) and written, after its ack, in one synchronous step, so that it
gets every offset after its own once, in order, then the live stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from .brokers.base import Publication, StreamPosition
from .channels import ChannelRules
from .connection import HubConnection, send_text
from .exceptions import BrokerUnavailable
from .history.base import History, HistoryRead
from .metrics import Metrics
from .protocol import stream_gap_frame
from .recovery import merge
from .registry import Registry

__all__ = ["CATCH_UP_TIMEOUT", "Catchup", "Streams"]

logger = logging.getLogger("hub.streams")

#: Seconds a recovering subscribe waits for the channel's state (its first position read or a
#: repair under way) before it answers ``unavailable``.
CATCH_UP_TIMEOUT = 5.0
#: Attempts of a repair read before the range is given up as lost (a gap frame), and the
#: seconds between two attempts.
REPAIR_ATTEMPTS = 5
REPAIR_RETRY = 0.5
#: Seconds between two log lines about plain PUBLISHes on history channels.
UNRECORDED_LOG_INTERVAL = 10.0


@dataclass(eq=False)
class _Stream:
    """The process's state of one history channel with local subscribers."""

    channel: str
    epoch: str | None = None
    last: int | None = None  # the last offset delivered; None: not known yet
    busy: bool = True  # reading the first position or repairing: publications are held
    held: list[Publication] = field(default_factory=list)
    waiting: dict[HubConnection, list[Publication]] = field(default_factory=dict)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    retired: set[str] = field(default_factory=set)  # epochs this process ended (new_epoch)
    stalls: int = 0  # repairs in a row that found nothing new while the live stream is ahead
    # A subscriber caught up from a history read that ran ahead of this process's live
    # stream: the live copies of offsets up to its mark are not sent to it again.
    skip: dict[HubConnection, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Catchup:
    """How a subscribe to a history channel ended: the position the ack reports, and whether a
    recovery asked with ``since`` succeeded (None: none was asked)."""

    position: StreamPosition
    recovered: bool | None


class Streams:
    """The history channels of one process (see the module docstring).

    ``history`` is the store; ``rules`` gives each channel's options; ``registry`` the local
    subscribers; ``deliver(publication, conns)`` writes a publication to connections (the
    node's frame building and fan-out); ``spawn`` runs a background task; ``metrics`` counts
    recoveries, repairs and plain publishes on history channels.
    """

    def __init__(self, history: History, rules: ChannelRules,
                 registry: Registry[HubConnection],
                 deliver: Callable[[Publication, Iterable[HubConnection]], None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 metrics: Metrics) -> None:
        self.history = history
        self.rules = rules
        self.registry = registry
        self._deliver = deliver
        self._spawn = spawn
        self.metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._unrecorded_logged = -UNRECORDED_LOG_INTERVAL
        self._unrecorded_unlogged = 0

    def keeps_history(self, channel: str) -> bool:
        """True when ``channel``'s namespace keeps a history."""
        return self.rules.options(channel).history

    # -- local subscribers come and go -----------------------------------------------------

    def opened(self, channel: str) -> None:
        """``channel`` got its first local subscriber: learn its position (in the background;
        publications are held until then)."""
        if channel in self._streams:
            return
        stream = self._streams[channel] = _Stream(channel)
        self._spawn(self._init(stream))

    def closed(self, channel: str) -> None:
        """``channel`` has no local subscriber any more: forget its state."""
        stream = self._streams.pop(channel, None)
        if stream is not None:
            stream.settled.set()

    def forget(self, conn: HubConnection, channel: str) -> None:
        """``conn`` left ``channel`` (possibly while catching up)."""
        stream = self._streams.get(channel)
        if stream is not None:
            stream.waiting.pop(conn, None)
            stream.skip.pop(conn, None)

    async def _init(self, stream: _Stream) -> None:
        options = self.rules.options(stream.channel)
        try:
            position = await self.history.position(stream.channel, ttl=options.history_ttl)
        except Exception as exc:  # Redis down: deliver what comes, unchecked, until a repair
            logger.warning("history position of %r unavailable: %s", stream.channel, exc)
        else:
            # What arrived while the position was read was delivered to nobody yet, even if
            # the position already counts it: start just before the first of them.
            held = [p.offset for p in stream.held
                    if p.offset is not None and p.epoch == position.epoch]
            stream.epoch = position.epoch
            stream.last = min([position.offset, *(o - 1 for o in held)])
        self._settle(stream)

    def _settle(self, stream: _Stream) -> None:
        """End a read of ``stream``: release the held publications, in order."""
        stream.busy = False
        held, stream.held = stream.held, []
        for i, publication in enumerate(held):
            self._accept(stream, publication)
            if stream.busy:  # a new repair began: the rest waits for it
                stream.held.extend(held[i + 1:])
                return
        stream.settled.set()

    # -- the broker's publications ---------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        """A publication of a history channel (with or without an offset)."""
        stream = self._streams.get(publication.channel)
        if stream is None:
            return
        if publication.offset is None:
            self._unrecorded(publication.channel)
            self._send(stream, publication)
            return
        if stream.busy:
            stream.held.append(publication)
            return
        self._accept(stream, publication)

    def _accept(self, stream: _Stream, publication: Publication) -> None:
        offset = publication.offset
        assert offset is not None
        if publication.epoch in stream.retired:  # a reused offset of an epoch we ended
            self.metrics.history_duplicates.inc()
            return
        if stream.epoch is not None and publication.epoch != stream.epoch:
            # The history was lost (Redis restarted without persistence, keys expired or
            # flushed) and began again: whatever came before in the new epoch is repaired,
            # the end of the old one cannot be.
            self._gap(stream, None, None, publication.epoch)
            stream.last = 0
            stream.skip.clear()
        stream.epoch = publication.epoch
        last = stream.last
        if last is None or offset == last + 1:
            stream.last = offset
            self._send(stream, publication)
        elif offset <= last:
            self.metrics.history_duplicates.inc()
        else:
            stream.busy = True
            stream.settled.clear()
            stream.held.append(publication)
            self._spawn(self._repair(stream))

    def repair_all(self, channels: Iterable[str]) -> list[str]:
        """After a broker reconnect: repair each history channel of ``channels`` from its
        last offset; return the others (they get today's gap frame)."""
        others = []
        for channel in channels:
            stream = self._streams.get(channel)
            if stream is None:
                if not self.keeps_history(channel):
                    others.append(channel)
                continue
            if not stream.busy and stream.last is not None:
                stream.busy = True
                stream.settled.clear()
                self._spawn(self._repair(stream))
        return others

    async def _repair(self, stream: _Stream) -> None:
        """Deliver what ``stream`` is missing from the history, then what was held."""
        channel = stream.channel
        options = self.rules.options(channel)
        assert stream.last is not None
        since = StreamPosition(stream.last, stream.epoch or "")
        read: HistoryRead | None = None
        for attempt in range(REPAIR_ATTEMPTS):
            try:
                read = await self.history.read(channel, since=since, limit=options.history_size,
                                               ttl=options.history_ttl)
                break
            except Exception as exc:
                logger.warning("history repair of %r: read failed (%s), attempt %d", channel,
                               exc, attempt + 1)
                await asyncio.sleep(REPAIR_RETRY)
        if self._streams.get(channel) is not stream:  # no local subscriber any more
            return
        self.metrics.history_repairs.inc()
        if read is None:  # the history is unreachable: say so, go on with what came live
            self._gap(stream, since.offset + 1, None, stream.epoch)
            stream.last = None
        elif read.position.epoch != stream.epoch:
            self._gap(stream, since.offset + 1, None, read.position.epoch)
            stream.epoch, stream.last = read.position.epoch, read.position.offset
        else:
            # Publications held during the read may be newer than it (the read's reply and
            # the live stream travel on two connections): one read that finds nothing new
            # while the live stream is ahead is normal, two in a row are not.
            ahead = any(p.offset is not None and p.epoch == stream.epoch
                        and p.offset > read.position.offset for p in stream.held)
            stalled = ahead and read.position.offset <= since.offset
            stream.stalls = stream.stalls + 1 if stalled else 0
            if read.position.offset < since.offset or stream.stalls >= 2:
                # Same epoch, fewer messages than this process delivered, or a live offset
                # the history never got: Redis lost some (appendfsync everysec, a lagging
                # replica), and its offsets would be reused. Retire the epoch: clients then
                # see recovered:false and this gap, never a duplicate or a silent hole (and
                # no repair loop waiting for what will never come).
                stream.stalls = 0
                try:
                    position = await self.history.new_epoch(channel, since.epoch,
                                                            ttl=options.history_ttl)
                except Exception as exc:
                    logger.warning("history of %r: cannot start a new epoch: %s", channel, exc)
                    position = StreamPosition(read.position.offset, since.epoch)
                self._gap(stream, read.position.offset + 1, None, position.epoch)
                if position.epoch != since.epoch:
                    stream.retired.add(since.epoch)
                stream.epoch, stream.last = position.epoch, position.offset
                self._settle(stream)
                return
            pubs = [p for p in read.publications if p.offset and p.offset > since.offset]
            first = pubs[0].offset if pubs else read.position.offset + 1
            assert first is not None
            if not read.complete and first > since.offset + 1:
                self._gap(stream, since.offset + 1, first - 1, stream.epoch)
            for publication in pubs:
                self._send(stream, publication)
                stream.last = publication.offset
            self.metrics.history_refilled.inc(len(pubs))
            if read.position.offset > (stream.last or 0):
                stream.last = read.position.offset
        self._settle(stream)

    def _send(self, stream: _Stream, publication: Publication) -> None:
        """Write ``publication`` to the channel's subscribers; those catching up get it in
        their buffer instead."""
        conns = self.registry.by_channel.get(stream.channel)
        if not conns:
            return
        waiting, skip = stream.waiting, stream.skip
        if waiting:
            for buffer in waiting.values():
                buffer.append(publication)
        if skip and publication.offset is not None:
            offset = publication.offset
            self._deliver(publication, [c for c in conns if c not in waiting
                                        and skip.get(c, 0) < offset])
            for conn in [c for c, mark in skip.items() if mark <= offset]:
                del skip[conn]
        elif waiting:
            self._deliver(publication, [c for c in conns if c not in waiting])
        else:
            self._deliver(publication, conns)

    def _gap(self, stream: _Stream, first: int | None, last: int | None,
             epoch: str | None) -> None:
        """Tell the subscribers of ``stream`` that offsets ``first..last`` (None: unknown) are
        lost; ``epoch`` is the channel's current one."""
        conns = self.registry.by_channel.get(stream.channel, ())
        frame = stream_gap_frame(stream.channel, first, last, epoch)
        for conn in conns:
            if conn not in stream.waiting:
                send_text(conn, frame)
        self.metrics.gaps.inc(len(conns))
        logger.warning("history gap on %r: offsets %s..%s lost (epoch %s), %d connections told",
                       stream.channel, first, last, epoch, len(conns))

    def _unrecorded(self, channel: str) -> None:
        """Count (and log, at most once per interval) a plain PUBLISH on a history channel."""
        self.metrics.unrecorded_publishes.inc()
        self._unrecorded_unlogged += 1
        now = time.monotonic()
        if now - self._unrecorded_logged >= UNRECORDED_LOG_INTERVAL:
            logger.warning("%d plain PUBLISH(es) on history channels (the last on %r): "
                           "delivered live but not recorded; publish with FCALL hub_publish",
                           self._unrecorded_unlogged, channel)
            self._unrecorded_logged = now
            self._unrecorded_unlogged = 0

    # -- subscribers that catch up ---------------------------------------------------------

    def hold(self, conn: HubConnection, channel: str) -> None:
        """Keep ``conn`` out of ``channel``'s fan-out until :meth:`catch_up` releases it (call
        before subscribing it)."""
        stream = self._streams.get(channel)
        if stream is None:
            self.opened(channel)
            stream = self._streams[channel]
        stream.waiting[conn] = []

    async def catch_up(self, conn: HubConnection, channel: str, *,
                       since: StreamPosition | None, last: int | None,
                       ack: Callable[[Catchup], bytes]) -> None:
        """Read what ``conn`` asked for, then write, in one synchronous step, the ack
        (``ack(catchup)``), the publications it is owed and those buffered meanwhile, and put
        it back into the fan-out. ``conn`` must have been :meth:`hold`-ed and subscribed.

        Without ``since`` and ``last`` the ack carries the process's position and nothing is
        replayed. Raises :class:`BrokerUnavailable` when the history cannot be read within
        :data:`CATCH_UP_TIMEOUT` seconds (``conn`` is released without an ack).
        """
        stream = self._streams.get(channel)
        if stream is None or conn not in stream.waiting:
            return
        options = self.rules.options(channel)
        try:
            await asyncio.wait_for(stream.settled.wait(), CATCH_UP_TIMEOUT)
            read: HistoryRead | None = None
            backlog: HistoryRead | None = None
            if since is not None:
                self.metrics.recoveries.labels("asked").inc()
                read = await asyncio.wait_for(
                    self.history.read(channel, since=since, limit=options.history_size,
                                      ttl=options.history_ttl), CATCH_UP_TIMEOUT)
            if last is not None and (read is None or not self._recovered(read, since)):
                backlog = await asyncio.wait_for(
                    self.history.read(channel, since=None, limit=last,
                                      ttl=options.history_ttl), CATCH_UP_TIMEOUT)
            while stream.busy:  # a repair began meanwhile: let it deliver first
                await asyncio.wait_for(stream.settled.wait(), CATCH_UP_TIMEOUT)
        except (TimeoutError, Exception) as exc:
            stream.waiting.pop(conn, None)
            if isinstance(exc, BrokerUnavailable):
                raise
            raise BrokerUnavailable(f"history of {channel!r} unavailable: {exc}") from None
        # From here on, nothing awaits: no publication can slip between the replay and live.
        buffered = stream.waiting.pop(conn, [])
        if self._streams.get(channel) is not stream or stream.channel not in (
                self.registry.channels_of.get(conn) or ()):
            return
        recovered: bool | None = None
        replay: list[Publication]
        if read is not None:
            recovered = self._recovered(read, since)
            self.metrics.recoveries.labels("succeeded" if recovered else "failed").inc()
        if recovered:
            assert read is not None and since is not None
            replay = self._merge(since.offset, read, buffered)
            position = read.position
        elif backlog is not None:
            start = backlog.publications[0].offset if backlog.publications else None
            base = (start - 1) if start else backlog.position.offset
            replay = self._merge(base, backlog, buffered)
            position = backlog.position
        elif read is not None:
            # Recovery failed and no backlog was asked: what the history still holds after
            # ``since`` in the same epoch (so the client sees exactly which range is lost).
            assert since is not None
            same = read.position.epoch == since.epoch
            held = [p for p in read.publications if same and (p.offset or 0) > since.offset]
            start = held[0].offset if held else None
            base = (start - 1) if start else read.position.offset
            replay = self._merge(base, HistoryRead(read.position, held, True), buffered)
            position = read.position
        else:
            position = StreamPosition(stream.last or 0, stream.epoch or "")
            replay = [p for p in buffered if p.offset is None or p.offset > position.offset]
        send_text(conn, ack(Catchup(position, recovered)))
        if replay:
            for publication in replay:
                self._deliver(publication, (conn,))
            newest = max((p.offset for p in replay if p.offset is not None
                          and p.epoch == stream.epoch), default=0)
            if newest > (stream.last or 0):  # the read ran ahead of the live stream
                stream.skip[conn] = newest

    @staticmethod
    def _recovered(read: HistoryRead, since: StreamPosition | None) -> bool:
        return (since is not None and read.complete
                and read.position.epoch == since.epoch)

    @staticmethod
    def _merge(base: int, read: HistoryRead, buffered: list[Publication]) -> list[Publication]:
        """The publications after ``base``: the read and the buffer merged by offset, then
        the buffered plain publications (no offset), in arrival order."""
        epoch = read.position.epoch
        live = [p for p in buffered if p.offset is not None and p.epoch == epoch]
        result = merge(base, read.publications, read.position.offset, live)
        run = [*result.publications, *result.later]
        return run + [p for p in buffered if p.offset is None]

    # -- publishing and reading ------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes,
                      idempotency_key: str | None = None) -> StreamPosition:
        """Publish into ``channel``'s history (which delivers it to every process)."""
        options = self.rules.options(channel)
        return await self.history.publish(channel, payload, size=options.history_size,
                                          ttl=options.history_ttl,
                                          idempotency_key=idempotency_key)

    async def read(self, channel: str, *, since: StreamPosition | None,
                   limit: int) -> HistoryRead:
        """The ``history`` op: see :meth:`hub.history.base.History.read`."""
        options = self.rules.options(channel)
        return await self.history.read(channel, since=since, limit=limit,
                                       ttl=options.history_ttl)
