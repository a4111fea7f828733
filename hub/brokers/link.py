"""The Redis pub/sub link engine that :class:`~hub.brokers.redis.RedisBroker` and
:class:`~hub.brokers.cluster.ClusterBroker` compose, and the helpers they share.

A :class:`PubSubLink` is one Redis pub/sub connection plus a command connection, rebuilt by
itself when lost. How it is kept honest (docs/reliability.md):

* redis-py is given **no retries** (:func:`no_retry_client`), so a lost link raises instead of
  being silently reconnected and resubscribed with messages lost in between. The link then
  reconnects itself (:class:`Backoff`: every 0.1-0.25 s while the outage is younger than
  5 s, then capped, jittered exponential backoff) and resubscribes every channel its owner
  still wants (:meth:`LinkOwner.wanted`); the owner reports the gap.
* A liveness probe PUBLISHes (or SPUBLISHes) a sequence number to a private channel of this
  process every ``probe_interval`` seconds; if it does not come back on the pub/sub connection
  within ``timeout`` seconds, the link is declared dead and rebuilt. A frozen Redis (SIGSTOP),
  a half-open TCP link, or a subscription Redis dropped for exceeding
  ``client-output-buffer-limit pubsub`` are all detected within ``probe_interval + timeout``
  seconds, a closed socket at once.
* The probe also measures the link's **lag**: it travels the same pub/sub stream as the data,
  so its round trip is the age of the backlog in front of it (:attr:`PubSubLink.lag`).

The link owns its state (the connections, :attr:`PubSubLink.live`, :attr:`PubSubLink.ready`,
:attr:`PubSubLink.reconnects`); the owner owns which channels are wanted where. They talk only
through the link's methods and the :class:`LinkOwner` hooks the link calls.

Commands: SUBSCRIBE, UNSUBSCRIBE, PUBLISH, or their sharded forms SSUBSCRIBE, SUNSUBSCRIBE,
SPUBLISH (:data:`SHARDED`), and PING (https://redis.io/docs/latest/commands/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOTHING
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ..history.base import parse_history_message
from .base import Publication

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MIN_DELAY",
    "PUBSUB",
    "SHARDED",
    "Backoff",
    "Flavour",
    "LinkOwner",
    "PubSubLink",
    "no_retry_client",
    "redact_url",
    "stop_task",
]

logger = logging.getLogger("hub.broker")

#: Reconnect delays after the fast phase: random() * min(BACKOFF_CAP, BACKOFF_BASE * 2**n)
#: seconds, never below MIN_DELAY (see :class:`Backoff`).
BACKOFF_BASE = 0.25
BACKOFF_CAP = 5.0
MIN_DELAY = 0.1


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays (seconds), pure: a young outage is retried fast, an old one backs off.

    While the outage is younger than ``fast_for`` seconds (a Redis restart, a failover), every
    delay is uniform in ``[fast_min, fast_max]``, so the link is back within ``fast_max``
    seconds of Redis answering again. After that, full-jitter exponential backoff:
    ``random() * min(cap, base * 2**n)`` for the ``n``-th failure (from 0) past the fast phase,
    never below ``fast_min``; ``cap`` bounds every delay.
    """

    fast_min: float = MIN_DELAY
    fast_max: float = 0.25
    fast_for: float = 5.0
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP

    def delay(self, outage: float, late_failures: int, rand: float | None = None) -> float:
        """The seconds to wait before the next attempt.

        ``outage``: seconds since the link was lost (or first tried); ``late_failures``:
        failed attempts since the fast phase ended (0 during it); ``rand`` in [0, 1), drawn
        from :func:`random.random` when None.
        """
        r = random.random() if rand is None else rand
        if outage < self.fast_for:
            return self.fast_min + r * (self.fast_max - self.fast_min)
        ceiling = min(self.cap, self.base * 2.0 ** min(late_failures, 32))
        return min(self.cap, max(self.fast_min, r * ceiling))

    def is_fast(self, outage: float) -> bool:
        """True while ``outage`` seconds old is still in the fast phase."""
        return outage < self.fast_for


