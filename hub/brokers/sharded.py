"""A composite broker: several independent brokers, each channel carried by exactly one.

The shard of a channel is :func:`hub.sharding.shard_index` over the positions of the list, the
same choice :class:`hub.Publisher` makes given the same URLs in the same order. The shards may
be any brokers (in production, one :class:`~hub.brokers.redis.RedisBroker` per Redis URL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from ..sharding import shard_index
from .base import Broker, BrokerHandler, Publication, batch_handler

__all__ = ["ShardedBroker"]


class ShardedBroker(Broker):
    """Each channel lives on one of ``shards``; the guarantee is that of the shards.

    Connected only while every shard is; a lost shard affects only its own channels (their gap
    is reported alone). Binding the composite binds every shard (see :meth:`bind`).
    Raises :class:`ValueError` for an empty list.
    """

    def __init__(self, shards: Sequence[Broker]) -> None:
        if not shards:
            raise ValueError("ShardedBroker needs at least one shard")
        super().__init__()
        self.shards = tuple(shards)

    def bind(self, handler: BrokerHandler) -> None:
        """Bind the composite and every shard: the shards hand publications and gaps straight
        to ``handler`` and report their state changes as the composite's state."""
        super().bind(handler)
        relay = _Relay(self, handler)
        for shard in self.shards:
            shard.bind(relay)

    def _shard(self, channel: str) -> Broker:
        return self.shards[shard_index(channel, len(self.shards))]

    async def start(self) -> None:
        self.handler  # noqa: B018 - raises if unbound, before any shard starts
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
    def connect_attempts(self) -> int:
        return sum(shard.connect_attempts for shard in self.shards)

    @property
    def lag(self) -> float:
        return max(shard.lag for shard in self.shards)

    def is_live(self, channel: str) -> bool:
        return self._shard(channel).is_live(channel)

    async def subscribe(self, channel: str, timeout: float) -> None:
        await self._shard(channel).subscribe(channel, timeout)

    async def unsubscribe(self, channel: str) -> None:
        await self._shard(channel).unsubscribe(channel)

    async def publish(self, channel: str, payload: bytes) -> int:
        return await self._shard(channel).publish(channel, payload)

    async def publish_presence(self, channel: str, payload: bytes) -> int:
        return await self._shard(channel).publish_presence(channel, payload)


class _Relay:
    """The handler of every shard of one :class:`ShardedBroker`.

    Publications (one, or a burst: ``on_publications``, see
    :func:`~hub.brokers.base.batch_handler`) and gaps go to the composite's handler with no
    extra call (the attributes are its bound methods: this is the hot path); a state change
    of any shard is reported as the
    composite's :attr:`~ShardedBroker.connected`, after its :attr:`~ShardedBroker.reconnects`
    (the sum over the shards) has counted it.
    """

    __slots__ = ("_broker", "_handler", "on_gap", "on_publication", "on_publications")

    def __init__(self, broker: ShardedBroker, handler: BrokerHandler) -> None:
        self._broker = broker
        self._handler = handler
        self.on_publication: Callable[[Publication], None] = handler.on_publication
        self.on_publications: Callable[[list[Publication]], None] = batch_handler(handler)
        self.on_gap: Callable[[list[str]], None] = handler.on_gap

    def on_state(self, connected: bool) -> None:
        self._handler.on_state(self._broker.connected)
