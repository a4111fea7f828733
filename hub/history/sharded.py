"""History over several Redis shards: each channel's history on its shard."""

from __future__ import annotations

from collections.abc import Sequence

from ..brokers.base import StreamPosition
from ..sharding import shard_index
from .base import History, HistoryRead

__all__ = ["ShardedHistory"]


class ShardedHistory(History):
    """A composite of one store per shard, in the order of the Redis URLs: a channel's
    history is in ``stores[shard_index(channel, len(stores))]``, the shard that carries its
    pub/sub messages (:class:`hub.brokers.sharded.ShardedBroker`)."""

    def __init__(self, stores: Sequence[History]) -> None:
        if not stores:
            raise ValueError("ShardedHistory needs at least one store")
        self.stores = tuple(stores)

    def store(self, channel: str) -> History:
        """The store of ``channel``."""
        return self.stores[shard_index(channel, len(self.stores))]

    async def start(self) -> None:
        for store in self.stores:
            await store.start()

    async def publish(self, channel: str, payload: bytes, *, size: int, ttl: float,
                      idempotency_key: str | None = None) -> StreamPosition:
        return await self.store(channel).publish(channel, payload, size=size, ttl=ttl,
                                                 idempotency_key=idempotency_key)

    async def position(self, channel: str, *, ttl: float) -> StreamPosition:
        return await self.store(channel).position(channel, ttl=ttl)

    async def new_epoch(self, channel: str, expected: str, *, ttl: float) -> StreamPosition:
        return await self.store(channel).new_epoch(channel, expected, ttl=ttl)

    async def read(self, channel: str, *, since: StreamPosition | None, limit: int,
                   ttl: float = 0.0) -> HistoryRead:
        return await self.store(channel).read(channel, since=since, limit=limit, ttl=ttl)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
