"""The Redis broker: one pub/sub connection per process, and its sharded variant.

Redis channel format (public contract, docs/protocol.md): hub channel ``news`` is Redis channel
``<prefix>news`` (default prefix ``hub:``), and a payload published there with
``PUBLISH hub:news <payload>`` reaches every local subscriber of ``news``.

How the link is kept honest (docs/reliability.md):

* redis-py is given **no retries** on the pub/sub connection, so a lost link raises instead of
  being silently reconnected and resubscribed with messages lost in between. The broker then
  reconnects itself with capped, jittered exponential backoff, resubscribes every wanted
  channel from its own set (which the node keeps equal to the channels with local
  subscribers), and reports the channels to ``on_gap`` once the new link is confirmed.
* A liveness probe PUBLISHes to a private channel of this process (``<prefix>$probe:<id>``,
  which no client can name since ``$`` is not a channel character) every ``probe_interval``
  seconds; if the message does not come back on the subscriber link within
  ``probe_timeout`` seconds, the link is declared dead and rebuilt. A frozen Redis
  (SIGSTOP), a half-open TCP link, or a subscription Redis dropped for exceeding
  ``client-output-buffer-limit pubsub`` are all detected within
  ``probe_interval + probe_timeout`` seconds, a closed socket at once.

Commands: SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PING (https://redis.io/docs/latest/commands/).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError, ResponseError

from .broker import Broker, OnGap, OnMessage, stop_task
from .config import Config
from .exceptions import BrokerUnavailable
from .sharding import shard_index

__all__ = ["PubSubLink", "RedisBroker", "ShardedBroker", "no_retry_client", "redact_url"]

logger = logging.getLogger("hub.broker")

#: Reconnect delays: min(cap, random() * base * 2**failures), never below MIN_DELAY seconds.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
MIN_DELAY = 0.05


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


class PubSubLink:
    """One Redis pub/sub connection plus a command connection, rebuilt by itself when lost.

    The loop: connect, SUBSCRIBE the probe channel and every channel of
    :meth:`channels_to_subscribe`, wait for the confirmations (a PING on the pub/sub
    connection answers after them), mark the link :attr:`ready`, then read until the reader
    or the liveness probe fails; tear down, wait a capped jittered backoff, start again.
    Subclasses pick the command flavour (``SUBSCRIBE``/``PUBLISH`` or the sharded
    ``SSUBSCRIBE``/``SPUBLISH``) with the class attributes and react through the hooks.

    ``prefix`` is the Redis channel prefix (bytes); ``probe_interval`` and ``timeout`` are
    seconds; ``on_message(channel, payload)`` gets every message with the prefix removed.
    """

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PUBLISH = "publish"
    MESSAGE = "message"

    def __init__(self, url: str, prefix: bytes, probe_interval: float, timeout: float,
                 on_message: OnMessage) -> None:
        self.url = url
        self.name = redact_url(url)
        self.prefix = prefix
        self.probe_interval = probe_interval
        self.timeout = timeout
        self.confirm_timeout = max(5.0, 2 * timeout)
        self.on_message = on_message
        #: Channels confirmed subscribed on the current connection.
        self.live: set[str] = set()
        #: True from the confirmation of every subscription until the link is lost.
        self.ready = False
        #: Incremented each time the link is confirmed again after a loss.
        self.reconnects = 0
        self.client: aioredis.Redis | None = None
        self.pubsub: aioredis.client.PubSub | None = None
        self._backoff = ExponentialWithJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE)
        self._probe_seen = 0
        self._probe_event: asyncio.Event | None = None
        self._barrier: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- hooks -----------------------------------------------------------------------------

    def probe_key(self) -> bytes:
        """The Redis channel of this link's liveness probe."""
        raise NotImplementedError

    def channels_to_subscribe(self) -> set[str]:
        """The channels this link must carry now."""
        raise NotImplementedError

    def group_keys(self, keys: list[bytes]) -> list[list[bytes]]:
        """Split the SUBSCRIBE of ``keys`` into commands (one by default)."""
        return [keys] if keys else []

    def confirmed(self, channel: str) -> None:
        """Redis confirmed the subscription of ``channel``."""

    def dropped(self, channel: str) -> None:
        """Redis confirmed (or pushed) the end of the subscription of ``channel``."""

    def became_ready(self, had_link: bool) -> None:
        """Every subscription is confirmed; ``had_link``: this is a reconnect."""

    def lost(self, was_ready: bool) -> None:
        """The connection is being thrown away; :attr:`live` still holds its channels."""

    def refused(self, exc: ResponseError) -> None:
        """Redis answered an error on the pub/sub connection. Default: rebuild the link."""
        raise exc

    # -- life ------------------------------------------------------------------------------

    def key(self, channel: str) -> bytes:
        return self.prefix + channel.encode()

    def start_link(self) -> None:
        self._probe_event = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"redis-link {self.name}")

    async def stop_link(self) -> None:
        self._closing = True
        if not await stop_task(self._task):
            logger.warning("redis %s: the link task did not stop", self.name)
        await self._teardown()

    async def send(self, command: str, key: bytes) -> None:
        """Send (S)SUBSCRIBE/(S)UNSUBSCRIBE on the current connection, if any; a failure is
        left to the reader and the probe, which rebuild the link and resubscribe."""
        pubsub = self.pubsub
        if pubsub is None:
            return
        try:
            await getattr(pubsub, command)(key)
        except (RedisError, OSError) as exc:
            logger.debug("redis %s: %s %r failed: %s", self.name, command, key, exc)

    async def _run(self) -> None:
        failures = 0
        had_link = False
        while not self._closing:
            try:
                await self._session(had_link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: rebuild the link
                reason = f"{type(exc).__name__}: {exc}"
                if self.ready:
                    logger.warning("redis %s: link lost (%s); reconnecting", self.name, reason)
                elif failures == 0:
                    logger.warning("redis %s: cannot connect (%s); retrying with backoff",
                                   self.name, reason)
                else:
                    logger.debug("redis %s: still down (%s)", self.name, reason)
            had_link = had_link or self.ready
            if self.ready:
                failures = 0
            await self._teardown()
            if self._closing:
                return
            failures += 1
            await asyncio.sleep(max(MIN_DELAY, self._backoff.compute(failures)))

    async def _session(self, had_link: bool) -> None:
        client = self.client = no_retry_client(self.url, self.timeout)
        pubsub = client.pubsub()
        subscribe = getattr(pubsub, self.SUBSCRIBE)
        probe = self.probe_key()
        await asyncio.wait_for(subscribe(probe), self.timeout)
        self.pubsub = pubsub
        wanted = self.channels_to_subscribe()
        for keys in self.group_keys([self.key(c) for c in wanted]):
            await asyncio.wait_for(subscribe(*keys), self.timeout)
        for channel in self.channels_to_subscribe() - wanted:  # added while we subscribed
            await self.send(self.SUBSCRIBE, self.key(channel))
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
            self.ready = True
            logger.info("redis %s: connected, %d channels subscribed", self.name, len(self.live))
            if had_link:
                self.reconnects += 1
            self.became_ready(had_link)
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
        """The one reader of the link. Hands messages to ``on_message`` without awaiting."""
        on_message = self.on_message
        plen = len(self.prefix)
        get_message = pubsub.get_message
        message, subscribed, unsubscribed = self.MESSAGE, self.SUBSCRIBE, self.UNSUBSCRIBE
        while True:
            try:
                msg = await get_message(timeout=None)
            except ResponseError as exc:
                self.refused(exc)
                continue
            if msg is None:
                continue
            kind = msg["type"]
            if kind == message:
                name = msg["channel"]
                if name == probe:
                    self._probe_seen = int(msg["data"])
                    assert self._probe_event is not None
                    self._probe_event.set()
                    continue
                try:
                    on_message(name[plen:].decode(), msg["data"])
                except Exception:  # noqa: BLE001 - one bad message must not deafen the hub
                    logger.exception("redis %s: delivery failed", self.name)
            elif kind == subscribed:
                if msg["channel"] != probe:
                    self.confirmed(msg["channel"][plen:].decode(errors="replace"))
            elif kind == unsubscribed:
                self.dropped(msg["channel"][plen:].decode(errors="replace"))
            elif kind == "pong":
                data = msg["data"]
                if isinstance(data, bytes):
                    data = data.decode(errors="replace")
                if data == token and self._barrier is not None and not self._barrier.done():
                    self._barrier.set_result(None)

    async def _probe(self, client: aioredis.Redis, probe: bytes) -> None:
        """Publish a sequence number to our probe channel; it must come back in time."""
        assert self._probe_event is not None
        loop = asyncio.get_running_loop()
        publish = getattr(client, self.PUBLISH)
        seq = self._probe_seen
        while True:
            await asyncio.sleep(self.probe_interval)
            seq += 1
            deadline = loop.time() + self.timeout
            try:
                await asyncio.wait_for(publish(probe, str(seq)), self.timeout)
                while self._probe_seen < seq:
                    self._probe_event.clear()
                    await asyncio.wait_for(self._probe_event.wait(),
                                           max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise TimeoutError("liveness probe timed out") from None

    async def _teardown(self) -> None:
        was_ready = self.ready
        self.ready = False
        self.lost(was_ready)
        self.live.clear()
        pubsub, client = self.pubsub, self.client
        self.pubsub = self.client = None
        for closer in (pubsub, client):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer.aclose(), 1.0)
            except Exception:  # noqa: BLE001 - the link is being thrown away
                pass


class RedisBroker(PubSubLink, Broker):
    """One Redis pub/sub connection for this process (:class:`PubSubLink`).

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://`` for TLS).
    Timeouts come from ``config.probe_interval`` and ``config.probe_timeout`` (seconds). The
    probe channel is ``<prefix>$probe:<random id>``.
    """

    def __init__(self, url: str, config: Config, on_message: OnMessage, on_gap: OnGap,
                 ) -> None:
        Broker.__init__(self, on_message, on_gap)
        PubSubLink.__init__(self, url, config.redis_prefix.encode(), config.probe_interval,
                            config.probe_timeout, on_message)
        self._probe_channel = self.prefix + b"$probe:" + uuid.uuid4().hex.encode()
        self._want: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        #: Called with True/False on every change of :attr:`connected`.
        self.on_state: Callable[[bool], None] = lambda connected: None

    # -- Broker interface ------------------------------------------------------------------

    async def start(self) -> None:
        self.start_link()

    async def stop(self) -> None:
        await self.stop_link()

    @property
    def connected(self) -> bool:
        return self.ready

    def is_live(self, channel: str) -> bool:
        return channel in self.live

    async def subscribe(self, channel: str, timeout: float) -> None:
        self._want.add(channel)
        if channel in self.live:
            return
        waiter = self._waiters.get(channel)
        if waiter is None:
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
            await self.send("subscribe", self.key(channel))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"Redis {self.name} did not confirm SUBSCRIBE in "
                                    f"{timeout:g}s") from None

    async def unsubscribe(self, channel: str) -> None:
        self._want.discard(channel)
        self._waiters.pop(channel, None)
        self.live.discard(channel)
        await self.send("unsubscribe", self.key(channel))

    async def publish(self, channel: str, payload: bytes) -> int:
        client = self.client
        if client is None or not self.ready:
            raise BrokerUnavailable(f"Redis {self.name} is not connected")
        try:
            return await asyncio.wait_for(client.publish(self.key(channel), payload),
                                          self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"PUBLISH to Redis {self.name} failed: {exc}") from None

    # -- PubSubLink hooks ------------------------------------------------------------------

    def probe_key(self) -> bytes:
        return self._probe_channel

    def channels_to_subscribe(self) -> set[str]:
        return set(self._want)

    def confirmed(self, channel: str) -> None:
        if channel in self._want:
            self.live.add(channel)
            waiter = self._waiters.pop(channel, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def dropped(self, channel: str) -> None:
        if channel not in self._want:
            self.live.discard(channel)

    def became_ready(self, had_link: bool) -> None:
        self.on_state(True)
        if had_link and self.live:
            self.on_gap(sorted(self.live))

    def lost(self, was_ready: bool) -> None:
        if was_ready:
            self.on_state(False)


class ShardedBroker(Broker):
    """Several independent Redis instances; each channel lives on one of them.

    ``urls`` is the ordered list of shard URLs; :func:`hub.sharding.shard_index` picks the
    shard of a channel, the same way :class:`hub.Publisher` does. Connected only while every
    shard is; a lost shard affects only its own channels (their gap is reported alone).
    """

    def __init__(self, urls: Sequence[str], config: Config, on_message: OnMessage,
                 on_gap: OnGap) -> None:
        super().__init__(on_message, on_gap)
        self.shards = [RedisBroker(url, config, on_message, on_gap) for url in urls]

    def _shard(self, channel: str) -> RedisBroker:
        return self.shards[shard_index(channel, len(self.shards))]

    async def start(self) -> None:
        for shard in self.shards:
            await shard.start()

    async def stop(self) -> None:
        await asyncio.gather(*(shard.stop() for shard in self.shards))

    @property
    def connected(self) -> bool:
        return all(shard.connected for shard in self.shards)

    @property
    def reconnects(self) -> int:
        return sum(shard.reconnects for shard in self.shards)

    @property
    def on_state(self):
        return self.shards[0].on_state

    @on_state.setter
    def on_state(self, callback) -> None:
        for shard in self.shards:
            shard.on_state = callback

    def is_live(self, channel: str) -> bool:
        return self._shard(channel).is_live(channel)

    async def subscribe(self, channel: str, timeout: float) -> None:
        await self._shard(channel).subscribe(channel, timeout)

    async def unsubscribe(self, channel: str) -> None:
        await self._shard(channel).unsubscribe(channel)

    async def publish(self, channel: str, payload: bytes) -> int:
        return await self._shard(channel).publish(channel, payload)