def _no_history(channel: str) -> bool:
    return False


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def no_retry_client(url: str, timeout: float) -> aioredis.Redis:
    """A client without redis-py retries: a failure raises and the link decides.

    ``timeout`` (seconds) bounds connecting and every command; blocking pub/sub reads are
    not bounded by it (redis-py reads them with no timeout).
    """
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=timeout,
                                   socket_connect_timeout=timeout, health_check_interval=0)


async def _buffered_reply(pubsub: aioredis.client.PubSub) -> Any:
    """The next reply already complete in the parser buffer of ``pubsub``'s connection,
    taken out of it and made what ``PubSub.parse_response`` would return for it (give it to
    ``PubSub.handle_message``; an error reply is returned as its ``ResponseError``), or
    ``_NOTHING`` when no reply is complete there. Never reads the socket: it awaits only
    redis-py's push handler, which does no I/O.

    redis-py (8.x) reads a pub/sub connection through its hiredis parser: each socket read
    (up to 64 KiB) is fed to a ``hiredis.Reader``, whose ``gets()`` returns the next complete
    reply or the ``notEnoughData`` sentinel; ``get_message`` takes one reply from it and
    reads the socket only when it has none. This does what the parser's ``read_response``
    does with a reply it has (RESP3 push replies through ``handle_push_response``, the
    connection errors raised), minus the socket read. With another parser every reply goes
    through ``get_message``, one at a time. tests/integration/test_coalesce.py guards these
    details of redis-py."""
    conn = pubsub.connection
    if conn is None:
        return _NOTHING
    parser = conn._parser
    if type(parser) is not _AsyncHiredisParser or not parser._connected:
        return _NOTHING
    reader = parser._reader
    if reader is None:
        return _NOTHING
    response = reader.gets()
    if response is _NOTHING:
        return _NOTHING
    if isinstance(response, RedisConnectionError):
        raise response
    push = parser._hiredis_PushNotificationType
    if push is not None and isinstance(response, push):
        return await parser.handle_push_response(response)
    if isinstance(response, list) and response and isinstance(response[0],
                                                               RedisConnectionError):
        raise response[0]
    return response


async def stop_task(task: asyncio.Task[Any] | None, timeout: float = 2.0) -> bool:
    """Cancel ``task`` and wait up to ``timeout`` seconds for it to end; True if it did.

    The cancellation is repeated every 0.1 s: on Python 3.11 ``asyncio.wait_for`` can swallow
    a cancellation that arrives as its inner await fails, and a reconnect loop that catches
    that failure would otherwise run on forever.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, remaining))
    return True


@dataclass(frozen=True, slots=True)
class Flavour:
    """The commands of one pub/sub flavour: redis-py method names and the message type."""

    subscribe: str
    unsubscribe: str
    publish: str
    message: str
    #: One (S)SUBSCRIBE or (S)UNSUBSCRIBE per hash slot (Redis Cluster answers CROSSSLOT to a
    #: sharded command on keys in several slots).
    by_slot: bool


#: Classic pub/sub: SUBSCRIBE, UNSUBSCRIBE, PUBLISH.
PUBSUB = Flavour("subscribe", "unsubscribe", "publish", "message", by_slot=False)
#: Sharded pub/sub (Redis >= 7.0): SSUBSCRIBE, SUNSUBSCRIBE, SPUBLISH.
SHARDED = Flavour("ssubscribe", "sunsubscribe", "spublish", "smessage", by_slot=True)


class LinkOwner(Protocol):
    """The hooks a :class:`PubSubLink` calls on the broker that owns it.

    Each is called from the link's task, synchronously, with the link as first argument (one
    owner may have several links). They may read the link (:attr:`PubSubLink.live`,
    :attr:`PubSubLink.ready`) but change it only through its methods.
    """

    def probe_channel(self, link: PubSubLink) -> bytes:
        """The Redis channel of ``link``'s liveness probe; asked at every connect."""
        ...

    def wanted(self, link: PubSubLink) -> set[str]:
        """The hub channels ``link`` must carry now (a set the link may keep)."""
        ...

    def carries(self, link: PubSubLink, channel: str) -> bool:
        """Whether ``channel`` is still meant for ``link`` (a confirmation makes it live)."""
        ...

    def confirmed(self, link: PubSubLink, channel: str) -> None:
        """Redis confirmed the subscription of a carried ``channel``, now in ``link.live``."""
        ...

    def dropped(self, link: PubSubLink, channel: str) -> bool:
        """Redis confirmed (or pushed) the end of the subscription of ``channel``; return True
        to take it out of ``link.live``."""
        ...

    def link_ready(self, link: PubSubLink, reconnect: bool) -> None:
        """Every subscription of ``link`` is confirmed; ``reconnect``: after a loss (then
        ``link.reconnects`` was counted up)."""
        ...

    def link_lost(self, link: PubSubLink, was_ready: bool) -> None:
        """``link``'s connection is being thrown away; ``link.live`` still holds its channels
        and ``link.ready`` is already False."""
        ...

    def refused(self, link: PubSubLink, exc: ResponseError) -> None:
        """Redis answered an error on the pub/sub connection. Raise it to rebuild the link."""
        ...


