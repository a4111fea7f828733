"""Channel history: the interface (:mod:`hub.history.base`) and its stores.

* :class:`~hub.history.memory.MemoryHistory`, in-process, for the embedded broker;
* :class:`~hub.history.redis.RedisHistory`, one Redis or one Redis Cluster through the ``hub``
  Function library (``functions.lua``, loaded by :func:`~hub.history.redis.ensure_functions`).

With several Redis shards, a channel's history lives on its shard
(:func:`hub.sharding.shard_index` over the URL list): one RedisHistory per shard client.
docs/history-format.md is the Redis contract.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..brokers.base import Publication
from .base import (
    IDEMPOTENCY_TTL,
    META_TTL,
    History,
    HistoryRead,
    format_history_message,
    history_channel,
    history_keys,
    parse_history_message,
)

if TYPE_CHECKING:
    from .memory import MemoryHistory
    from .redis import RedisHistory, ensure_functions, functions_on_connect
    from .sharded import ShardedHistory

__all__ = [
    "IDEMPOTENCY_TTL",
    "META_TTL",
    "History",
    "HistoryRead",
    "MemoryHistory",
    "RedisHistory",
    "ShardedHistory",
    "create_history",
    "ensure_functions",
    "format_history_message",
    "functions_on_connect",
    "history_channel",
    "history_keys",
    "parse_history_message",
]

_LAZY = {"MemoryHistory": "memory", "RedisHistory": "redis", "ensure_functions": "redis",
         "functions_on_connect": "redis", "ShardedHistory": "sharded"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def create_history(urls: Sequence[str] = (), *, cluster: bool = False, prefix: str = "hub:",
                   timeout: float = 2.0,
                   on_publish: Callable[[Publication], None] | None = None) -> History:
    """The history store matching :func:`hub.brokers.create_broker` for the same ``urls``.

    No URL: a :class:`MemoryHistory` whose publications go to ``on_publish`` (the memory
    broker's ``inject``). One URL: a :class:`RedisHistory` on its own client. Several: a
    :class:`ShardedHistory` of one per URL, in that order. ``cluster=True``: one store on a
    Redis Cluster client (the one URL is a seed node). Every Redis client has ``timeout``
    seconds per command and no automatic retries (a publish is never sent twice; the store
    retries a read itself).
    """
    if not urls:
        from .memory import MemoryHistory

        return MemoryHistory(on_publish=on_publish)
    from .redis import RedisHistory, no_retry_clients

    def store(client: Any) -> History:
        history = RedisHistory(client, prefix=prefix)
        history.owns_client = True
        return history

    stores = [store(c) for c in no_retry_clients(urls, cluster=cluster, timeout=timeout)]
    if len(stores) == 1:
        return stores[0]
    from .sharded import ShardedHistory

    return ShardedHistory(stores)
