"""The broker interface and the factory that picks an implementation from the config.

A broker carries messages between hub processes. Its delivery guarantee is **at most once**:
a message published while the broker link is down, or before a subscription is confirmed,
may be lost; the broker then calls ``on_gap`` with the channels that were affected once the
link is back. It never delivers a message twice and keeps the publish order of one publisher
on one channel.

Implementations:

* :class:`hub.broker_memory.MemoryBroker`, the embedded in-process broker (no Redis URL);
* :class:`hub.broker_redis.RedisBroker`, one Redis pub/sub connection per process;
* :class:`hub.broker_redis.ShardedBroker`, several independent Redis instances, each channel
  on one of them by :func:`hub.sharding.shard_index`;
* :class:`hub.broker_cluster.ClusterBroker`, Redis Cluster sharded pub/sub.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import Any

from .config import Config

__all__ = ["Broker", "OnMessage", "OnGap", "create_broker", "stop_task"]

#: Called with (hub channel name, raw payload bytes) for every message; must not block.
OnMessage = Callable[[str, bytes], None]
#: Called with the hub channel names whose messages may have been lost in an outage.
OnGap = Callable[[list[str]], None]


class Broker(abc.ABC):
    """Moves messages between hub processes. Channel names are hub names (no Redis prefix)."""

    def __init__(self, on_message: OnMessage, on_gap: OnGap) -> None:
        self.on_message = on_message
        self.on_gap = on_gap

    @abc.abstractmethod
    async def start(self) -> None:
        """Start connecting. Returns at once; :attr:`connected` tells when the link is up."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close every link. The broker cannot be restarted."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the broker can subscribe and publish (drives ``/readyz``)."""

    @abc.abstractmethod
    async def subscribe(self, channel: str, timeout: float) -> None:
        """Return once messages published to ``channel`` from now on reach ``on_message``.

        Idempotent. Raises :class:`hub.exceptions.BrokerUnavailable` if that is not confirmed
        within ``timeout`` seconds; the channel then stays wanted and is subscribed when the
        link comes back, unless :meth:`unsubscribe` is called.
        """

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``. Idempotent; never raises for a lost link."""

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish ``payload`` to ``channel``; return the number of hub processes reached.

        Raises :class:`hub.exceptions.BrokerUnavailable` if the broker cannot take it.
        """

    def is_live(self, channel: str) -> bool:
        """True if ``channel`` is confirmed subscribed on the current link."""
        return False


def create_broker(config: Config, on_message: OnMessage, on_gap: OnGap) -> Broker:
    """The broker for ``config``: memory without a Redis URL, Redis, sharded Redis or Cluster."""
    if not config.redis_url:
        from .broker_memory import MemoryBroker

        return MemoryBroker(on_message, on_gap)
    if config.redis_cluster:
        from .broker_cluster import ClusterBroker

        return ClusterBroker(config.redis_url[0], config, on_message, on_gap)
    from .broker_redis import RedisBroker, ShardedBroker

    if len(config.redis_url) == 1:
        return RedisBroker(config.redis_url[0], config, on_message, on_gap)
    return ShardedBroker(config.redis_url, config, on_message, on_gap)


async def stop_task(task: asyncio.Task[Any] | None, timeout: float = 2.0) -> bool:
    """Cancel ``task`` and wait up to ``timeout`` seconds for it to end; True if it did.

    The cancellation is repeated every 0.1 s: on Python 3.11 ``asyncio.wait_for`` can swallow
    a cancellation that arrives as its inner await fails, and a reconnect loop that catches
    that failure would otherwise run on forever.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, remaining))
    return True
