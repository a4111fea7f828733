"""Presence in one Redis (or one Redis Cluster), through the hub's one Function library.

The functions ``hub_presence_*`` live in the ``hub`` library of :mod:`hub.history`
(``hub/history/functions.lua``, version 2 and later) and are loaded by the same
:func:`hub.history.ensure_functions`, under the same version rule: one library, one version,
for every capability of the hub. Every call that fails with "Function not found" loads the
library and is retried once (nothing ran). docs/presence-format.md is the contract.

Keys: a channel's entries are in ``{<prefix><channel>}:p`` (hash) and ``{...}:pz`` (sorted
set of expiries), in the slot of the channel's key, like its history. The *index* of channels
with entries (channel key -> earliest expiry) must be updated in the same atomic call, so it
must share that slot: with one Redis (or each of several independent shards) it is the one key
``{<prefix>}presence:channels``; in a Redis Cluster it is one key per slot,
``{<prefix>presence:<n>}:channels`` with the smallest ``n >= 0`` whose key hashes to the
channel's slot (:func:`index_key`), and the set ``{<prefix>presence}:indexes`` lists the index
keys in use (a process adds to it before writing entries; it is never shrunk, at most 16384
members).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ResponseError

from ..history.redis import call_function, ensure_functions, not_found
from .base import ClientInfo, Presence, PresenceStats, pack_info, unpack_info

__all__ = ["RedisPresence", "index_key", "parse_clients", "parse_stats", "registry_key"]

AnyRedis = aioredis.Redis | RedisCluster


@functools.cache
def _slot_tags(prefix: str) -> tuple[int, ...]:
    """For each cluster slot, the smallest ``n`` whose ``<prefix>presence:<n>`` hashes to it."""
    tags = [-1] * REDIS_CLUSTER_HASH_SLOTS
    missing, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while missing:
        slot = key_slot(f"{prefix}presence:{n}".encode())
        if tags[slot] < 0:
            tags[slot] = n
            missing -= 1
        n += 1
    return tuple(tags)


def index_key(prefix: str, channel: str, *, cluster: bool) -> str:
    """The index key that ``channel``'s presence functions update: ``{<prefix>}presence:
    channels`` without a cluster, ``{<prefix>presence:<n>}:channels`` in the slot of
    ``<prefix><channel>`` in a Redis Cluster (the first call builds a table of 16384 tags,
    about a tenth of a second)."""
    if not cluster:
        return "{" + prefix + "}presence:channels"
    n = _slot_tags(prefix)[key_slot((prefix + channel).encode())]
    return "{" + f"{prefix}presence:{n}" + "}:channels"


def registry_key(prefix: str) -> str:
    """The set of the index keys in use in a Redis Cluster: ``{<prefix>presence}:indexes``."""
    return "{" + prefix + "presence}:indexes"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_clients(reply: Sequence[Any]) -> list[ClientInfo]:
    """The entries of ``FCALL hub_presence_clients``'s reply (client, packed info, ...)."""
    return [unpack_info(_text(reply[i]), reply[i + 1]) for i in range(0, len(reply) - 1, 2)]


def parse_stats(reply: Sequence[Any]) -> PresenceStats:
    """The counts of ``FCALL hub_presence_stats``'s reply (clients, users)."""
    return PresenceStats(int(reply[0]), int(reply[1]))


