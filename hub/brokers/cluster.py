"""The Redis Cluster broker: sharded pub/sub, one :class:`PubSubLink` per master.

Hub channel ``news`` is the shard channel ``<prefix>news`` (default prefix ``hub:``); it lives
on the master that owns its key slot (CRC16 of the name, or of the part between the first
``{`` and the next ``}``, modulo 16384), and a backend reaches its subscribers with
``SPUBLISH hub:news <payload>`` sent to that master (``redis-cli -c``, or any cluster client).

How the links are kept honest (the same rules as :class:`hub.brokers.redis.RedisBroker`):

* The slot map comes from ``CLUSTER SLOTS``, asked of a connected master or else the seed
  node. There is one link per master that owns slots (:mod:`hub.brokers.link`, in its sharded
  flavour): a pub/sub connection carrying the ``SSUBSCRIBE`` of every wanted channel in the
  master's slots, and a command connection for ``SPUBLISH``. redis-py gets no retries on
  either; a lost link rebuilds itself with capped, jittered backoff and resubscribes from this
  broker's wanted set, and the channels that were live on the lost link are reported to
  :meth:`~hub.brokers.base.BrokerHandler.on_gap` once they are confirmed again.
* Each link has its own liveness probe: every ``probe_interval`` seconds it SPUBLISHes to a
  private shard channel (``<prefix>$probe:{<tag>}:<id>``, its tag chosen so that the channel
  hashes to a slot of that master) and expects it back within ``probe_timeout`` seconds.
* The slot map is read again when a link fails (a replica may have been promoted), when a
  master pushes ``sunsubscribe`` for a wanted channel (Redis does so when the channel's slot
  moves to another master), and when a command is answered ``MOVED`` or with another error.
  Channels whose slot moved are subscribed on the new owner and reported to ``on_gap``.

Commands: CLUSTER SLOTS, SSUBSCRIBE, SUNSUBSCRIBE, SPUBLISH, PING
(https://redis.io/docs/latest/commands/cluster-slots/,
https://redis.io/docs/latest/commands/ssubscribe/,
https://redis.io/docs/latest/commands/sunsubscribe/,
https://redis.io/docs/latest/commands/spublish/).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, RedisError, ResponseError

from ..exceptions import BrokerUnavailable
from .base import Broker, batch_handler
from .link import (
    BACKOFF_CAP,
    SHARDED,
    Backoff,
    PubSubLink,
    no_retry_client,
    redact_url,
    stop_task,
)

__all__ = ["ClusterBroker", "node_url"]

logger = logging.getLogger("hub.broker")


def node_url(seed_url: str, host: str, port: int) -> str:
    """``seed_url`` (credentials, TLS, options) pointed at ``host:port`` instead."""
    parts = urlsplit(seed_url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


class ClusterBroker(Broker):
    """Sharded pub/sub on a Redis Cluster (Redis >= 7.0), found from one seed node.

    ``seed_url`` is a redis-py URL of any cluster node (``redis://[user:password@]host:port``,
    ``rediss://`` for TLS); the other masters are reached with the same credentials at the
    address the cluster announces. ``prefix`` is the Redis channel prefix; ``probe_interval``
    the seconds between liveness probes and ``probe_timeout`` the seconds a probe, a connect or
    a command may take. :attr:`connected` is true while every master that owns slots has a
    confirmed link; a lost master affects only the channels in its slots.
    """

    def __init__(self, seed_url: str, *, prefix: str = "hub:", probe_interval: float = 1.0,
                 probe_timeout: float = 2.0,
                 history: Callable[[str], bool] | None = None,
                 presence: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.history = history
        self.presence = presence
        self.seed_url = seed_url
        self.name = redact_url(seed_url)
        self.prefix = prefix.encode()
        self.probe_interval = probe_interval
        self.timeout = probe_timeout
        self.id = uuid.uuid4().hex.encode()
        self.backoff = Backoff()
        self.dirty = asyncio.Event()  # set: read the slot map again
        self.links: dict[str, PubSubLink] = {}  # "host:port" of each master -> its link
        self.route: dict[str, PubSubLink] = {}  # wanted channel -> the link it is subscribed on
        self._lost: set[str] = set()  # channels live on a lost link, not yet confirmed again
        self._slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._want: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._state = False
        self._reconnects = 0

    # -- Broker interface ------------------------------------------------------------------

    async def start(self) -> None:
        self.handler  # noqa: B018 - raises if unbound, before any link starts
        self.dirty.set()
        self._task = asyncio.create_task(self._run(), name=f"redis-cluster {self.name}")

    async def stop(self) -> None:
        await stop_task(self._task)
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.stop() for link in links))

    @property
    def connected(self) -> bool:
        return bool(self.links) and all(link.ready for link in self.links.values())

    @property
    def reconnects(self) -> int:
        """Incremented each time a lost master link is confirmed again."""
        return self._reconnects

    @property
    def connect_attempts(self) -> int:
        return sum(link.connect_attempts for link in self.links.values())

    @property
    def lag(self) -> float:
        """The largest :attr:`~hub.brokers.link.PubSubLink.lag` of the master links."""
        return max((link.lag for link in self.links.values()), default=0.0)

    def is_live(self, channel: str) -> bool:
        link = self.route.get(channel)
        return link is not None and link.is_live(channel)

    async def subscribe(self, channel: str, timeout: float) -> None:
        """Return once the master of the channel's slot confirms ``SSUBSCRIBE <prefix><channel>``
        (https://redis.io/docs/latest/commands/ssubscribe/). Idempotent.

        Raises :class:`BrokerUnavailable` if that takes more than ``timeout`` seconds; the
        channel then stays wanted and is subscribed once its master is reachable.
        """
        self._want.add(channel)
        if self.is_live(channel):
            return
        waiter = self._waiters.get(channel)
        if waiter is None:
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
            await self._place(channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"Redis Cluster {self.name} did not confirm SSUBSCRIBE "
                                    f"{channel!r} in {timeout:g}s") from None

    async def unsubscribe(self, channel: str) -> None:
        """``SUNSUBSCRIBE`` (https://redis.io/docs/latest/commands/sunsubscribe/). Idempotent;
        never raises: a lost link forgets its subscriptions anyway."""
        self._want.discard(channel)
        self._waiters.pop(channel, None)
        self._lost.discard(channel)
        link = self.route.pop(channel, None)
        if link is not None:
            await link.unsubscribe(channel)

    async def publish(self, channel: str, payload: bytes, *, presence: bool = False) -> int:
        """``SPUBLISH <prefix><channel> <payload>`` on the master of the channel's slot
        (https://redis.io/docs/latest/commands/spublish/), following one ``MOVED``.

        Returns SPUBLISH's reply: the number of hub processes subscribed to the channel.
        Raises :class:`BrokerUnavailable` if that master has no confirmed link, or the
        command fails or takes more than ``probe_timeout`` seconds.
        """
        node = self.owner(self.key(channel))
        for _ in range(2):
            link = self.links.get(node or "")
            if link is None or not link.ready:
                raise BrokerUnavailable(f"Redis Cluster {self.name}: no link to the master "
                                        f"of {channel!r} ({node or 'slot not covered'})")
            try:
                return await link.publish(channel, payload, presence=presence)
            except AskError as exc:  # MovedError too: the slot has another owner
                self.dirty.set()
                node = f"{exc.host}:{exc.port}"
            except (RedisError, OSError, TimeoutError) as exc:
                raise BrokerUnavailable(f"SPUBLISH to Redis {link.name} failed: {exc}") from None
        raise BrokerUnavailable(f"Redis Cluster {self.name}: {channel!r} moved twice")

    async def publish_presence(self, channel: str, payload: bytes) -> int:
        """``SPUBLISH {<prefix><channel>}:j <payload>`` (the slot of the channel's own key);
        see :meth:`Broker.publish_presence`."""
        return await self.publish(channel, payload, presence=True)

    # -- routing ---------------------------------------------------------------------------

    def key(self, channel: str) -> bytes:
        return self.prefix + channel.encode()

    def owner(self, key: bytes) -> str | None:
        """``host:port`` of the master serving ``key``'s slot, as last read; None: unknown."""
        return self._slots[key_slot(key)]

    async def _place(self, channel: str) -> None:
        """Subscribe a wanted channel on the master of its slot, leaving the old one if it
        moved; resend SSUBSCRIBE if it is not confirmed (an earlier one was refused)."""
        link = self.links.get(self.owner(self.key(channel)) or "")
        old = self.route.get(channel)
        if old is not None and old is not link:
            del self.route[channel]
            if old.is_live(channel):
                self._lost.add(channel)
            await old.unsubscribe(channel)
        if link is None:
            self.dirty.set()
            return
        self.route[channel] = link
        if not link.is_live(channel):
            await link.subscribe(channel)

    def state_changed(self) -> None:
        connected = self.connected
        if connected != self._state:
            self._state = connected
            self.handler.on_state(connected)

    # -- LinkOwner hooks (called by the links only) ----------------------------------------

    def probe_channel(self, link: PubSubLink) -> bytes:
        """A private shard channel of this process whose slot ``link``'s master serves."""
        node = next((node for node, on in self.links.items() if on is link), None)
        if node is not None:
            for tag in range(1 << 17):  # tags 0..109757 cover all 16384 slots
                key = b"%s$probe:{%d}:%s" % (self.prefix, tag, self.id)
                if self.owner(key) == node:
                    return key
        raise ConnectionError(f"{node or link.name} serves no hash slot")

    def wanted(self, link: PubSubLink) -> set[str]:
        return {channel for channel, on in self.route.items() if on is link}

    def carries(self, link: PubSubLink, channel: str) -> bool:
        return self.route.get(channel) is link

    def confirmed(self, link: PubSubLink, channel: str) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if link.ready and channel in self._lost:
            self._lost.discard(channel)
            self.handler.on_gap([channel])

    def dropped(self, link: PubSubLink, channel: str) -> bool:
        """``link``'s master unsubscribed ``channel`` (its slot moved), or confirmed ours."""
        if self.route.get(channel) is not link:
            return False
        was_live = link.is_live(channel)
        if was_live:
            self._lost.add(channel)
        self.dirty.set()
        return was_live

    def link_ready(self, link: PubSubLink, reconnect: bool) -> None:
        if reconnect:
            self._reconnects += 1
        self.state_changed()
        gap = link.live & self._lost
        if gap:
            self._lost -= gap
            self.handler.on_gap(sorted(gap))

    def link_lost(self, link: PubSubLink, was_ready: bool) -> None:
        self._lost |= link.live
        self.dirty.set()  # a replica may have taken over
        if was_ready:
            self.state_changed()

    def refused(self, link: PubSubLink, exc: ResponseError) -> None:
        """An SSUBSCRIBE refused (MOVED, CLUSTERDOWN, ...): read the slot map again."""
        logger.debug("redis %s: %s", link.name, exc)
        self.dirty.set()

    # -- the slot map ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Read the slot map whenever :attr:`dirty` is set, with backoff between rounds (fast
        for the first seconds of a streak of rounds, see :class:`~hub.brokers.link.Backoff`)."""
        loop = asyncio.get_running_loop()
        rounds = late = 0
        streak = loop.time()
        while True:
            try:
                await asyncio.wait_for(self.dirty.wait(), BACKOFF_CAP)
            except TimeoutError:
                rounds = late = 0
                continue
            if rounds == 0:
                streak = loop.time()
            self.dirty.clear()
            try:
                await self._refresh()
            except Exception as exc:
                level = logging.WARNING if rounds == 0 else logging.DEBUG
                logger.log(level, "redis cluster %s: cannot read the slot map (%s: %s)",
                           self.name, type(exc).__name__, exc)
                self.dirty.set()
            rounds += 1
            age = loop.time() - streak
            await asyncio.sleep(self.backoff.delay(age, late))
            if not self.backoff.is_fast(age):
                late += 1

    async def _refresh(self) -> None:
        slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, node in await self._cluster_slots():
            slots[first:last + 1] = [node] * (last - first + 1)
        self._slots = slots
        masters = {node for node in slots if node is not None}
        for node in set(self.links) - masters:
            logger.info("redis cluster %s: %s no longer serves slots", self.name, node)
            await self.links.pop(node).stop()
        deliver, deliver_many = self.handler.on_publication, batch_handler(self.handler)
        for node in masters - set(self.links):
            host, _, port = node.rpartition(":")
            link = self.links[node] = PubSubLink(
                node_url(self.seed_url, host, int(port)), self, prefix=self.prefix,
                probe_interval=self.probe_interval, timeout=self.timeout, flavour=SHARDED,
                history=self.history, presence=self.presence)
            link.start(deliver, deliver_many)
        self.state_changed()
        for channel in list(self._want):
            await self._place(channel)

    async def _cluster_slots(self) -> list[tuple[int, int, str]]:
        """``(first slot, last slot, "host:port" of the master)`` from the first node that
        answers ``CLUSTER SLOTS``: a connected master, else the seed."""
        urls = [link.url for link in self.links.values() if link.ready] + [self.seed_url]
        error: Exception | None = None
        for url in urls:
            client = no_retry_client(url, self.timeout)
            try:
                reply = await asyncio.wait_for(
                    client.execute_command("CLUSTER", "SLOTS"),  # type: ignore[no-untyped-call]
                    self.timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            finally:
                await client.aclose()
            asked = urlsplit(url).hostname or "127.0.0.1"
            ranges = []
            for first, last, (host, port, *_), *_ in reply:
                host = host.decode() if isinstance(host, bytes) else host
                ranges.append((int(first), int(last), f"{host or asked}:{int(port)}"))
            return ranges
        raise ConnectionError(f"no node answered CLUSTER SLOTS: {error}")