class PubSubLink:
    """One Redis pub/sub connection plus a command connection, rebuilt by itself when lost.

    The loop: connect, (S)SUBSCRIBE the probe channel and every channel of
    :meth:`LinkOwner.wanted`, wait for the confirmations (a PING on the pub/sub connection
    answers after them), mark the link :attr:`ready`, then read until the reader or the
    liveness probe fails; tear down, wait a capped jittered backoff, start again.

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://`` for
    TLS); ``prefix`` the Redis channel prefix (bytes); ``probe_interval`` and ``timeout`` are
    seconds (``timeout`` bounds connecting, every command and the probe's round trip).
    ``history`` tells the channels that keep a history: for those the link also subscribes
    their history channel ``{<prefix><channel>}:h`` (docs/protocol.md section 6), whose
    messages it hands over with their offset and epoch, and a channel is live once both of its
    subscriptions are confirmed. ``presence`` tells the channels with join and leave events:
    the link also subscribes their presence channel ``{<prefix><channel>}:j`` and hands its
    messages over as publications with ``presence=True``.
    """

    def __init__(self, url: str, owner: LinkOwner, *, prefix: bytes, probe_interval: float,
                 timeout: float, flavour: Flavour = PUBSUB,
                 history: Callable[[str], bool] | None = None,
                 presence: Callable[[str], bool] | None = None) -> None:
        self.url = url
        self.history = history or _no_history
        self.presence = presence or _no_history
        self._confirmed: set[bytes] = set()  # Redis channels confirmed on this connection
        self.name = redact_url(url)
        self.prefix = prefix
        self._prefix_str = prefix.decode()
        self.flavour = flavour
        self.probe_interval = probe_interval
        self.timeout = timeout
        self.confirm_timeout = max(5.0, 2 * timeout)
        self._owner = owner
        self._deliver: Callable[[Publication], None] | None = None
        self._deliver_many: Callable[[list[Publication]], None] | None = None
        self._live: set[str] = set()
        self._ready = False
        self._reconnects = 0
        self._client: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._backoff = Backoff()
        self._attempts = 0
        self._probe_seen = 0
        self._probe_sent = 0  # seq of the last probe published
        self._probe_sent_at: float | None = None  # time.monotonic() it was sent, if outstanding
        self._probe_rtt = 0.0  # seconds, round trip of the last probe that came back
        self._probe_event: asyncio.Event | None = None
        self._barrier: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # (S)SUBSCRIBE (True) / (S)UNSUBSCRIBE (False) not sent yet, by hub channel; sent by
        # _flush, scheduled in the iteration of the first of them.
        self._pending: dict[str, bool] = {}
        self._flush_handle: asyncio.Handle | None = None

    # -- state (read-only outside) ---------------------------------------------------------

    @property
    def live(self) -> AbstractSet[str]:
        """Channels confirmed subscribed on the current connection."""
        return self._live

    @property
    def ready(self) -> bool:
        """True from the confirmation of every subscription until the link is lost."""
        return self._ready

    @property
    def reconnects(self) -> int:
        """Incremented each time the link is confirmed again after a loss."""
        return self._reconnects

    @property
    def connect_attempts(self) -> int:
        """Incremented at every attempt to (re)build the link, successful or not."""
        return self._attempts

    @property
    def lag(self) -> float:
        """Seconds the link lags behind Redis: the round trip of the last liveness probe, or
        the age of the one outstanding if that is larger. The probe travels the same pub/sub
        stream as the data, so this is the age of the backlog in front of it (plus one Redis
        round trip). 0.0 while the link is not ready."""
        if not self._ready:
            return 0.0
        sent = self._probe_sent_at
        if sent is None:
            return self._probe_rtt
        return max(self._probe_rtt, time.monotonic() - sent)

    def is_live(self, channel: str) -> bool:
        return channel in self._live

    def key(self, channel: str) -> bytes:
        """The Redis channel of hub channel ``channel``."""
        return self.prefix + channel.encode()

    def keys(self, channel: str) -> list[bytes]:
        """Every Redis channel the link subscribes for ``channel``: its own, its history
        channel ``{<prefix><channel>}:h`` when it keeps a history, and its presence channel
        ``{<prefix><channel>}:j`` when it has join and leave events."""
        key = self.prefix + channel.encode()
        keys = [key]
        if self.history(channel):
            keys.append(b"{" + key + b"}:h")
        if self.presence(channel):
            keys.append(b"{" + key + b"}:j")
        return keys

    def _channel_of(self, name: bytes) -> str:
        """The hub channel of Redis channel ``name`` (its own, its history or its presence
        channel)."""
        if name.startswith(b"{") and (name.endswith(b"}:h") or name.endswith(b"}:j")):
            name = name[1:-3]
        return name[len(self.prefix):].decode(errors="replace")

    # -- commands --------------------------------------------------------------------------

    def start(self, deliver: Callable[[Publication], None],
              deliver_many: Callable[[list[Publication]], None] | None = None) -> None:
        """Start the link task; every message received goes to ``deliver``, which must not
        block (an exception from it is logged and the message dropped). With
        ``deliver_many`` (:func:`hub.brokers.base.batch_handler`), the messages the reader
        finds already complete in its buffer after one (a burst) go there together, in
        order, in one call (see :meth:`_read`)."""
        self._deliver = deliver
        self._deliver_many = deliver_many
        self._probe_event = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"redis-link {self.name}")

    async def stop(self) -> None:
        """Stop the task and close both connections (``link_lost`` is called once more)."""
        self._closing = True
        if not await stop_task(self._task):
            logger.warning("redis %s: the link task did not stop", self.name)
        await self._teardown()

    async def subscribe(self, channel: str) -> None:
        """Queue (S)SUBSCRIBE of ``channel`` on the current connection, if any; the
        confirmation arrives through :meth:`LinkOwner.confirmed`. Never raises, never waits.

        Every (S)SUBSCRIBE and (S)UNSUBSCRIBE asked for within one event-loop iteration goes
        out together at the start of the next one, as one command per flavour (one per hash
        slot in the sharded flavour), in one write (:meth:`_flush`): a reconnect storm's
        thousands of personal channels cost a few commands, not one each. Asked twice in one
        iteration, the last word wins (subscribe then unsubscribe: unsubscribed)."""
        self._queue(channel, True)

    async def unsubscribe(self, channel: str) -> None:
        """Take ``channel`` out of :attr:`live` now and queue (S)UNSUBSCRIBE (see
        :meth:`subscribe`). Never raises, never waits."""
        self._live.discard(channel)
        self._confirmed.difference_update(self.keys(channel))
        self._queue(channel, False)

    async def publish(self, channel: str, payload: bytes, *, presence: bool = False) -> int:
        """(S)PUBLISH ``payload`` on the command connection within :attr:`timeout` seconds
        (to the channel's presence channel ``{<prefix><channel>}:j`` with ``presence``);
        return Redis's reply (the number of subscribed connections).

        Raises :class:`ConnectionError` if the link is not ready, and what redis-py raises
        (:class:`redis.exceptions.RedisError`, :class:`OSError`, :class:`TimeoutError`).
        """
        client = self._client
        if client is None or not self._ready:
            raise ConnectionError(f"Redis {self.name} is not connected")
        command = getattr(client, self.flavour.publish)
        key = self.key(channel)
        if presence:
            key = b"{" + key + b"}:j"
        return int(await asyncio.wait_for(command(key, payload), self.timeout))

    def _queue(self, channel: str, subscribe: bool) -> None:
        """Note ``channel`` for the next :meth:`_flush` (scheduled if it is not), unless
        there is no connection: a new one subscribes what the owner wants."""
        if self._pubsub is None:
            return
        self._pending[channel] = subscribe
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what :meth:`_queue` collected: one (S)UNSUBSCRIBE, then one (S)SUBSCRIBE
        (per hash slot when sharded), in one write. Each channel is in at most one of them,
        so their order does not matter."""
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        pubsub = self._pubsub
        if pubsub is None or not pending:
            return
        keys = self.keys
        flavour = self.flavour
        self._write(pubsub, [
            *((flavour.unsubscribe, group) for group in self._group(
                [k for c, sub in pending.items() if not sub for k in keys(c)])),
            *((flavour.subscribe, group) for group in self._group(
                [k for c, sub in pending.items() if sub for k in keys(c)]))])

    def _write(self, pubsub: aioredis.client.PubSub,
               commands: list[tuple[str, list[bytes]]]) -> None:
        """Write (S)SUBSCRIBE/(S)UNSUBSCRIBE ``commands`` (name, keys) on ``pubsub``'s
        connection now, in one write, without waiting; a failure is left to the reader and
        the probe, which rebuild the link and resubscribe. Never raises.

        Packed by redis-py (``Connection.pack_commands``) and written to its stream writer
        directly: redis-py's own ``PubSub.subscribe`` costs a command path with a timeout task
        per call and, being awaited, could be overtaken by a later call's write.  Writes made
        here are in call order, before any command awaited through redis-py afterwards (the
        connect barrier's PING). The link never lets redis-py reconnect the pub/sub
        connection, so redis-py need not know these channels to resubscribe them.
        tests/integration/test_link_batch.py guards these details of redis-py."""
        if not commands:
            return
        conn = pubsub.connection
        writer = None if conn is None else getattr(conn, "_writer", None)
        if conn is None or writer is None:  # not connected: the reader notices
            return
        try:
            writer.write(b"".join(conn.pack_commands(
                [(name.upper(), *keys) for name, keys in commands])))
        except Exception as exc:  # a broken connection: the reader and the probe notice
            logger.debug("redis %s: %d (un)subscribe commands failed: %s", self.name,
                         len(commands), exc)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = late = 0
        had_link = False
        outage_start = loop.time()
        while not self._closing:
            try:
                await self._session(had_link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if self._ready:
                    logger.warning("redis %s: link lost (%s); reconnecting", self.name, reason)
                elif failures == 0:
                    logger.warning("redis %s: cannot connect (%s); retrying with backoff",
                                   self.name, reason)
                else:
                    logger.debug("redis %s: still down (%s)", self.name, reason)
            had_link = had_link or self._ready
            if self._ready:
                failures = late = 0
                outage_start = loop.time()
            await self._teardown()
            if self._closing:
                return
            failures += 1
            outage = loop.time() - outage_start
            await asyncio.sleep(self._backoff.delay(outage, late))
            if not self._backoff.is_fast(outage):
                late += 1

    def _group(self, keys: list[bytes]) -> list[list[bytes]]:
        """Split the (S)SUBSCRIBE or (S)UNSUBSCRIBE of ``keys`` into commands: one, or one
        per hash slot (the sharded flavour: Redis Cluster answers CROSSSLOT otherwise)."""
        if not keys:
            return []
        if not self.flavour.by_slot:
            return [keys]
        by_slot: defaultdict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            by_slot[key_slot(key)].append(key)
        return list(by_slot.values())

    async def _session(self, had_link: bool) -> None:
        owner = self._owner
        self._attempts += 1
        self._probe_sent_at = None
        self._probe_rtt = 0.0
        client = self._client = no_retry_client(self.url, self.timeout)
        pubsub = client.pubsub()
        subscribe = getattr(pubsub, self.flavour.subscribe)
        probe = owner.probe_channel(self)
        await asyncio.wait_for(subscribe(probe), self.timeout)  # connects
        # No await from here to the PING: every channel wanted now is written before it, and
        # every channel asked for later is queued (subscribe()) on this connection.
        self._pubsub = pubsub
        wanted = owner.wanted(self)
        self._write(pubsub, [(self.flavour.subscribe, keys) for keys in
                             self._group([k for c in wanted for k in self.keys(c)])])
        self._barrier = asyncio.get_running_loop().create_future()
        token = uuid.uuid4().hex
        tasks = {asyncio.create_task(self._read(pubsub, probe, token))}
        try:
            await asyncio.wait_for(pubsub.ping(token), self.timeout)
            done, _ = await asyncio.wait({*tasks, self._barrier}, timeout=self.confirm_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done & tasks:
                task.result()
            if not self._barrier.done():
                raise TimeoutError(f"no confirmation of SUBSCRIBE within "
                                   f"{self.confirm_timeout:g}s")
            self._ready = True
            logger.info("redis %s: connected, %d channels subscribed", self.name,
                        len(self._live))
            if had_link:
                self._reconnects += 1
            owner.link_ready(self, had_link)
            tasks.add(asyncio.create_task(self._probe(client, probe)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("reader stopped")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, pubsub: aioredis.client.PubSub, probe: bytes, token: str) -> None:
        """The one reader of the link. Hands messages to ``deliver`` without awaiting.

        Bursts: after each reply it reads, the reader takes every further reply that is
        already complete in the connection's parser buffer (:func:`_buffered_reply`: the
        bytes of one socket read, up to redis-py's 64 KiB, never awaiting the socket). The
        publications among them go to ``deliver_many`` in one call, in order; anything else
        (a confirmation, a pong, the probe, an error) is handled where it stands, once the
        publications before it are handed over, so the order of everything on the link is
        kept. The confirmations of a batch of (S)SUBSCRIBE (:meth:`_flush`) are so read in
        one go rather than one by one through redis-py's read path. It never waits for
        more: a reply not yet complete ends the burst and is read as usual.
        """
        deliver = self._deliver
        assert deliver is not None, "start() first"
        deliver_many = self._deliver_many
        get_message = pubsub.get_message
        handle_message = pubsub.handle_message
        message = self.flavour.message
        publication_of = self._publication
        control = self._control
        take = _buffered_reply if deliver_many is not None else None
        while True:
            try:
                msg = await get_message(timeout=None)
            except ResponseError as exc:
                self._owner.refused(self, exc)
                continue
            if msg is None:
                continue
            publication = None
            if msg["type"] != message or msg["channel"] == probe:
                control(msg, probe, token)
            else:
                publication = publication_of(msg["channel"], msg["data"])
            reply = _NOTHING if take is None else await take(pubsub)
            if reply is _NOTHING:  # the usual case below saturation: one reply
                if publication is not None:
                    try:
                        deliver(publication)
                    except Exception:  # one bad message must not deafen the hub
                        logger.exception("redis %s: delivery failed", self.name)
                continue
            assert take is not None
            burst = [] if publication is None else [publication]
            try:
                while reply is not _NOTHING:
                    if isinstance(reply, ResponseError):
                        burst = self._hand_over(burst)
                        self._owner.refused(self, reply)
                    else:
                        msg = (await handle_message(reply)  # type: ignore[no-untyped-call]
                               if reply else None)
                        if msg is None:
                            pass
                        elif msg["type"] != message or msg["channel"] == probe:
                            burst = self._hand_over(burst)
                            control(msg, probe, token)
                        else:
                            publication = publication_of(msg["channel"], msg["data"])
                            if publication is not None:
                                burst.append(publication)
                    reply = await take(pubsub)
            finally:  # also when the link fails mid-burst: what was read is handed over
                self._hand_over(burst)

    def _hand_over(self, burst: list[Publication]) -> list[Publication]:
        """Deliver ``burst`` (one publication to ``deliver``, more to ``deliver_many``);
        return an empty list for the next one."""
        if burst:
            try:
                if len(burst) == 1:
                    assert self._deliver is not None
                    self._deliver(burst[0])
                else:
                    assert self._deliver_many is not None
                    self._deliver_many(burst)
            except Exception:  # one bad message must not deafen the hub
                logger.exception("redis %s: delivery failed", self.name)
            return []
        return burst

    def _publication(self, name: bytes, data: bytes) -> Publication | None:
        """The publication of a pub/sub message on Redis channel ``name`` (its own, its
        history or its presence channel), or None to skip it (not the hub's; logged)."""
        plen = len(self.prefix)
        try:
            if name[:1] == b"{" and name[-3:] == b"}:j":
                channel = name[1 + plen:-3]
                if name[1:1 + plen] != self.prefix or not channel or b"}" in channel:
                    return None
                return Publication(channel.decode(), data, presence=True)
            if name[:1] == b"{":
                try:
                    return parse_history_message(name, data, prefix=self._prefix_str)
                except ValueError as exc:  # not the hub's function: skip it
                    logger.debug("redis %s: %s", self.name, exc)
                    return None
            return Publication(name[plen:].decode(), data)
        except Exception:  # one bad message must not deafen the hub
            logger.exception("redis %s: delivery failed", self.name)
            return None

    def _control(self, msg: dict[str, Any], probe: bytes, token: str) -> None:
        """Every reply of the pub/sub connection but a publication: the probe coming back,
        subscribe and unsubscribe confirmations, the pong of the connect barrier."""
        owner, live, confirmed = self._owner, self._live, self._confirmed
        kind = msg["type"]
        flavour = self.flavour
        if kind == flavour.message:  # the probe
            self._probe_returned(int(msg["data"]))
        elif kind == flavour.subscribe:
            name = msg["channel"]
            if name != probe:
                channel = self._channel_of(name)
                confirmed.add(name)
                if owner.carries(self, channel) and confirmed.issuperset(self.keys(channel)):
                    live.add(channel)
                    owner.confirmed(self, channel)
        elif kind == flavour.unsubscribe:
            confirmed.discard(msg["channel"])
            channel = self._channel_of(msg["channel"])
            if owner.dropped(self, channel):
                live.discard(channel)
        elif kind == "pong":
            data = msg["data"]
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            if data == token and self._barrier is not None and not self._barrier.done():
                self._barrier.set_result(None)

    def _probe_returned(self, seq: int) -> None:
        """The reader got probe ``seq`` back: record the round trip, wake the probe task."""
        self._probe_seen = seq
        sent = self._probe_sent_at
        if seq == self._probe_sent and sent is not None:
            self._probe_rtt = time.monotonic() - sent
            self._probe_sent_at = None
        assert self._probe_event is not None
        self._probe_event.set()

    async def _probe(self, client: aioredis.Redis, probe: bytes) -> None:
        """Publish a sequence number to our probe channel; it must come back in time. Its
        round trip is the link's :attr:`lag`."""
        assert self._probe_event is not None
        loop = asyncio.get_running_loop()
        publish = getattr(client, self.flavour.publish)
        seq = self._probe_seen
        while True:
            await asyncio.sleep(self.probe_interval)
            seq += 1
            deadline = loop.time() + self.timeout
            self._probe_sent, self._probe_sent_at = seq, time.monotonic()
            try:
                await asyncio.wait_for(publish(probe, str(seq)), self.timeout)
                while self._probe_seen < seq:
                    self._probe_event.clear()
                    await asyncio.wait_for(self._probe_event.wait(),
                                           max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise TimeoutError("liveness probe timed out") from None

    async def _teardown(self) -> None:
        was_ready = self._ready
        self._ready = False
        self._owner.link_lost(self, was_ready)
        self._live.clear()
        self._confirmed.clear()
        if self._flush_handle is not None:  # a new connection subscribes what is wanted
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        for closer in (pubsub, client):
            if closer is None:
                continue
            # Teardown of a link that may already be broken: nothing to do about a failure.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer.aclose(), 1.0)
