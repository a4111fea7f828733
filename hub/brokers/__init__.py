"""Brokers: the interface (:mod:`hub.brokers.base`) and the factory that picks one by URL.

Implementations, one module each, imported only when asked for:

* :class:`~hub.brokers.memory.MemoryBroker`, the embedded in-process broker (no Redis URL);
* :class:`~hub.brokers.redis.RedisBroker`, one Redis pub/sub connection per process;
* :class:`~hub.brokers.sharded.ShardedBroker`, a composite of several brokers, each channel on
  one of them by :func:`hub.sharding.shard_index` (several Redis URLs: one RedisBroker each);
* :class:`~hub.brokers.cluster.ClusterBroker`, Redis Cluster sharded pub/sub.

The Redis ones compose the link engine of :mod:`hub.brokers.link`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .base import Broker, BrokerHandler, Publication, StreamPosition

if TYPE_CHECKING:
    from .cluster import ClusterBroker
    from .memory import MemoryBroker
    from .redis import RedisBroker
    from .sharded import ShardedBroker

__all__ = [
    "Broker",
    "BrokerHandler",
    "ClusterBroker",
    "MemoryBroker",
    "Publication",
    "RedisBroker",
    "ShardedBroker",
    "StreamPosition",
    "create_broker",
]

_LAZY = {"ClusterBroker": "cluster", "MemoryBroker": "memory", "RedisBroker": "redis",
         "ShardedBroker": "sharded"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def create_broker(urls: Sequence[str] = (), *, cluster: bool = False, prefix: str = "hub:",
                  probe_interval: float = 1.0, probe_timeout: float = 2.0,
                  history: Callable[[str], bool] | None = None,
                  presence: Callable[[str], bool] | None = None) -> Broker:
    """An unbound broker for ``urls`` (redis-py URLs; ``redis://`` or ``rediss://`` for TLS).

    No URL: :class:`MemoryBroker`. One: :class:`RedisBroker`. Several: a
    :class:`ShardedBroker` of one RedisBroker per URL, in that order. ``cluster=True``: the one
    URL is a seed node of a Redis Cluster (:class:`ClusterBroker`). ``prefix`` is the Redis
    channel prefix; ``probe_interval`` and ``probe_timeout`` are seconds (see
    :class:`RedisBroker`). ``history`` tells the channels that keep a history (their history
    messages are subscribed too, with offsets; the memory broker gets them from its
    :class:`hub.history.MemoryHistory`). ``presence`` tells the channels with join and leave
    events (their presence channel is subscribed too). Raises :class:`ValueError` for
    ``cluster=True`` without exactly one URL.
    """
    if cluster:
        if len(urls) != 1:
            raise ValueError("a Redis Cluster broker takes exactly one seed URL")
        from .cluster import ClusterBroker

        return ClusterBroker(urls[0], prefix=prefix, probe_interval=probe_interval,
                             probe_timeout=probe_timeout, history=history,
                             presence=presence)
    if not urls:
        from .memory import MemoryBroker

        return MemoryBroker()
    from .redis import RedisBroker

    shards = [RedisBroker(url, prefix=prefix, probe_interval=probe_interval,
                          probe_timeout=probe_timeout, history=history,
                             presence=presence) for url in urls]
    if len(shards) == 1:
        return shards[0]
    from .sharded import ShardedBroker

    return ShardedBroker(shards)
