"""The Redis broker: one pub/sub connection per process, through one :class:`PubSubLink`.

Redis channel format (public contract, docs/protocol.md): hub channel ``news`` is Redis channel
``<prefix>news`` (default prefix ``hub:``), and a payload published there with
``PUBLISH hub:news <payload>`` reaches every local subscriber of ``news``.

The link (:mod:`hub.brokers.link`) reconnects with backoff and probes its own liveness; this
broker keeps the set of wanted channels (which the node keeps equal to the channels with local
subscribers), hands it to the link on every connect, and reports the channels that were live
to :meth:`~hub.brokers.base.BrokerHandler.on_gap` once a new link is confirmed.

Commands: SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PING (https://redis.io/docs/latest/commands/).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError, ResponseError

from ..exceptions import BrokerUnavailable
from .base import Broker, batch_handler
from .link import PubSubLink

__all__ = ["RedisBroker"]


class RedisBroker(Broker):
    """One Redis pub/sub connection for this process.

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``, ``rediss://`` for
    TLS); ``prefix`` the Redis channel prefix; ``probe_interval`` the seconds between liveness
    probes and ``probe_timeout`` the seconds a probe, a connect or a command may take. The
    probe channel is ``<prefix>$probe:<random id>``, which no client can name since ``$`` is
    not a channel character. ``history`` tells the channels that keep a history: the link
    also subscribes their history channel (:class:`PubSubLink`); ``presence`` those with join
    and leave events: their presence channel ``{<prefix><channel>}:j`` too.
    """

    def __init__(self, url: str, *, prefix: str = "hub:", probe_interval: float = 1.0,
                 probe_timeout: float = 2.0,
                 history: Callable[[str], bool] | None = None,
                 presence: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self._link = PubSubLink(url, self, prefix=prefix.encode(),
                                probe_interval=probe_interval, timeout=probe_timeout,
                                history=history, presence=presence)
        self.name = self._link.name
        self._probe_channel = prefix.encode() + b"$probe:" + uuid.uuid4().hex.encode()
        self._want: set[str] = set()
        self._waiters: dict[str, asyncio.Future[None]] = {}

    # -- Broker interface ------------------------------------------------------------------

    async def start(self) -> None:
        self._link.start(self.handler.on_publication, batch_handler(self.handler))

    async def stop(self) -> None:
        await self._link.stop()

    @property
    def connected(self) -> bool:
        return self._link.ready

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    @property
    def connect_attempts(self) -> int:
        return self._link.connect_attempts

    @property
    def lag(self) -> float:
        """See :attr:`hub.brokers.link.PubSubLink.lag`."""
        return self._link.lag

    def is_live(self, channel: str) -> bool:
        return self._link.is_live(channel)

    async def subscribe(self, channel: str, timeout: float) -> None:
        """``SUBSCRIBE <prefix><channel>``; see :meth:`Broker.subscribe`."""
        self._want.add(channel)
        if self._link.is_live(channel):
            return
        waiter = self._waiters.get(channel)
        if waiter is None:
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
            await self._link.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"Redis {self.name} did not confirm SUBSCRIBE in "
                                    f"{timeout:g}s") from None

    async def unsubscribe(self, channel: str) -> None:
        """``UNSUBSCRIBE <prefix><channel>``; see :meth:`Broker.unsubscribe`."""
        self._want.discard(channel)
        self._waiters.pop(channel, None)
        await self._link.unsubscribe(channel)

    async def publish(self, channel: str, payload: bytes) -> int:
        """``PUBLISH <prefix><channel> <payload>``; returns its reply (subscribed processes).

        Raises :class:`BrokerUnavailable` if the link is not ready, or the command fails or
        takes more than ``probe_timeout`` seconds.
        """
        if not self._link.ready:
            raise BrokerUnavailable(f"Redis {self.name} is not connected")
        try:
            return await self._link.publish(channel, payload)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"PUBLISH to Redis {self.name} failed: {exc}") from None

    async def publish_presence(self, channel: str, payload: bytes) -> int:
        """``PUBLISH {<prefix><channel>}:j <payload>``; see :meth:`Broker.publish_presence`."""
        if not self._link.ready:
            raise BrokerUnavailable(f"Redis {self.name} is not connected")
        try:
            return await self._link.publish(channel, payload, presence=True)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"PUBLISH to Redis {self.name} failed: {exc}") from None

    # -- LinkOwner hooks (called by the link only) -----------------------------------------

    def probe_channel(self, link: PubSubLink) -> bytes:
        return self._probe_channel

    def wanted(self, link: PubSubLink) -> set[str]:
        return set(self._want)

    def carries(self, link: PubSubLink, channel: str) -> bool:
        return channel in self._want

    def confirmed(self, link: PubSubLink, channel: str) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def dropped(self, link: PubSubLink, channel: str) -> bool:
        # A channel wanted again (unsubscribed, then subscribed before this confirmation)
        # stays as it is: the confirmation of the new SUBSCRIBE follows.
        return channel not in self._want

    def link_ready(self, link: PubSubLink, reconnect: bool) -> None:
        handler = self.handler
        handler.on_state(True)
        if reconnect and link.live:
            handler.on_gap(sorted(link.live))

    def link_lost(self, link: PubSubLink, was_ready: bool) -> None:
        if was_ready:
            self.handler.on_state(False)

    def refused(self, link: PubSubLink, exc: ResponseError) -> None:
        """An error reply on the pub/sub connection: rebuild the link."""
        raise exc