class RedisPresence(Presence):
    """Presence in the Redis of ``client`` (a ``redis.asyncio.Redis`` or ``RedisCluster`` built
    by the caller; the store never closes it).

    ``prefix``: the hub's Redis prefix (``hub:``, no brace). ``batch``: at most this many
    entries per ``FCALL hub_presence_refresh`` and this many such calls per pipeline in
    :meth:`refresh`: each call keeps Redis busy in proportion to ``batch`` (figures in
    docs/presence-format.md; lower it if that latency matters). Without a cluster, 20,000
    entries are about 40 calls in one pipeline: one round trip. In a cluster,
    one call per slot touched (at most 16384) per ``batch`` entries, one pipeline per
    ``batch`` calls (redis-py sends a pipeline's commands to every master in parallel). With
    several independent shards, build one store per shard client and pick it by
    :func:`hub.sharding.shard_index`, as the brokers and the history do; sweep every shard.
    """

    def __init__(self, client: AnyRedis, *, prefix: str = "hub:", batch: int = 500) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("presence needs a prefix without braces (it adds its own "
                             "hash tags)")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.client = client
        self.prefix = prefix
        self.batch = batch
        self.cluster = isinstance(client, RedisCluster)
        self._loading = asyncio.Lock()
        self.loads = 0  # times the library was (re)loaded by this store

    def key(self, channel: str) -> str:
        """The declared key of ``channel``: ``<prefix><channel>``."""
        return self.prefix + channel

    def index(self, channel: str) -> str:
        """The index key of ``channel`` (:func:`index_key`)."""
        return index_key(self.prefix, channel, cluster=self.cluster)

    async def ensure_functions(self) -> int:
        """:func:`hub.history.ensure_functions` for this store's client, once at a time."""
        async with self._loading:
            self.loads += 1
            return await ensure_functions(self.client)

    async def _fcall(self, function: str, keys: Sequence[str], *args: Any, safe: bool) -> Any:
        return await call_function(self.client, function, keys, *args, safe=safe,
                                   load=self.ensure_functions)

    async def _register(self, indexes: Iterable[str]) -> None:
        if self.cluster:
            names = sorted(set(indexes))
            if names:
                await self.client.sadd(registry_key(self.prefix), *names)

    async def add(self, channel: str, info: ClientInfo, *, ttl: float) -> bool:
        if not ttl > 0:
            raise ValueError("a presence ttl must be positive")
        index = self.index(channel)
        await self._register([index])
        reply = await self._fcall("hub_presence_add", (self.key(channel), index),
                                  repr(float(ttl)), info.client, pack_info(info), safe=True)
        return bool(int(reply[0]))

    async def remove(self, channel: str, client: str) -> bool:
        # not retried after a connection error: it may have been applied, and a retry would
        # answer False, so nobody would report the leave
        reply = await self._fcall("hub_presence_remove", (self.key(channel), self.index(channel)),
                                  client, safe=False)
        return bool(int(reply))

    async def refresh(self, entries: Iterable[tuple[str, ClientInfo]], *,
                      ttl: float) -> list[tuple[str, ClientInfo]]:
        if not ttl > 0:
            raise ValueError("a presence ttl must be positive")
        # index key -> channel -> infos: the channels of one index share a slot, so one
        # FCALL hub_presence_refresh can carry many of them (every channel without a cluster)
        groups: dict[str, dict[str, list[ClientInfo]]] = {}
        for channel, info in entries:
            groups.setdefault(self.index(channel), {}).setdefault(channel, []).append(info)
        calls: list[tuple[str, list[tuple[str, list[ClientInfo]]]]] = []
        for index, channels in groups.items():
            call: list[tuple[str, list[ClientInfo]]] = []
            size = 0
            for channel, infos in channels.items():
                for i in range(0, len(infos), self.batch):
                    part = infos[i:i + self.batch]
                    if size + len(part) > self.batch:
                        calls.append((index, call))
                        call, size = [], 0
                    call.append((channel, part))
                    size += len(part)
            if call:
                calls.append((index, call))
        await self._register(groups)
        ttl_arg = repr(float(ttl))
        created: list[tuple[str, ClientInfo]] = []
        for i in range(0, len(calls), self.batch):
            chunk = calls[i:i + self.batch]
            replies = await self._pipeline([
                ("hub_presence_refresh", self._refresh_args(index, sent, ttl_arg))
                for index, sent in chunk])
            for (_, sent), reply in zip(chunk, replies, strict=True):
                flags = iter(reply)
                created.extend((channel, info) for channel, infos in sent for info in infos
                               if int(next(flags)))
        return created

    def _refresh_args(self, index: str, call: list[tuple[str, list[ClientInfo]]],
                      ttl_arg: str) -> list[Any]:
        args: list[Any] = [len(call) + 1, index]
        args += [self.key(channel) for channel, _ in call]
        args.append(ttl_arg)
        args += [len(infos) for _, infos in call]
        for _, infos in call:
            for info in infos:
                args += (info.client, pack_info(info))
        return args

    async def _pipeline(self, calls: Sequence[tuple[str, Sequence[Any]]], *,
                        skip_errors: bool = False) -> list[Any]:
        """``FCALL function *args`` for every ``(function, args)`` of ``calls`` in one pipeline
        (one round trip per Redis node involved); the replies in order. After "Function not
        found" the library is loaded and those calls are sent again (they did nothing). Any
        other error reply is raised after the pipeline ran (the calls that succeeded are
        applied), or with ``skip_errors`` left as None in the replies (an error reply of these
        functions changed nothing). A connection error is raised."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for n in todo:
                function, args = calls[n]
                pipe.fcall(function, *args)
            results = await pipe.execute(raise_on_error=False)
            again = []
            for n, result in zip(todo, results, strict=True):
                if isinstance(result, BaseException):
                    if not_found(result) and attempt == 0:
                        again.append(n)
                    elif not (skip_errors and isinstance(result, ResponseError)):
                        raise result
                else:
                    replies[n] = result
            if not again:
                break
            await self.ensure_functions()
            todo = again
        return replies

    async def clients(self, channel: str) -> list[ClientInfo]:
        reply = await self._fcall("hub_presence_clients", (self.key(channel),), safe=True)
        return parse_clients(reply)

    async def stats(self, channel: str) -> PresenceStats:
        reply = await self._fcall("hub_presence_stats", (self.key(channel),), safe=True)
        return parse_stats(reply)

    async def expire(self, channel: str, *, limit: int = 1000) -> list[ClientInfo]:
        # not retried after a connection error: the entries may be deleted already and a
        # retry would not return them (their leaves would be lost, never reported twice)
        reply = await self._fcall("hub_presence_expire", (self.key(channel), self.index(channel)),
                                  max(1, limit), safe=False)
        return parse_clients(reply)

    async def _due(self, limit: int) -> list[tuple[float, str]]:
        """``(earliest expiry ms, channel)`` of the channels due now, the most overdue first."""
        limit = max(1, limit)
        if self.cluster:
            indexes = sorted(_text(k) for k in await self.client.smembers(
                registry_key(self.prefix)))
        else:
            indexes = [self.index("")]
        due: list[tuple[float, str]] = []
        for i in range(0, len(indexes), self.batch):
            replies = await self._pipeline([("hub_presence_due", (1, index, limit))
                                            for index in indexes[i:i + self.batch]])
            for reply in replies:
                due += [(float(reply[j + 1]), _text(reply[j])) for j in range(0, len(reply), 2)]
        due.sort()
        return [(expiry, key[len(self.prefix):]) for expiry, key in due[:limit]
                if key.startswith(self.prefix)]

    async def channels_with_expired(self, *, limit: int = 1000) -> list[str]:
        return [channel for _, channel in await self._due(limit)]

    async def sweep(self, *, limit: int = 1000) -> Mapping[str, list[ClientInfo]]:
        """As :meth:`Presence.sweep`, in two round trips (per Redis node): the due channels,
        then one pipeline of their ``hub_presence_expire``. A channel whose call got an error
        reply is left out (nothing changed, it stays due); a connection error during the
        pipeline is raised and loses the leaves of the calls Redis ran (never reports them
        twice)."""
        channels = [channel for _, channel in await self._due(limit)]
        replies = await self._pipeline([
            ("hub_presence_expire", (2, self.key(c), self.index(c), max(1, limit)))
            for c in channels], skip_errors=True)
        return {c: parse_clients(reply)
                for c, reply in zip(channels, replies, strict=True) if reply}
