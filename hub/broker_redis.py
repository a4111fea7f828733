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
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from .broker import Broker, OnGap, OnMessage, stop_task
from .config import Config
from .exceptions import BrokerUnavailable
from .sharding import shard_index

__all__ = ["RedisBroker", "ShardedBroker", "redact_url"]

logger = logging.getLogger("hub.broker")

#: Reconnect delays: min(cap, random() * base * 2**failures), never below MIN_DELAY seconds.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
MIN_DELAY = 0.05


class _ProbeFailed(Exception):
    pass


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class RedisBroker(Broker):
    """One Redis pub/sub connection for this process, rebuilt by the broker itself when lost.

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://`` for TLS).
    Timeouts come from ``config.probe_interval`` and ``config.probe_timeout`` (seconds).
    """

    def __init__(self, url: str, config: Config, on_message: OnMessage, on_gap: OnGap,
                 ) -> None:
        super().__init__(on_message, on_gap)
        self.url = url
        self.name = redact_url(url)
        self._prefix = config.redis_prefix.encode()
        self._plen = len(self._prefix)
        self._probe_interval = config.probe_interval
        self._probe_timeout = config.probe_timeout
        self._confirm_timeout = max(5.0, 2 * config.probe_timeout)
        self._probe_channel = self._prefix + b"$probe:" + uuid.uuid4().hex.encode()
        self._backoff = ExponentialWithJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE)
        self._want: set[str] = set()
        self._live: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._client: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._ready = False
        self._probe_seen = 0
        self._probe_event: asyncio.Event | None = None
        self._barrier: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Incremented each time a lost link is confirmed again (a reconnect).
        self.reconnects = 0
        #: Called with True/False on every change of :attr:`connected`.
        self.on_state = lambda connected: None

    # -- Broker interface ------------------------------------------------------------------

    async def start(self) -> None:
        self._probe_event = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"redis-broker {self.name}")

    async def stop(self) -> None:
        self._closing = True
        if not await stop_task(self._task):
            logger.warning("redis %s: the broker task did not stop", self.name)
        await self._teardown()

    @property
    def connected(self) -> bool:
        return self._ready

    def is_live(self, channel: str) -> bool:
        return channel in self._live

    async def subscribe(self, channel: str, timeout: float) -> None:
        self._want.add(channel)
        if channel in self._live:
            return
        waiter = self._waiters.get(channel)
        if waiter is None:
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
            await self._send("subscribe", channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"Redis {self.name} did not confirm SUBSCRIBE in "
                                    f"{timeout:g}s") from None

    async def unsubscribe(self, channel: str) -> None:
        self._want.discard(channel)
        self._waiters.pop(channel, None)
        self._live.discard(channel)
        await self._send("unsubscribe", channel)

    async def publish(self, channel: str, payload: bytes) -> int:
        client = self._client
        if client is None or not self._ready:
            raise BrokerUnavailable(f"Redis {self.name} is not connected")
        try:
            return await asyncio.wait_for(client.publish(self._prefix + channel.encode(), payload),
                                          self._probe_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"PUBLISH to Redis {self.name} failed: {exc}") from None

    # -- the link --------------------------------------------------------------------------

    async def _send(self, command: str, channel: str) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE on the current link, if any; a failure here is left to
        the reader and the probe, which rebuild the link and resubscribe from ``_want``."""
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            await getattr(pubsub, command)(self._prefix + channel.encode())
        except (RedisError, OSError) as exc:
            logger.debug("redis %s: %s %s failed: %s", self.name, command, channel, exc)

    async def _run(self) -> None:
        failures = 0
        was_ready = False
        while not self._closing:
            try:
                await self._session(was_ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: rebuild the link
                reason = "liveness probe timed out" if isinstance(exc, _ProbeFailed) else (
                    f"{type(exc).__name__}: {exc}")
                if self._ready:
                    logger.warning("redis %s: link lost (%s); reconnecting", self.name, reason)
                elif failures == 0:
                    logger.warning("redis %s: cannot connect (%s); retrying with backoff",
                                   self.name, reason)
                else:
                    logger.debug("redis %s: still down (%s)", self.name, reason)
            was_ready = was_ready or self._ready
            if self._ready:
                failures = 0
            await self._teardown()
            if self._closing:
                return
            failures += 1
            await asyncio.sleep(max(MIN_DELAY, self._backoff.compute(failures)))

    async def _session(self, had_link: bool) -> None:
        loop = asyncio.get_running_loop()
        client = aioredis.Redis.from_url(
            self.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=self._probe_timeout,
            socket_timeout=self._probe_timeout, health_check_interval=0)
        self._client = client
        pubsub = client.pubsub()
        wanted = set(self._want)
        names = [self._probe_channel, *(self._prefix + c.encode() for c in wanted)]
        await asyncio.wait_for(pubsub.subscribe(*names), self._probe_timeout)
        self._pubsub = pubsub
        for channel in self._want - wanted:  # subscribed by others while we connected
            await self._send("subscribe", channel)
        self._barrier = loop.create_future()
        token = uuid.uuid4().hex
        reader = asyncio.create_task(self._read(pubsub, token))
        tasks = {reader}
        try:
            await asyncio.wait_for(pubsub.ping(token), self._probe_timeout)
            done, _ = await asyncio.wait({reader, self._barrier}, timeout=self._confirm_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()
            if not self._barrier.done():
                raise TimeoutError(f"no confirmation of SUBSCRIBE within "
                                   f"{self._confirm_timeout:g}s")
            self._ready = True
            logger.info("redis %s: connected, %d channels subscribed", self.name,
                        len(self._live))
            if had_link:
                self.reconnects += 1
            self.on_state(True)
            if had_link:
                if self._live:
                    self.on_gap(sorted(self._live))
            tasks.add(asyncio.create_task(self._probe(client)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("reader stopped")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, pubsub: aioredis.client.PubSub, token: str) -> None:
        """The one reader of the link. Hands messages to ``on_message`` without awaiting."""
        on_message = self.on_message
        probe = self._probe_channel
        plen = self._plen
        get_message = pubsub.get_message
        while True:
            msg = await get_message(timeout=None)
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "message":
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
            elif kind == "subscribe":
                channel = msg["channel"][plen:].decode(errors="replace")
                if msg["channel"] != probe and channel in self._want:
                    self._live.add(channel)
                    waiter = self._waiters.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
            elif kind == "unsubscribe":
                channel = msg["channel"][plen:].decode(errors="replace")
                if channel not in self._want:
                    self._live.discard(channel)
            elif kind == "pong":
                data = msg["data"]
                if isinstance(data, bytes):
                    data = data.decode(errors="replace")
                if data == token and self._barrier is not None and not self._barrier.done():
                    self._barrier.set_result(None)

    async def _probe(self, client: aioredis.Redis) -> None:
        """Publish a sequence number to our probe channel; it must come back in time."""
        assert self._probe_event is not None
        loop = asyncio.get_running_loop()
        seq = self._probe_seen
        while True:
            await asyncio.sleep(self._probe_interval)
            seq += 1
            deadline = loop.time() + self._probe_timeout
            try:
                await asyncio.wait_for(client.publish(self._probe_channel, str(seq)),
                                       self._probe_timeout)
                while self._probe_seen < seq:
                    self._probe_event.clear()
                    await asyncio.wait_for(self._probe_event.wait(),
                                           max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _ProbeFailed() from None

    async def _teardown(self) -> None:
        was_ready = self._ready
        self._ready = False
        self._live.clear()
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if was_ready:
            self.on_state(False)
        for closer in (pubsub, client):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer.aclose(), 1.0)
            except Exception:  # noqa: BLE001 - the link is being thrown away
                pass


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
