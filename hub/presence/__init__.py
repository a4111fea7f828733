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
from typing import TYPE_CHECKING, Any

from .base import ClientInfo, Presence, PresenceStats, pack_info, unpack_info

if TYPE_CHECKING:
    from .memory import MemoryPresence
    from .redis import RedisPresence, index_key, registry_key

__all__ = [
    "ClientInfo",
    "MemoryPresence",
    "Presence",
    "PresenceStats",
    "RedisPresence",
    "index_key",
    "pack_info",
    "registry_key",
    "unpack_info",
]

_LAZY = {"MemoryPresence": "memory", "RedisPresence": "redis", "index_key": "redis",
         "registry_key": "redis"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
