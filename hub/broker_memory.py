"""The embedded in-process broker: the default when no Redis URL is given.

It reaches only its own process, so it suits one process on a bare machine (development, tests,
small deployments). It is always connected and never loses a message.
"""

from __future__ import annotations

import asyncio

from .broker import Broker

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    """A broker that hands each publish to ``on_message`` on the next loop iteration.

    Delivery is deferred with ``loop.call_soon`` (never inline), so a publisher's ack and the
    delivery are ordered as they would be through Redis, and publish order is kept.
    """

    def __init__(self, on_message, on_gap) -> None:
        super().__init__(on_message, on_gap)
        self._subscribed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self._subscribed.clear()

    @property
    def connected(self) -> bool:
        return self._loop is not None

    async def subscribe(self, channel: str, timeout: float) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def is_live(self, channel: str) -> bool:
        return channel in self._subscribed

    async def publish(self, channel: str, payload: bytes) -> int:
        if channel not in self._subscribed:
            return 0
        assert self._loop is not None, "start() first"
        self._loop.call_soon(self._deliver, channel, payload)
        return 1

    def _deliver(self, channel: str, payload: bytes) -> None:
        if channel in self._subscribed:
            self.on_message(channel, payload)
