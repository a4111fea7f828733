"""History in one Redis (or one Redis Cluster), through the ``hub`` Function library.

Every operation is one ``FCALL`` of :mod:`functions.lua <hub.history>` with the channel's
declared key ``<prefix><channel>``, so it is atomic and, in a Redis Cluster, runs on the
master of that key's slot (the library's other keys share the slot through the hash tag
``{<prefix><channel>}``). docs/history-format.md is the contract.

Loading the library (:func:`ensure_functions`): a process loads it (``FUNCTION LOAD REPLACE``)
only when it is absent or its version is lower than :data:`LIBRARY_VERSION`, never lower, so
two versions in a rolling upgrade do not overwrite each other back and forth; the check and the
load run under a short lock (``SET hub:functions:lock NX PX``) shared by every hub process.
Functions vanish when Redis restarts without persistence: every call that fails with
"Function not found" loads the library and is retried once (nothing ran, so this is safe for
a publish too). Any other error is raised; a publish is never retried after it (it may have
been applied), a read or position is retried once after a connection error (the first
command on a pooled connection that Redis closed fails).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..brokers.base import Publication, StreamPosition
from .base import META_TTL, History, HistoryRead

__all__ = ["LIBRARY_CODE", "LIBRARY_NAME", "LIBRARY_VERSION", "RedisHistory",
           "ensure_functions", "functions_on_connect", "library_version",
           "loaded_version"]

logger = logging.getLogger("hub.history")

#: The Lua text of the library (``hub/history/functions.lua``).
LIBRARY_CODE: str = resources.files(__package__).joinpath("functions.lua").read_text("utf-8")
#: The library's name, from its first line ``#!lua name=hub``.
LIBRARY_NAME = "hub"
_LOCK_KEY = "hub:functions:lock"
_LOCK_MS = 5000
_NOT_FOUND = "function not found"
_RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
            "end return 0")

AnyRedis = aioredis.Redis | RedisCluster


def library_version(code: str) -> int:
    """The version a library text declares (its line ``local VERSION = <n>``)."""
    match = re.search(r"^local VERSION = (\d+)\s*$", code, re.MULTILINE)
    if match is None:
        raise ValueError("the library declares no 'local VERSION = <n>'")
    return int(match.group(1))


#: The version of the library this hub carries.
LIBRARY_VERSION = library_version(LIBRARY_CODE)


def not_found(exc: BaseException) -> bool:
    """True for Redis's "Function not found" (the library is not loaded)."""
    return isinstance(exc, ResponseError) and _NOT_FOUND in str(exc).lower()


_not_found = not_found


async def call_function(client: AnyRedis, function: str, keys: Sequence[str], *args: Any,
                        safe: bool, load: Callable[[], Awaitable[Any]]) -> Any:
    """``FCALL function len(keys) *keys *args`` with the library's retry rule: after
    "Function not found", ``load()`` it and call once more (nothing ran); after a connection
    error or timeout, call once more only when the call is ``safe`` to repeat (a read), never
    for one that may have been applied (a publish, a remove)."""
    connection_retry = safe
    loaded = False
    while True:
        try:
            return await client.fcall(function, len(keys), *keys, *args)
        except ResponseError as exc:
            if loaded or not not_found(exc):
                raise
            loaded = True
            await load()
        except (RedisConnectionError, RedisTimeoutError):
            if not connection_retry:
                raise
            connection_retry = False


#: Connections per Redis of a store's client (history, presence). More commands at once
#: wait for a free connection (up to the command timeout) instead of failing: a recovery
#: storm (10,000 clients reading their history at once) must queue, not error
#: (docs/benchmarks.md, "History and recovery under load").
STORE_MAX_CONNECTIONS = 100


