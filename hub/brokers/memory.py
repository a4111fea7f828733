"""The embedded in-process broker: the default when no Redis URL is given.

It reaches only its own process, so it suits one process on a bare machine (development, tests,
small deployments). It is always connected once started and never loses a message.
"""

from __future__ import annotations

import asyncio

from .base import Broker, Publication

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    """A broker that hands each publish to its handler on the next loop iteration.

    Delivery is deferred with ``loop.call_soon`` (never inline), so a publisher's ack and the
    delivery are ordered as they would be through Redis, and publish order is kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._subscribed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        handler = self.handler
        self._loop = asyncio.get_running_loop()
        handler.on_state(True)

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
        self._loop.call_soon(self._deliver, Publication(channel, payload))
        return 1

    async def publish_presence(self, channel: str, payload: bytes) -> int:
        if channel not in self._subscribed:
            return 0
        assert self._loop is not None, "start() first"
        self._loop.call_soon(self._deliver, Publication(channel, payload, presence=True))
        return 1

    def inject(self, publication: Publication) -> None:
        """Deliver ``publication`` (a history publication with its offset, from
        :class:`hub.history.MemoryHistory`'s ``on_publish``) as a publish would: on the next
        loop iteration, if the channel is subscribed."""
        if publication.channel in self._subscribed and self._loop is not None:
            self._loop.call_soon(self._deliver, publication)

    def _deliver(self, publication: Publication) -> None:
        if publication.channel in self._subscribed:
            self.handler.on_publication(publication)
