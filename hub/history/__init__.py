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
from typing import TYPE_CHECKING, Any

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

__all__ = [
    "IDEMPOTENCY_TTL",
    "META_TTL",
    "History",
    "HistoryRead",
    "MemoryHistory",
    "RedisHistory",
    "ensure_functions",
    "format_history_message",
    "functions_on_connect",
    "history_channel",
    "history_keys",
    "parse_history_message",
]

_LAZY = {"MemoryHistory": "memory", "RedisHistory": "redis", "ensure_functions": "redis",
         "functions_on_connect": "redis"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