def no_retry_clients(urls: Sequence[str], *, cluster: bool, timeout: float) -> list[AnyRedis]:
    """One asyncio client per URL (or one Redis Cluster client for the seed URL), each with
    ``timeout`` seconds per command and no automatic retries: the stores decide what may be
    sent again (:func:`call_function`). A one-Redis client has a blocking pool of
    :data:`STORE_MAX_CONNECTIONS` connections: a command past them waits up to ``timeout``
    seconds for one (redis-py's default pool raises "Too many connections" at once)."""
    if cluster:
        return [RedisCluster.from_url(urls[0], socket_timeout=timeout,
                                      socket_connect_timeout=timeout, retry=None,
                                      cluster_error_retry_attempts=0)]
    return [aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=STORE_MAX_CONNECTIONS, timeout=timeout,
                socket_timeout=timeout, socket_connect_timeout=timeout, retry=None),
                           retry=Retry(NoBackoff(), 0))  # one try: call_function decides
            for url in urls]


Execute = Callable[..., Awaitable[Any]]


async def loaded_version(client: AnyRedis) -> int | None:
    """The version of the ``hub`` library loaded in ``client``'s Redis; None when absent (0: a
    ``hub`` library without ``hub_version``)."""
    return await _loaded_version(client.execute_command)


