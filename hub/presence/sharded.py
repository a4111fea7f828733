"""Presence over several Redis shards: each channel's presence on its shard."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..sharding import shard_index
from .base import ClientInfo, Presence, PresenceStats

__all__ = ["ShardedPresence"]


class ShardedPresence(Presence):
    """A composite of one store per shard, in the order of the Redis URLs: a channel's
    presence is in ``stores[shard_index(channel, len(stores))]``, the shard that carries its
    pub/sub messages and its history. :mod:`hub.presences` refreshes and sweeps each of
    :attr:`stores` on its own (one shard's failure does not stop the others); the methods
    here that span shards (:meth:`refresh`, :meth:`channels_with_expired`, :meth:`sweep`)
    raise the first error they meet."""

    def __init__(self, stores: Sequence[Presence]) -> None:
        if not stores:
            raise ValueError("ShardedPresence needs at least one store")
        self.stores = tuple(stores)

    def store(self, channel: str) -> Presence:
        """The store of ``channel``."""
        return self.stores[shard_index(channel, len(self.stores))]

    async def add(self, channel: str, info: ClientInfo, *, ttl: float) -> bool:
        return await self.store(channel).add(channel, info, ttl=ttl)

    async def remove(self, channel: str, client: str) -> bool:
        return await self.store(channel).remove(channel, client)

    async def refresh(self, entries: Iterable[tuple[str, ClientInfo]], *,
                      ttl: float) -> list[tuple[str, ClientInfo]]:
        parts: dict[int, list[tuple[str, ClientInfo]]] = {}
        for channel, info in entries:
            parts.setdefault(shard_index(channel, len(self.stores)), []).append((channel, info))
        created: list[tuple[str, ClientInfo]] = []
        for n, part in parts.items():
            created += await self.stores[n].refresh(part, ttl=ttl)
        return created

    async def clients(self, channel: str) -> list[ClientInfo]:
        return await self.store(channel).clients(channel)

    async def stats(self, channel: str) -> PresenceStats:
        return await self.store(channel).stats(channel)

    async def expire(self, channel: str, *, limit: int = 1000) -> list[ClientInfo]:
        return await self.store(channel).expire(channel, limit=limit)

    async def channels_with_expired(self, *, limit: int = 1000) -> list[str]:
        out: list[str] = []
        for store in self.stores:
            out += await store.channels_with_expired(limit=limit)
        return out[:max(1, limit)]

    async def sweep(self, *, limit: int = 1000) -> Mapping[str, list[ClientInfo]]:
        out: dict[str, list[ClientInfo]] = {}
        for store in self.stores:
            out.update(await store.sweep(limit=limit))
        return out

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
