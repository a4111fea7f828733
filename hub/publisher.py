"""The library Python backends use to push to hub clients through Redis.

>>> from hub import Publisher
>>> with Publisher("redis://127.0.0.1:6379/0") as hub:
...     hub.publish("news", {"title": "hi"})        # -> number of hub processes reached
...     hub.publish_to_user("alice", {"text": "you have mail"})

Both classes send ``PUBLISH <prefix><channel> <orjson.dumps(data)>``
(https://redis.io/docs/latest/commands/publish/), exactly what ``redis-cli PUBLISH`` from any
other language does. Given several URLs they pick the shard of each channel the way the hub
does (:func:`hub.sharding.shard_index`); with ``cluster=True`` the one URL is a Redis Cluster
seed node and messages go out with SPUBLISH.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .channels import personal_channel
from .exceptions import ProtocolError
from .protocol import check_channel, encode_data
from .sharding import shard_index

__all__ = ["AsyncPublisher", "Publisher"]


def _clients(redis_url: str | Sequence[str], cluster: bool, socket_timeout: float,
             cluster_class: Any, client_class: Any) -> list[Any]:
    """One client per shard URL, or one cluster client; ValueError for a bad URL list."""
    urls = [redis_url] if isinstance(redis_url, str) else list(redis_url)
    if not urls:
        raise ValueError("at least one Redis URL is needed")
    if cluster:
        if len(urls) > 1:
            raise ValueError("cluster=True takes one seed URL")
        return [cluster_class.from_url(urls[0], socket_timeout=socket_timeout)]
    return [client_class.from_url(url, socket_timeout=socket_timeout) for url in urls]


def _message(channel: str, data: Any, prefix: str) -> tuple[bytes, bytes]:
    """``(redis channel, payload)``; raises ValueError for a bad channel or data."""
    try:
        check_channel(channel)
        payload = encode_data(data)
    except ProtocolError as exc:
        raise ValueError(f"{exc.code}: {exc.message}") from None
    return (prefix + channel).encode(), payload


class Publisher:
    """Synchronous publisher. ``redis_url``: one URL, or the ordered list of shard URLs.

    ``publish(channel, data) -> int`` and ``publish_to_user(user_id, data) -> int`` return the
    number of hub processes that received the message (PUBLISH's reply: 0 when no hub has a
    subscriber). ``data`` is any JSON-serialisable value. Raises ValueError for an invalid
    channel name or data before anything is sent (and at construction for no URL, or for
    several URLs with ``cluster=True``), and redis-py's ConnectionError or
    TimeoutError when Redis cannot be reached.
    """

    def __init__(self, redis_url: str | Sequence[str], prefix: str = "hub:", *,
                 cluster: bool = False, socket_timeout: float = 5.0) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._clients = _clients(redis_url, cluster, socket_timeout, RedisCluster, redis.Redis)

    def publish(self, channel: str, data: Any) -> int:
        name, payload = _message(channel, data, self.prefix)
        if self.cluster:
            return int(self._clients[0].spublish(name, payload))
        return int(self._clients[shard_index(channel, len(self._clients))].publish(name, payload))

    def publish_to_user(self, user_id: str, data: Any) -> int:
        """Publish to the personal channel ``user:<user_id>`` of every connection of a user."""
        return self.publish(personal_channel(user_id), data)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """The asyncio twin of :class:`Publisher`: the same arguments; methods are coroutines.

    Use ``async with AsyncPublisher(url) as hub: await hub.publish("news", {...})`` or call
    :meth:`aclose` when done.
    """

    def __init__(self, redis_url: str | Sequence[str], prefix: str = "hub:", *,
                 cluster: bool = False, socket_timeout: float = 5.0) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._clients = _clients(redis_url, cluster, socket_timeout, AsyncRedisCluster,
                                 aioredis.Redis)
    async def publish(self, channel: str, data: Any) -> int:
        name, payload = _message(channel, data, self.prefix)
        if self.cluster:
            return int(await self._clients[0].spublish(name, payload))
        return int(await self._clients[shard_index(channel, len(self._clients))].publish(
            name, payload))

    async def publish_to_user(self, user_id: str, data: Any) -> int:
        return await self.publish(personal_channel(user_id), data)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