async def _loaded_version(execute: Execute) -> int | None:
    try:
        return int(await execute("FCALL", "hub_version", 0))
    except ResponseError as exc:
        if not _not_found(exc):
            raise
    listing = await execute("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME)
    return 0 if listing else None


async def _ensure_one(execute: Execute, code: str, version: int) -> int:
    token = secrets.token_hex(8)
    deadline = time.monotonic() + _LOCK_MS / 1000
    locked = False
    while not locked and time.monotonic() < deadline:
        locked = bool(await execute("SET", _LOCK_KEY, token, "NX", "PX", _LOCK_MS))
        if not locked:
            await asyncio.sleep(0.02)
    try:
        current = await _loaded_version(execute)
        if current is not None and current >= version:
            return current
        await execute("FUNCTION", "LOAD", "REPLACE", code)
        return version
    finally:
        if locked:
            await execute("EVAL", _RELEASE, 1, _LOCK_KEY, token)


async def functions_on_connect(connection: aioredis.connection.AbstractConnection) -> None:
    """A ``redis_connect_func`` for ``redis.asyncio.Redis(..., redis_connect_func=...)``: the
    connection's usual handshake, then :func:`ensure_functions` on it, so that every new
    connection (after a Redis restart too) finds the library loaded. Costs a round trip or
    two per new connection."""
    await connection.on_connect()

    async def execute(*args: Any) -> Any:
        await connection.send_command(*args)
        return await connection.read_response()

    await _ensure_one(execute, LIBRARY_CODE, LIBRARY_VERSION)


async def ensure_functions(client: AnyRedis, *, code: str = LIBRARY_CODE) -> int:
    """Load the ``hub`` library into ``client``'s Redis unless the same or a newer version is
    there; return the version now loaded (the highest). Call it at start and after every
    reconnect. A Redis Cluster client: on every master (no lock there, the lock key would live
    on one master only; the version rule still never downgrades except in the race of two
    versions loading at the same instant, which the next call repairs)."""
    version = library_version(code)
    if isinstance(client, RedisCluster):
        await client.initialize()  # the node map (a no-op once known)
        loaded = []
        for node in client.get_primaries():
            current = await client.execute_command(
                "FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE", target_nodes=node)
            have = _version_in_listing(current)
            if have is None or have < version:
                await client.execute_command(
                    "FUNCTION", "LOAD", "REPLACE", code, target_nodes=node)
                have = version
            loaded.append(have)
        if not loaded:
            raise RuntimeError("the Redis Cluster reports no master")
        return min(loaded)
    return await _ensure_one(client.execute_command, code, version)


def _version_in_listing(listing: Any) -> int | None:
    """The version in a ``FUNCTION LIST LIBRARYNAME hub WITHCODE`` reply (None: absent)."""
    if isinstance(listing, dict):  # redis-py may merge the replies of the targeted node
        listing = next(iter(listing.values()), [])
    for library in listing or []:
        fields = library if isinstance(library, dict) else dict(zip(library[::2], library[1::2],
                                                                     strict=False))
        name = fields.get(b"library_name", fields.get("library_name"))
        if name in (LIBRARY_NAME, LIBRARY_NAME.encode()):
            code = fields.get(b"library_code", fields.get("library_code", b""))
            text = code.decode() if isinstance(code, bytes) else str(code)
            try:
                return library_version(text)
            except ValueError:
                return 0
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RedisHistory(History):
    """History in the Redis of ``client`` (a ``redis.asyncio.Redis`` or ``RedisCluster``
    built by the caller, with ``decode_responses=False``; the store never closes it).

    ``prefix`` is the hub's Redis prefix (``hub:``; no brace in it); ``meta_ttl`` the seconds
    the metadata (offset, epoch) outlives the channel's last write (default 30 days, like
    Centrifugo's ``history_meta_ttl``). With several shards, build one store per shard client
    and pick it by :func:`hub.sharding.shard_index` over the URL list, as the brokers do.
    """

    def __init__(self, client: AnyRedis, *, prefix: str = "hub:",
                 meta_ttl: float = META_TTL) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the history needs a prefix without braces (it adds its own "
                             "hash tag)")
        self.client = client
        self.prefix = prefix
        self.meta_ttl = meta_ttl
        self._loading: asyncio.Lock = asyncio.Lock()
        self.loads = 0  # times the library was (re)loaded by this store
        #: True when :meth:`close` closes ``client`` (set by :func:`hub.history.create_history`).
        self.owns_client = False

    def key(self, channel: str) -> str:
        """The declared key of ``channel``: ``<prefix><channel>``."""
        return self.prefix + channel

    async def start(self) -> None:
        """Load the function library now if it is absent or older (:func:`ensure_functions`);
        an unreachable Redis is logged and left to the first call."""
        try:
            await self.ensure_functions()
        except (RedisError, OSError) as exc:
            logger.info("history: function library not loaded yet (%s)", exc)

    async def close(self) -> None:
        """Close the client when this store owns it (``owns_client``)."""
        if self.owns_client:
            await self.client.aclose()

    async def ensure_functions(self) -> int:
        """:func:`ensure_functions` for this store's client, once at a time."""
        async with self._loading:
            self.loads += 1
            return await ensure_functions(self.client)

    async def _fcall(self, function: str, channel: str, *args: Any, safe: bool) -> Any:
        return await call_function(self.client, function, (self.key(channel),), *args,
                                   safe=safe, load=self.ensure_functions)

    async def publish(self, channel: str, payload: bytes, *, size: int, ttl: float,
                      idempotency_key: str | None = None) -> StreamPosition:
        if size < 1:
            raise ValueError("history size must be at least 1")
        reply = await self._fcall("hub_publish", channel, payload, size, repr(float(ttl)),
                                  idempotency_key or "", repr(float(self.meta_ttl)),
                                  safe=False)
        return StreamPosition(int(reply[0]), _text(reply[1]))

    async def position(self, channel: str, *, ttl: float) -> StreamPosition:
        reply = await self._fcall("hub_position", channel, repr(float(ttl)),
                                  repr(float(self.meta_ttl)), safe=True)
        return StreamPosition(int(reply[0]), _text(reply[1]))

    async def new_epoch(self, channel: str, expected: str, *, ttl: float) -> StreamPosition:
        reply = await self._fcall("hub_new_epoch", channel, expected, repr(float(ttl)),
                                  repr(float(self.meta_ttl)), safe=True)
        return StreamPosition(int(reply[0]), _text(reply[1]))

    async def read(self, channel: str, *, since: StreamPosition | None, limit: int,
                   ttl: float = 0.0) -> HistoryRead:
        if limit < 0:
            raise ValueError("limit must be at least 0")
        since_args = ("", "") if since is None else (since.offset, since.epoch)
        reply = await self._fcall("hub_read", channel, *since_args, limit, repr(float(ttl)),
                                  repr(float(self.meta_ttl)), safe=True)
        epoch = _text(reply[1])
        publications = [Publication(channel, _bytes(reply[i + 1]), int(reply[i]), epoch)
                        for i in range(3, len(reply), 2)]
        return HistoryRead(StreamPosition(int(reply[0]), epoch), publications,
                           bool(int(reply[2])))
