"""Presence: the interface (:mod:`hub.presence.base`) and its stores.

* :class:`~hub.presence.memory.MemoryPresence`, in-process, for the embedded broker;
* :class:`~hub.presence.redis.RedisPresence`, one Redis or one Redis Cluster through the
  ``hub`` Function library of :mod:`hub.history` (``hub_presence_*`` functions, loaded by
  :func:`hub.history.ensure_functions`).

With several Redis shards, a channel's presence lives on its shard
(:func:`hub.sharding.shard_index` over the URL list): one RedisPresence per shard client.
docs/presence-format.md is the Redis contract and says how the node uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import ClientInfo, Presence, PresenceStats, pack_info, unpack_info

if TYPE_CHECKING:
    from .memory import MemoryPresence
    from .redis import RedisPresence, index_key, registry_key
    from .sharded import ShardedPresence

__all__ = [
    "ClientInfo",
    "MemoryPresence",
    "Presence",
    "PresenceStats",
    "RedisPresence",
    "ShardedPresence",
    "create_presence",
    "index_key",
    "pack_info",
    "registry_key",
    "unpack_info",
]

_LAZY = {"MemoryPresence": "memory", "RedisPresence": "redis", "index_key": "redis",
         "registry_key": "redis", "ShardedPresence": "sharded"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def create_presence(urls: Sequence[str] = (), *, cluster: bool = False, prefix: str = "hub:",
                    timeout: float = 2.0) -> Presence:
    """The presence store matching :func:`hub.brokers.create_broker` for the same ``urls``.

    No URL: a :class:`MemoryPresence` (the embedded broker: one process). One URL: a
    :class:`RedisPresence` on its own client. Several: a :class:`ShardedPresence` of one per
    URL, in that order (a channel on its :func:`hub.sharding.shard_index`). ``cluster=True``:
    one store on a Redis Cluster client (the one URL is a seed node). Every Redis client has
    ``timeout`` seconds per command and no automatic retries (a ``remove`` or an ``expire``
    is never sent twice); the store closes the clients it built (:meth:`Presence.close`).
    """
    if not urls:
        from .memory import MemoryPresence

        return MemoryPresence()
    from ..history.redis import no_retry_clients
    from .redis import RedisPresence

    class _Owned(RedisPresence):
        async def close(self) -> None:
            await self.client.aclose()

    stores: list[Presence] = [
        _Owned(client, prefix=prefix)
        for client in no_retry_clients(urls, cluster=cluster, timeout=timeout)]
    if len(stores) == 1:
        return stores[0]
    from .sharded import ShardedPresence

    return ShardedPresence(stores)
