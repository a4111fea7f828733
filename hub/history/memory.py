"""The in-process history: the semantics of the Redis one, for the embedded broker and tests."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..brokers.base import Publication, StreamPosition
from .base import IDEMPOTENCY_TTL, META_TTL, History, HistoryRead

__all__ = ["MemoryHistory"]


@dataclass(slots=True)
class _Channel:
    epoch: str
    offset: int = 0
    meta_deadline: float = 0.0
    stream: deque[tuple[int, bytes]] = field(default_factory=deque)
    stream_deadline: float | None = None  # None: never expires
    seen: dict[str, tuple[float, StreamPosition]] = field(default_factory=dict)


class MemoryHistory(History):
    """History in this process's memory; nothing survives the process.

    ``on_publish`` receives every new publication (with offset and epoch) synchronously inside
    :meth:`publish`, the counterpart of the Redis store's PUBLISH on the history channel (the
    memory broker's ``publish`` is the natural target). ``meta_ttl`` as in
    :class:`~hub.history.redis.RedisHistory`; ``clock`` (seconds, monotonic) is for tests.
    """

    def __init__(self, *, meta_ttl: float = META_TTL,
                 on_publish: Callable[[Publication], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.meta_ttl = meta_ttl
        self.on_publish = on_publish
        self._clock = clock
        self._channels: dict[str, _Channel] = {}

    def clear(self) -> None:
        """Forget everything, as a Redis FLUSHALL or a restart without persistence does."""
        self._channels.clear()

    def _meta(self, channel: str, ttl: float, now: float) -> _Channel:
        state = self._channels.get(channel)
        if state is None or state.meta_deadline <= now:
            state = _Channel(epoch=secrets.token_hex(10))
            self._channels[channel] = state
        if state.stream_deadline is not None and state.stream_deadline <= now:
            state.stream.clear()
            state.stream_deadline = None
        state.meta_deadline = now + max(self.meta_ttl, ttl)
        return state

    async def publish(self, channel: str, payload: bytes, *, size: int, ttl: float,
                      idempotency_key: str | None = None) -> StreamPosition:
        if size < 1:
            raise ValueError("history size must be at least 1")
        now = self._clock()
        existing = self._channels.get(channel)
        if idempotency_key and existing is not None and existing.meta_deadline > now:
            seen = existing.seen.get(idempotency_key)
            if seen is not None and seen[0] > now:
                return seen[1]
        state = self._meta(channel, ttl, now)
        state.offset += 1
        state.stream.append((state.offset, payload))
        while len(state.stream) > size:
            state.stream.popleft()
        state.stream_deadline = now + ttl if ttl > 0 else None
        position = StreamPosition(state.offset, state.epoch)
        if idempotency_key:
            state.seen = {k: v for k, v in state.seen.items() if v[0] > now}
            state.seen[idempotency_key] = (now + IDEMPOTENCY_TTL, position)
        if self.on_publish is not None:
            self.on_publish(Publication(channel, payload, state.offset, state.epoch))
        return position

    async def position(self, channel: str, *, ttl: float) -> StreamPosition:
        state = self._meta(channel, ttl, self._clock())
        return StreamPosition(state.offset, state.epoch)

    async def new_epoch(self, channel: str, expected: str, *, ttl: float) -> StreamPosition:
        state = self._channels.get(channel)
        if state is not None and state.epoch == expected:
            del self._channels[channel]
        state = self._meta(channel, ttl, self._clock())
        return StreamPosition(state.offset, state.epoch)

    async def read(self, channel: str, *, since: StreamPosition | None, limit: int,
                   ttl: float = 0.0) -> HistoryRead:
        if limit < 0:
            raise ValueError("limit must be at least 0")
        state = self._meta(channel, ttl, self._clock())
        top = StreamPosition(state.offset, state.epoch)

        def pubs(entries: list[tuple[int, bytes]]) -> list[Publication]:
            return [Publication(channel, data, offset, state.epoch) for offset, data in entries]

        if since is not None and since.epoch == state.epoch and since.offset <= state.offset:
            if since.offset == state.offset:
                return HistoryRead(top, [], True)
            after = [entry for entry in state.stream if entry[0] > since.offset]
            complete = bool(after) and after[0][0] == since.offset + 1
            return HistoryRead(top, pubs(after[:limit]), complete)
        recent = list(state.stream)[-limit:] if limit else []
        return HistoryRead(top, pubs(recent), False)
