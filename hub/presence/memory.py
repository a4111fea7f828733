"""The in-process presence: the semantics of the Redis one, for the embedded broker and tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from .base import ClientInfo, Presence, PresenceStats

__all__ = ["MemoryPresence"]


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError("a presence ttl must be positive")


class MemoryPresence(Presence):
    """Presence in this process's memory; nothing survives the process.

    ``clock`` (seconds, monotonic) is for tests: an entry is expired from ``clock() >=`` its
    expiry on, as in Redis. Every method runs without awaiting, so each is atomic in the
    event loop.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # channel -> client -> (info, expiry)
        self._channels: dict[str, dict[str, tuple[ClientInfo, float]]] = {}

    def clear(self) -> None:
        """Forget everything, as a Redis restart without persistence does."""
        self._channels.clear()

    def _add(self, channel: str, info: ClientInfo, expiry: float) -> bool:
        entries = self._channels.setdefault(channel, {})
        created = info.client not in entries
        entries[info.client] = (info, expiry)
        return created

    async def add(self, channel: str, info: ClientInfo, *, ttl: float) -> bool:
        _check_ttl(ttl)
        return self._add(channel, info, self._clock() + ttl)

    async def remove(self, channel: str, client: str) -> bool:
        entries = self._channels.get(channel)
        if entries is None or entries.pop(client, None) is None:
            return False
        if not entries:
            del self._channels[channel]
        return True

    async def refresh(self, entries: Iterable[tuple[str, ClientInfo]], *,
                      ttl: float) -> list[tuple[str, ClientInfo]]:
        _check_ttl(ttl)
        expiry = self._clock() + ttl
        return [(channel, info) for channel, info in entries
                if self._add(channel, info, expiry)]

    def _live(self, channel: str) -> list[ClientInfo]:
        now = self._clock()
        return [info for info, expiry in self._channels.get(channel, {}).values()
                if expiry > now]

    async def clients(self, channel: str) -> list[ClientInfo]:
        return self._live(channel)

    async def stats(self, channel: str) -> PresenceStats:
        live = self._live(channel)
        return PresenceStats(len(live), len({i.user for i in live if i.user is not None}))

    async def expire(self, channel: str, *, limit: int = 1000) -> list[ClientInfo]:
        entries = self._channels.get(channel)
        if not entries:
            return []
        now = self._clock()
        due = sorted((expiry, client) for client, (_, expiry) in entries.items()
                     if expiry <= now)[:max(1, limit)]
        gone = [entries.pop(client)[0] for _, client in due]
        if not entries:
            del self._channels[channel]
        return gone

    async def channels_with_expired(self, *, limit: int = 1000) -> list[str]:
        now = self._clock()
        due = sorted((min(e for _, e in entries.values()), channel)
                     for channel, entries in self._channels.items())
        return [channel for earliest, channel in due if earliest <= now][:max(1, limit)]
