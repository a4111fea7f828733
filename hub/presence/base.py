"""The presence interface and its value types (a leaf module: imports nothing of ours).

*Presence* is, per channel, the set of connections subscribed to it anywhere in the hub, one
entry per connection (its client id) with the connection's :class:`ClientInfo`. Each entry
expires ``ttl`` seconds (float) after it was last added or refreshed, so the entries of a
process that died without cleaning up (SIGKILL, lost host) disappear on their own; a live
process refreshes its entries every ``ttl / 3`` seconds (:meth:`Presence.refresh`).

An entry is *live* while its expiry is in the future and *expired* from its expiry on (Redis
store: Redis server time, so process clocks do not matter). Expired entries are never
returned by :meth:`Presence.clients` or counted by :meth:`Presence.stats`, even before they
are deleted; :meth:`Presence.expire` deletes them and returns them exactly once, which is how
the leaves of a dead process's clients are reported. docs/presence-format.md is the contract
of the Redis implementation and says how the node uses all this.

Channel names here are hub names (``chat:room1``), never Redis keys.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson

__all__ = ["ClientInfo", "Presence", "PresenceStats", "pack_info", "unpack_info"]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One connection's presence entry: ``client`` is its client id (unique per connection,
    the entry's identity), ``user`` the authenticated user id or None (anonymous).

    More fields (Centrifugo's ``conn_info``/``chan_info``, JSON values) can be added later with
    defaults: the packed form is a JSON object and unknown members are ignored on read.
    """

    client: str
    user: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """``clients``: live entries of the channel (connections); ``users``: distinct user ids
    among them. Anonymous connections (``user`` None) count as clients only, never as users,
    so ``users <= clients`` and a channel of anonymous connections has ``users == 0``."""

    clients: int
    users: int


def pack_info(info: ClientInfo) -> bytes:
    """The stored form of ``info`` without its client id (the hash field holds that): a compact
    JSON object, ``{"user":"alice"}``, or ``{}`` for an anonymous connection."""
    if info.user is None:
        return b"{}"
    return orjson.dumps({"user": info.user})


def unpack_info(client: str, packed: bytes | str) -> ClientInfo:
    """The :class:`ClientInfo` of ``client`` stored as ``packed``; a member ``user`` that is
    not a string (or unreadable JSON) reads as anonymous, unknown members are ignored."""
    try:
        data = orjson.loads(packed)
    except orjson.JSONDecodeError:
        data = None
    user = data.get("user") if isinstance(data, dict) else None
    return ClientInfo(client, user if isinstance(user, str) else None)


class Presence(abc.ABC):
    """Who is subscribed to a channel, across every hub process. Every method is a coroutine
    and atomic per channel; durations are seconds (float), ``ttl > 0``."""

    @abc.abstractmethod
    async def add(self, channel: str, info: ClientInfo, *, ttl: float) -> bool:
        """Insert ``info`` as the entry of ``info.client`` in ``channel``, or refresh it (its
        info is replaced); it expires ``ttl`` seconds from now unless refreshed. True when
        the entry was absent (a join), False when it was there, expired-but-not-yet-deleted
        included. Raises :class:`ValueError` for ``ttl <= 0``."""

    @abc.abstractmethod
    async def remove(self, channel: str, client: str) -> bool:
        """Delete the entry of ``client`` in ``channel``. True when this call deleted it (live
        or expired-but-not-yet-deleted), False when it was not there: of all the callers of
        :meth:`remove` and :meth:`expire`, exactly one gets a given entry, and only that one
        reports the leave."""

    @abc.abstractmethod
    async def refresh(self, entries: Iterable[tuple[str, ClientInfo]], *,
                      ttl: float) -> list[tuple[str, ClientInfo]]:
        """:meth:`add` every ``(channel, info)`` of ``entries`` (a process's periodic refresh
        of all its connections' entries, every ``ttl / 3`` seconds), batched: the Redis store
        sends one command per channel per at most ``batch`` entries, pipelined, so the number
        of round trips grows with ``len(entries) / batch``, not with the entries. Returns the
        entries that were absent and are now created again (deleted by :meth:`expire` after
        this process stalled longer than ``ttl``, or lost with a Redis restart): the caller
        may announce them as joins again (in no particular order). Not atomic as a whole,
        each channel's part is."""

    @abc.abstractmethod
    async def clients(self, channel: str) -> list[ClientInfo]:
        """The live entries of ``channel`` (expired ones never, even before they are
        deleted), in no particular order."""

    @abc.abstractmethod
    async def stats(self, channel: str) -> PresenceStats:
        """Live connections and distinct users of ``channel`` (see :class:`PresenceStats`)."""

    @abc.abstractmethod
    async def expire(self, channel: str, *, limit: int = 1000) -> list[ClientInfo]:
        """Delete the entries of ``channel`` whose expiry has passed (at most ``limit``, the
        earliest first) and return exactly those: an entry is returned by one call only, even
        when several processes sweep concurrently, and never after :meth:`remove` took it.
        The caller reports each as a leave."""

    @abc.abstractmethod
    async def channels_with_expired(self, *, limit: int = 1000) -> list[str]:
        """Channels that hold expired entries now (at most ``limit``, the most overdue
        first): those whose earliest entry expiry has passed. A channel stays listed until
        :meth:`expire` (or :meth:`remove`) took its expired entries, so a sweep that failed
        half-way loses nothing. The store keeps this index exact on every write."""

    async def sweep(self, *, limit: int = 1000) -> Mapping[str, list[ClientInfo]]:
        """:meth:`channels_with_expired`, then :meth:`expire` on each: ``{channel: the
        entries this call deleted}`` (channels where another sweeper was faster are left
        out). Call it every few seconds in every process; report each entry as a leave."""
        out: dict[str, list[ClientInfo]] = {}
        for channel in await self.channels_with_expired(limit=limit):
            gone = await self.expire(channel, limit=limit)
            if gone:
                out[channel] = gone
        return out

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds (the Redis store does not own its client)."""
