"""The library Python backends use to push to hub clients through Redis.

>>> from hub import Publisher
>>> with Publisher.from_config("/etc/hub/hub.toml") as hub:
...     hub.publish("news", {"title": "hi"})          # -> 2: hub processes reached
...     hub.publish("chat:room1", {"text": "hi"})     # -> StreamPosition(offset=7, epoch=...)
...     hub.publish_to_user("alice", {"text": "you have mail"})

On a channel **without history** (its namespace's ``history_size`` is 0, the default) both
classes send ``PUBLISH <prefix><channel> <orjson.dumps(data)>``
(https://redis.io/docs/latest/commands/publish/), exactly what ``redis-cli PUBLISH`` from any
other language does, and return PUBLISH's reply: the number of hub processes reached.

On a **history channel** (``history_size > 0``, given by the hub's configuration file or the
``namespaces``/``channels`` arguments) they run ``FCALL hub_publish 1 <prefix><channel>
<payload> <history_size> <history_ttl> [<idempotency_key>]`` of the ``hub`` Function library
(docs/history-format.md), which appends, trims and delivers in one atomic step, and return
the publication's :class:`~hub.brokers.base.StreamPosition` (offset, epoch).

Given several URLs they pick the shard of each channel the way the hub does
(:func:`hub.sharding.shard_index`); with ``cluster=True`` the one URL is a Redis Cluster seed
node, messages go out with SPUBLISH and the FCALL is routed by its declared key.

**A history publish is never sent twice by the library.** The one-Redis clients are built
with redis-py's retries off (what its ``from_url`` gives anyway) and maintenance
notifications off (redis-py 8 skips its check of a stale pooled connection while they are
"auto", so the first command after a Redis restart failed); with ``cluster=True``, history
publishes go through a second cluster client, built on the first one, with retries off, since
redis-py's cluster client re-sends a command after a connection error or timeout, which may
apply an FCALL twice (SPUBLISH keeps the default retries, as before). A ConnectionError or
TimeoutError from a history publish therefore means "maybe applied": retry it yourself with
an ``idempotency_key``, so that the retry cannot publish twice. The one retry the library
does is after "Function not found" (Redis restarted without persistence, or no hub loaded
the library yet): nothing ran, so it loads the library (never over a newer version) and
calls once more.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ResponseError
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from .auth import check_user_id
from .brokers.base import StreamPosition
from .channels import ChannelRules, NamespaceOptions, personal_channel
from .control import CONTROL_CHANNEL, check_close, encode
from .exceptions import AuthError, ConfigError, ProtocolError
from .history.redis import (
    _LOCK_KEY,
    _LOCK_MS,
    _RELEASE,
    LIBRARY_CODE,
    LIBRARY_NAME,
    _not_found,
    _version_in_listing,
    ensure_functions,
    library_version,
)
from .presence.base import ClientInfo, PresenceStats
from .presence.redis import parse_clients, parse_stats
from .protocol import CLOSE_DISCONNECTED, check_channel, encode_data
from .sharding import shard_index

__all__ = ["AsyncPublisher", "Publisher", "StreamPosition"]


def _urls(redis_url: str | Sequence[str], cluster: bool) -> list[str]:
    """The URL list; ValueError for none, or several with ``cluster=True``."""
    urls = [redis_url] if isinstance(redis_url, str) else list(redis_url)
    if not urls:
        raise ValueError("at least one Redis URL is needed")
    if cluster and len(urls) > 1:
        raise ValueError("cluster=True takes one seed URL")
    return urls


def _clients(urls: list[str], cluster: bool, socket_timeout: float, cluster_class: Any,
             client_class: Any, retry: Any) -> list[Any]:
    """One client per shard URL, with ``retry`` (no retries) and maintenance notifications
    off; or one cluster client, with ``retry`` unless it is None (redis-py's default)."""
    if cluster:
        kwargs = {} if retry is None else {"retry": retry}
        return [cluster_class.from_url(urls[0], socket_timeout=socket_timeout, **kwargs)]
    return [client_class.from_url(url, socket_timeout=socket_timeout, retry=retry,
                                  maint_notifications_config=MaintNotificationsConfig(
                                      enabled=False))
            for url in urls]


def _message(channel: str, data: Any, prefix: str) -> tuple[bytes, bytes]:
    """``(redis channel, payload)``; raises ValueError for a bad channel or data."""
    try:
        check_channel(channel)
        payload = encode_data(data)
    except ProtocolError as exc:
        raise ValueError(f"{exc.code}: {exc.message}") from None
    return (prefix + channel).encode(), payload


def _user_command(kind: str, user: str, channel: str | None = None, *,
                  code: int | None = None, reason: str | None = None) -> bytes:
    """The control message (:mod:`hub.control`) of a server-side command; ValueError for a
    bad user id, channel, close code or reason."""
    try:
        check_user_id(user)
    except AuthError as exc:
        raise ValueError(str(exc)) from None
    if kind == "disconnect":
        code, reason = check_close(code, reason)
        return encode(kind, user=user, code=code, reason=reason)
    try:
        check_channel(channel)
    except ProtocolError as exc:
        raise ValueError(f"{exc.code}: {exc.message}") from None
    return encode(kind, user=user, channel=channel)


def _presence_key(rules: ChannelRules, prefix: str, channel: str) -> str:
    """``<prefix><channel>``, the declared key of the presence functions; ValueError for a
    bad channel or one whose namespace keeps no presence."""
    try:
        check_channel(channel)
    except ProtocolError as exc:
        raise ValueError(f"{exc.code}: {exc.message}") from None
    if not rules.keeps_presence(channel):
        raise ValueError(f"no_presence: {channel!r} keeps no presence (its namespace's "
                         "presence option)")
    return prefix + channel


def _rules(prefix: str, namespaces: Mapping[str, NamespaceOptions] | None,
           channels: NamespaceOptions | None) -> ChannelRules:
    rules = ChannelRules(namespaces=namespaces, defaults=channels)
    options = [rules.defaults, *rules.namespaces.values()]
    if ("{" in prefix or "}" in prefix) and any(o.history for o in options):
        raise ValueError("history channels need a prefix without { or } (the history adds "
                         "its own hash tag)")
    return rules


def _fcall_args(options: NamespaceOptions, payload: bytes,
                idempotency_key: str | None) -> tuple[Any, ...]:
    """The arguments after the key of ``FCALL hub_publish``."""
    args: tuple[Any, ...] = (payload, options.history_size, repr(float(options.history_ttl)))
    if idempotency_key is not None:
        args += (idempotency_key,)
    return args


def _check_key(options: NamespaceOptions, idempotency_key: str | None) -> None:
    if idempotency_key is None:
        return
    if not options.history:
        raise ValueError("an idempotency key needs a history channel: a plain PUBLISH keeps "
                         "no trace of what was sent, so a repeat could not be recognised and "
                         "would be delivered again")
    if not isinstance(idempotency_key, str) or not idempotency_key:
        raise ValueError("the idempotency key must be a non-empty string")


def _position(reply: Any) -> StreamPosition:
    epoch = reply[1]
    return StreamPosition(int(reply[0]), epoch.decode() if isinstance(epoch, bytes)
                          else str(epoch))


def _config_kwargs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The constructor arguments a hub configuration file gives (ConfigError when bad)."""
    from .config import Config

    config = Config.from_sources({"config": os.fspath(path)}, {})
    if not config.redis_url:
        raise ConfigError(f"{os.fspath(path)}: redis_url: a publisher needs one (the file "
                          "sets none)")
    return {"redis_url": list(config.redis_url), "prefix": config.redis_prefix,
            "cluster": config.redis_cluster, "namespaces": dict(config.namespaces),
            "channels": config.channels}


# -- loading the library with a synchronous client (hub.history.redis has the async one) -----


def _sync_loaded_version(client: Any) -> int | None:
    try:
        return int(client.execute_command("FCALL", "hub_version", 0))
    except ResponseError as exc:
        if not _not_found(exc):
            raise
    listing = client.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME)
    return 0 if listing else None


def ensure_functions_sync(client: redis.Redis | RedisCluster, *, code: str = LIBRARY_CODE,
                          ) -> int:
    """:func:`hub.history.redis.ensure_functions` for a synchronous redis-py client: load the
    ``hub`` library unless the same or a newer version is loaded (under the shared lock on
    one Redis; on every master of a cluster, without it); return the version now loaded."""
    version = library_version(code)
    c: Any = client  # redis-py's sync commands are untyped
    if isinstance(client, RedisCluster):
        loaded = []
        for node in c.get_primaries():
            listing = c.execute_command(
                "FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE", target_nodes=node)
            have = _version_in_listing(listing)
            if have is None or have < version:
                c.execute_command("FUNCTION", "LOAD", "REPLACE", code, target_nodes=node)
                have = version
            loaded.append(have)
        if not loaded:
            raise RuntimeError("the Redis Cluster reports no master")
        return min(loaded)
    token = secrets.token_hex(8)
    deadline = time.monotonic() + _LOCK_MS / 1000
    locked = False
    while not locked and time.monotonic() < deadline:
        locked = bool(c.execute_command("SET", _LOCK_KEY, token, "NX", "PX", _LOCK_MS))
        if not locked:
            time.sleep(0.02)
    try:
        current = _sync_loaded_version(c)
        if current is not None and current >= version:
            return current
        c.execute_command("FUNCTION", "LOAD", "REPLACE", code)
        return version
    finally:
        if locked:
            c.execute_command("EVAL", _RELEASE, 1, _LOCK_KEY, token)


class Publisher:
    """Synchronous publisher. ``redis_url``: one URL, or the ordered list of shard URLs (the
    hubs' ``--redis-url``s, same order); ``prefix``: the hubs' ``--redis-prefix``.

    ``namespaces`` maps a namespace name to its :class:`~hub.channels.NamespaceOptions` (the
    ``[namespaces.<name>]`` tables of the hubs' configuration file), ``channels`` are the
    options of every other channel (``[channels]``); both default to no history anywhere.
    :meth:`from_config` reads them, and the Redis options, from the hubs' file.

    ``publish(channel, data, *, idempotency_key=None) -> int | StreamPosition``: ``int`` on a
    plain channel (PUBLISH's reply: hub processes reached, 0 when no hub has a subscriber);
    :class:`~hub.brokers.base.StreamPosition` ``(offset, epoch)`` on a history channel. An
    ``idempotency_key`` (history channels only) makes a repeat within 300 s return the first
    position and deliver nothing. ``data`` is any JSON-serialisable value.

    Raises ValueError before anything is sent for an invalid channel name or data, or an
    idempotency key on a plain channel (and at construction for no URL, several URLs with
    ``cluster=True``, or a prefix with braces and history channels); redis-py's
    ConnectionError or TimeoutError when Redis cannot be reached or does not answer (a
    history publish is then never re-sent and may have been applied: see the module);
    redis-py's ResponseError for an error reply.
    """

    def __init__(self, redis_url: str | Sequence[str], prefix: str = "hub:", *,
                 cluster: bool = False, socket_timeout: float = 5.0,
                 namespaces: Mapping[str, NamespaceOptions] | None = None,
                 channels: NamespaceOptions | None = None) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.rules = _rules(prefix, namespaces, channels)
        self._urls = _urls(redis_url, cluster)
        self._socket_timeout = socket_timeout
        self._clients = _clients(self._urls, cluster, socket_timeout, RedisCluster, redis.Redis,
                                 None if cluster else Retry(NoBackoff(), 0))
        self._history_clients: list[Any] = []

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], *,
                    socket_timeout: float = 5.0) -> Publisher:
        """A publisher configured by the hubs' TOML file: ``redis_url``, ``redis_prefix``,
        ``redis_cluster``, ``[channels]`` and ``[namespaces.<name>]``. Only the file (and the
        defaults) count: no ``HUB_*`` variable is read. Raises
        :class:`~hub.exceptions.ConfigError` (a ValueError) for a bad file or one without
        ``redis_url``."""
        return cls(**_config_kwargs(path), socket_timeout=socket_timeout)

    def options(self, channel: str) -> NamespaceOptions:
        """The options of ``channel`` this publisher applies (history or not)."""
        return self.rules.options(channel)

    def _shard(self, channel: str) -> int:
        return 0 if self.cluster else shard_index(channel, len(self._clients))

    def _history_client(self, channel: str) -> Any:
        """The shard's client, or a cluster client that never re-sends a command."""
        if not self.cluster:
            return self._clients[self._shard(channel)]
        if not self._history_clients:
            self._history_clients = _clients(self._urls, True, self._socket_timeout,
                                             RedisCluster, None, Retry(NoBackoff(), 0))
        return self._history_clients[0]

    def publish(self, channel: str, data: Any, *,
                idempotency_key: str | None = None) -> int | StreamPosition:
        name, payload = _message(channel, data, self.prefix)
        options = self.rules.options(channel)
        _check_key(options, idempotency_key)
        if not options.history:
            client = self._clients[self._shard(channel)]
            if self.cluster:
                return int(client.spublish(name, payload))
            return int(client.publish(name, payload))
        client = self._history_client(channel)
        args = _fcall_args(options, payload, idempotency_key)
        try:
            return _position(client.fcall("hub_publish", 1, name, *args))
        except ResponseError as exc:
            if not _not_found(exc):
                raise
        ensure_functions_sync(client)
        return _position(client.fcall("hub_publish", 1, name, *args))

    def publish_to_user(self, user_id: str, data: Any, *,
                        idempotency_key: str | None = None) -> int | StreamPosition:
        """Publish to the personal channel ``user:<user_id>`` of every connection of a user
        (namespace ``user``: a history channel when ``[namespaces.user]`` says so)."""
        return self.publish(personal_channel(user_id), data, idempotency_key=idempotency_key)

    # -- server-side commands (the control channel, docs/control-format.md) -------------

    def _control(self, payload: bytes) -> int:
        name = (self.prefix + CONTROL_CHANNEL).encode()
        client = self._clients[self._shard(CONTROL_CHANNEL)]
        if self.cluster:
            return int(client.spublish(name, payload))
        return int(client.publish(name, payload))

    def disconnect(self, user: str, *, code: int = CLOSE_DISCONNECTED, reason: str = "") -> int:
        """Close every connection of ``user`` on every hub process with ``code`` (4000-4999,
        default 4003) and ``reason`` (at most 123 UTF-8 bytes); returns the number of hub
        processes reached. Raises ValueError for a bad user id, code or reason."""
        return self._control(_user_command("disconnect", user, code=code, reason=reason))

    def subscribe(self, user: str, channel: str) -> int:
        """Subscribe every connection of ``user`` on every hub process to ``channel`` (each
        is told with a ``subscribed`` frame); returns the number of hub processes reached.
        Raises ValueError for a bad user id or channel."""
        return self._control(_user_command("subscribe", user, channel))

    def unsubscribe(self, user: str, channel: str) -> int:
        """Unsubscribe every connection of ``user`` on every hub process from ``channel``
        (each told with an ``unsubscribed`` frame, reason ``server``); returns the number of
        hub processes reached. Raises ValueError for a bad user id or channel."""
        return self._control(_user_command("unsubscribe", user, channel))

    def _presence_call(self, function: str, channel: str) -> Any:
        key = _presence_key(self.rules, self.prefix, channel)
        client = self._clients[self._shard(channel)]
        try:
            return client.fcall(function, 1, key)
        except ResponseError as exc:
            if not _not_found(exc):
                raise
        ensure_functions_sync(client)
        return client.fcall(function, 1, key)

    def presence(self, channel: str) -> list[ClientInfo]:
        """Every connection subscribed to the presence channel ``channel`` on any hub process
        (``ClientInfo(client, user)``, in no particular order; docs/presence-format.md).
        Raises ValueError for a bad channel or one without presence."""
        return parse_clients(self._presence_call("hub_presence_clients", channel))

    def presence_stats(self, channel: str) -> PresenceStats:
        """``PresenceStats(clients, users)`` of the presence channel ``channel``. Raises
        ValueError as :meth:`presence` does."""
        return parse_stats(self._presence_call("hub_presence_stats", channel))

    def close(self) -> None:
        for client in self._clients + self._history_clients:
            client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """The asyncio twin of :class:`Publisher`: the same arguments, :meth:`from_config` and
    return values; methods are coroutines.

    Use ``async with AsyncPublisher(url) as hub: await hub.publish("news", {...})`` or call
    :meth:`aclose` when done.
    """

    def __init__(self, redis_url: str | Sequence[str], prefix: str = "hub:", *,
                 cluster: bool = False, socket_timeout: float = 5.0,
                 namespaces: Mapping[str, NamespaceOptions] | None = None,
                 channels: NamespaceOptions | None = None) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.rules = _rules(prefix, namespaces, channels)
        self._urls = _urls(redis_url, cluster)
        self._socket_timeout = socket_timeout
        self._clients = _clients(self._urls, cluster, socket_timeout, AsyncRedisCluster,
                                 aioredis.Redis, None if cluster else AsyncRetry(NoBackoff(), 0))
        self._history_clients: list[Any] = []

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], *,
                    socket_timeout: float = 5.0) -> AsyncPublisher:
        """As :meth:`Publisher.from_config` (reads the file now, synchronously)."""
        return cls(**_config_kwargs(path), socket_timeout=socket_timeout)

    def options(self, channel: str) -> NamespaceOptions:
        """The options of ``channel`` this publisher applies (history or not)."""
        return self.rules.options(channel)

    def _shard(self, channel: str) -> int:
        return 0 if self.cluster else shard_index(channel, len(self._clients))

    def _history_client(self, channel: str) -> Any:
        """The shard's client, or a cluster client that never re-sends a command."""
        if not self.cluster:
            return self._clients[self._shard(channel)]
        if not self._history_clients:
            self._history_clients = _clients(self._urls, True, self._socket_timeout,
                                             AsyncRedisCluster, None,
                                             AsyncRetry(NoBackoff(), 0))
        return self._history_clients[0]

    async def publish(self, channel: str, data: Any, *,
                      idempotency_key: str | None = None) -> int | StreamPosition:
        name, payload = _message(channel, data, self.prefix)
        options = self.rules.options(channel)
        _check_key(options, idempotency_key)
        if not options.history:
            client = self._clients[self._shard(channel)]
            if self.cluster:
                return int(await client.spublish(name, payload))
            return int(await client.publish(name, payload))
        client = self._history_client(channel)
        args = _fcall_args(options, payload, idempotency_key)
        try:
            return _position(await client.fcall("hub_publish", 1, name, *args))
        except ResponseError as exc:
            if not _not_found(exc):
                raise
        await ensure_functions(client)
        return _position(await client.fcall("hub_publish", 1, name, *args))

    async def publish_to_user(self, user_id: str, data: Any, *,
                              idempotency_key: str | None = None) -> int | StreamPosition:
        return await self.publish(personal_channel(user_id), data,
                                  idempotency_key=idempotency_key)

    # -- server-side commands: as Publisher's ---------------------------------------------

    async def _control(self, payload: bytes) -> int:
        name = (self.prefix + CONTROL_CHANNEL).encode()
        client = self._clients[self._shard(CONTROL_CHANNEL)]
        if self.cluster:
            return int(await client.spublish(name, payload))
        return int(await client.publish(name, payload))

    async def disconnect(self, user: str, *, code: int = CLOSE_DISCONNECTED,
                         reason: str = "") -> int:
        """See :meth:`Publisher.disconnect`."""
        return await self._control(_user_command("disconnect", user, code=code, reason=reason))

    async def subscribe(self, user: str, channel: str) -> int:
        """See :meth:`Publisher.subscribe`."""
        return await self._control(_user_command("subscribe", user, channel))

    async def unsubscribe(self, user: str, channel: str) -> int:
        """See :meth:`Publisher.unsubscribe`."""
        return await self._control(_user_command("unsubscribe", user, channel))

    async def _presence_call(self, function: str, channel: str) -> Any:
        key = _presence_key(self.rules, self.prefix, channel)
        client = self._clients[self._shard(channel)]
        try:
            return await client.fcall(function, 1, key)
        except ResponseError as exc:
            if not _not_found(exc):
                raise
        await ensure_functions(client)
        return await client.fcall(function, 1, key)

    async def presence(self, channel: str) -> list[ClientInfo]:
        """See :meth:`Publisher.presence`."""
        return parse_clients(await self._presence_call("hub_presence_clients", channel))

    async def presence_stats(self, channel: str) -> PresenceStats:
        """See :meth:`Publisher.presence_stats`."""
        return parse_stats(await self._presence_call("hub_presence_stats", channel))

    async def aclose(self) -> None:
        for client in self._clients + self._history_clients:
            await client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
