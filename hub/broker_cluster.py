"""The Redis Cluster broker: sharded pub/sub, one link per master, rebuilt by the broker itself.

Hub channel ``news`` is the shard channel ``<prefix>news`` (default prefix ``hub:``); it lives
on the master that owns its key slot (CRC16 of the name, or of the part between the first
``{`` and the next ``}``, modulo 16384), and a backend reaches its subscribers with
``SPUBLISH hub:news <payload>`` sent to that master (``redis-cli -c``, or any cluster client).

How the links are kept honest (the same rules as :class:`hub.broker_redis.RedisBroker`):

* The slot map comes from ``CLUSTER SLOTS``, asked of a connected master or else the seed
  node. There is one link per master that owns slots: a pub/sub connection carrying the
  ``SSUBSCRIBE`` of every wanted channel in the master's slots, and a command connection for
  ``SPUBLISH``. redis-py gets no retries on either; a lost link is rebuilt by the broker with
  capped, jittered backoff, it resubscribes from the broker's own wanted set, and the channels
  that were live on the lost link are reported to ``on_gap`` once they are confirmed again.
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
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, RedisError, ResponseError

from .broker import Broker, OnGap, OnMessage, stop_task
from .broker_redis import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    MIN_DELAY,
    PubSubLink,
    no_retry_client,
    redact_url,
)
from .config import Config
from .exceptions import BrokerUnavailable

__all__ = ["ClusterBroker"]

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
    address the cluster announces. Timeouts come from ``config.probe_interval`` and
    ``config.probe_timeout`` (seconds). :attr:`connected` is true while every master that
    owns slots has a confirmed link; a lost master affects only the channels in its slots.
    """

    def __init__(self, seed_url: str, config: Config, on_message: OnMessage, on_gap: OnGap,
                 ) -> None:
        super().__init__(on_message, on_gap)
        self.seed_url = seed_url
        self.name = redact_url(seed_url)
        self.prefix = config.redis_prefix.encode()
        self.probe_interval = config.probe_interval
        self.timeout = config.probe_timeout
        self.confirm_timeout = max(5.0, 2 * config.probe_timeout)
        self.id = uuid.uuid4().hex.encode()
        self.backoff = ExponentialWithJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE)
        self.dirty = asyncio.Event()  # set: read the slot map again
        self.links: dict[str, _Link] = {}  # "host:port" of each master -> its link
        self.route: dict[str, _Link] = {}  # wanted channel -> the link it is subscribed on
        self.lost: set[str] = set()  # channels live on a lost link, not yet confirmed again
        self._slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._want: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._state = False
        #: Incremented each time a lost master link is confirmed again (a reconnect).
        self.reconnects = 0
        #: Called with True/False on every change of :attr:`connected` (after
        #: :attr:`reconnects` is counted up).
        self.on_state = lambda connected: None

    # -- Broker interface ------------------------------------------------------------------

    async def start(self) -> None:
        self.dirty.set()
        self._task = asyncio.create_task(self._run(), name=f"redis-cluster {self.name}")

    async def stop(self) -> None:
        await stop_task(self._task)
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.stop_link() for link in links))

    @property
    def connected(self) -> bool:
        return bool(self.links) and all(link.ready for link in self.links.values())

    def is_live(self, channel: str) -> bool:
        link = self.route.get(channel)
        return link is not None and channel in link.live

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
        self.lost.discard(channel)
        link = self.route.pop(channel, None)
        if link is not None:
            link.live.discard(channel)
            await link.send("sunsubscribe", self.key(channel))

    async def publish(self, channel: str, payload: bytes) -> int:
        """``SPUBLISH <prefix><channel> <payload>`` on the master of the channel's slot
        (https://redis.io/docs/latest/commands/spublish/), following one ``MOVED``.

        Returns SPUBLISH's reply: the number of hub processes subscribed to the channel.
        Raises :class:`BrokerUnavailable` if that master has no confirmed link, or the
        command fails or takes more than ``probe_timeout`` seconds.
        """
        key = self.key(channel)
        node = self._slots[key_slot(key)]
        for _ in range(2):
            link = self.links.get(node or "")
            if link is None or link.client is None or not link.ready:
                raise BrokerUnavailable(f"Redis Cluster {self.name}: no link to the master "
                                        f"of {channel!r} ({node or 'slot not covered'})")
            try:
                return await asyncio.wait_for(link.client.spublish(key, payload), self.timeout)
            except AskError as exc:  # MovedError too: the slot has another owner
                self.dirty.set()
                node = f"{exc.host}:{exc.port}"
            except (RedisError, OSError, TimeoutError) as exc:
                raise BrokerUnavailable(f"SPUBLISH to Redis {link.name} failed: {exc}") from None
        raise BrokerUnavailable(f"Redis Cluster {self.name}: {channel!r} moved twice")

    # -- routing ---------------------------------------------------------------------------

    def key(self, channel: str) -> bytes:
        return self.prefix + channel.encode()

    def owner(self, key: bytes) -> str | None:
        """``host:port`` of the master serving ``key``'s slot, as last read; None: unknown."""
        return self._slots[key_slot(key)]

    def channels_of(self, link: _Link) -> list[str]:
        return [channel for channel, on in self.route.items() if on is link]

    def probe_channel(self, node: str) -> bytes:
        """A private shard channel of this process whose slot ``node`` serves."""
        for tag in range(1 << 17):  # tags 0..109757 cover all 16384 slots
            key = b"%s$probe:{%d}:%s" % (self.prefix, tag, self.id)
            if self.owner(key) == node:
                return key
        raise ConnectionError(f"{node} serves no hash slot")

    async def _place(self, channel: str) -> None:
        """Subscribe a wanted channel on the master of its slot, leaving the old one if it
        moved; resend SSUBSCRIBE if it is not confirmed (an earlier one was refused)."""
        key = self.key(channel)
        link = self.links.get(self.owner(key) or "")
        old = self.route.get(channel)
        if old is not None and old is not link:
            del self.route[channel]
            if channel in old.live:
                old.live.discard(channel)
                self.lost.add(channel)
            await old.send("sunsubscribe", key)
        if link is None:
            self.dirty.set()
            return
        self.route[channel] = link
        if channel not in link.live:
            await link.send("ssubscribe", key)

    def confirmed(self, link: _Link, channel: str) -> None:
        """``link`` confirmed the SSUBSCRIBE of ``channel``."""
        if self.route.get(channel) is not link:
            return
        link.live.add(channel)
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if link.ready and channel in self.lost:
            self.lost.discard(channel)
            self.on_gap([channel])

    def dropped(self, link: _Link, channel: str) -> None:
        """``link``'s master unsubscribed ``channel`` (its slot moved), or confirmed ours."""
        if self.route.get(channel) is not link:
            return
        if channel in link.live:
            link.live.discard(channel)
            self.lost.add(channel)
        self.dirty.set()

    def state_changed(self) -> None:
        connected = self.connected
        if connected != self._state:
            self._state = connected
            self.on_state(connected)

    # -- the slot map ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Read the slot map whenever :attr:`dirty` is set, with backoff between rounds."""
        rounds = 0
        while True:
            try:
                await asyncio.wait_for(self.dirty.wait(), BACKOFF_CAP)
            except TimeoutError:
                rounds = 0
                continue
            self.dirty.clear()
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - retried with backoff
                level = logging.WARNING if rounds == 0 else logging.DEBUG
                logger.log(level, "redis cluster %s: cannot read the slot map (%s: %s)",
                           self.name, type(exc).__name__, exc)
                self.dirty.set()
            rounds += 1
            await asyncio.sleep(max(MIN_DELAY, self.backoff.compute(rounds)))

    async def _refresh(self) -> None:
        slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for first, last, node in await self._cluster_slots():
            slots[first:last + 1] = [node] * (last - first + 1)
        self._slots = slots
        masters = {node for node in slots if node is not None}
        for node in set(self.links) - masters:
            logger.info("redis cluster %s: %s no longer serves slots", self.name, node)
            await self.links.pop(node).stop_link()
        for node in masters - set(self.links):
            host, _, port = node.rpartition(":")
            link = self.links[node] = _Link(self, node, node_url(self.seed_url, host, int(port)))
            link.start_link()
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
                reply = await asyncio.wait_for(client.execute_command("CLUSTER", "SLOTS"),
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


class _Link(PubSubLink):
    """The sharded pub/sub and command connections to one master, rebuilt when lost."""

    SUBSCRIBE = "ssubscribe"
    UNSUBSCRIBE = "sunsubscribe"
    PUBLISH = "spublish"
    MESSAGE = "smessage"

    def __init__(self, broker: ClusterBroker, node: str, url: str) -> None:
        super().__init__(url, broker.prefix, broker.probe_interval, broker.timeout,
                         broker.on_message)
        self.broker = broker
        self.node = node

    def probe_key(self) -> bytes:
        return self.broker.probe_channel(self.node)

    def channels_to_subscribe(self) -> set[str]:
        return set(self.broker.channels_of(self))

    def group_keys(self, keys: list[bytes]) -> list[list[bytes]]:
        """One SSUBSCRIBE per slot, or Redis answers CROSSSLOT."""
        by_slot: defaultdict[int, list[bytes]] = defaultdict(list)
        for key in keys:
            by_slot[key_slot(key)].append(key)
        return list(by_slot.values())

    def confirmed(self, channel: str) -> None:
        self.broker.confirmed(self, channel)

    def dropped(self, channel: str) -> None:
        self.broker.dropped(self, channel)

    def refused(self, exc: ResponseError) -> None:
        """An SSUBSCRIBE refused (MOVED, CLUSTERDOWN, ...): read the slot map again."""
        logger.debug("redis %s: %s", self.name, exc)
        self.broker.dirty.set()

    def became_ready(self, had_link: bool) -> None:
        broker = self.broker
        if had_link:
            broker.reconnects += 1
        broker.state_changed()
        gap = self.live & broker.lost
        if gap:
            broker.lost -= gap
            broker.on_gap(sorted(gap))

    def lost(self, was_ready: bool) -> None:
        self.broker.lost |= self.live
        self.broker.dirty.set()  # a replica may have taken over
        if was_ready:
            self.broker.state_changed()
