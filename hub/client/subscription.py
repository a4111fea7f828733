"""One subscription of the client: its inbox, its position in a history channel, and the
iterator the application reads (the rules that keep messages in order and once).

Position (history channels): the offset of the last message delivered and the epoch. A
message at or below that offset is a duplicate (a replay after a reconnect, the personal
channel's live copy) and is dropped. A resubscribe after a reconnect sends ``since`` that
position. An ack with ``recovered:false`` or a ``gap`` frame puts a :class:`Gap` in the inbox,
in the place of the lost messages; the iterator raises it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from .errors import ClientClosed, Gap
from .frames import Ack, GapFrame, Message, PresenceEvent, StreamPosition

__all__ = ["Inbox", "Subscription"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded FIFO with one end: :meth:`put` waits while ``maxsize`` items are queued
    (backpressure on the reader), :meth:`put_now` never waits (control items), :meth:`end`
    makes :meth:`get` raise ``error`` (StopAsyncIteration by default) once the queue is empty,
    and StopAsyncIteration after that."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._changed = asyncio.Event()
        self._end: BaseException | None = None
        self._raised = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ended(self) -> bool:
        """True once :meth:`end` was called."""
        return self._end is not None

    async def put(self, item: T) -> None:
        """Append ``item``, waiting for room; dropped if the inbox has ended."""
        while len(self._items) >= self._maxsize and self._end is None:
            self._changed.clear()
            await self._changed.wait()
        self.put_now(item)

    def put_now(self, item: T) -> None:
        """Append ``item`` now, past the bound; dropped if the inbox has ended."""
        if self._end is None:
            self._items.append(item)
            self._changed.set()

    def end(self, error: BaseException | None = None, *, drop: bool = False) -> None:
        """End the inbox: :meth:`get` returns what is queued (nothing with ``drop``), then
        raises ``error`` (or StopAsyncIteration). Only the first call counts."""
        if self._end is not None:
            return
        self._end = error if error is not None else StopAsyncIteration()
        if drop:
            self._items.clear()
        self._changed.set()

    async def get(self) -> T:
        """The next item; raises the end's error once, then StopAsyncIteration."""
        while not self._items:
            if self._end is not None:
                if self._raised or isinstance(self._end, StopAsyncIteration):
                    raise StopAsyncIteration
                self._raised = True
                raise self._end
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        self._changed.set()
        return item


#: What a subscription's iterator yields.
Item = Message | PresenceEvent


class Subscription:
    """A subscription to ``channel``; iterate it with ``async for message in sub``.

    The iterator yields :class:`~hub.client.frames.Message` (``.channel``, ``.data``,
    ``.offset``, ``.from_``) and, on presence channels with ``join_leave``,
    :class:`~hub.client.frames.PresenceEvent` items, in the order the hub sent them. It
    raises :class:`~hub.client.errors.Gap` where messages were lost (iterate again to go
    on), :class:`~hub.client.errors.Unsubscribed` when the server ended the subscription,
    the client's :class:`~hub.client.errors.ConnectionStopped` when the client stopped; it
    ends (StopAsyncIteration) after :meth:`unsubscribe` or the client's ``close()``.

    ``server`` is True for a subscription the server made (a ``subscribed`` frame);
    ``position`` is the last delivered :class:`StreamPosition` on a history channel (None
    before the first ack or on a channel without history). Made by the client only.
    """

    def __init__(self, channel: str, *, last: int | None = None,
                 since: StreamPosition | None = None, server: bool = False,
                 max_queue: int = 1024,
                 unsubscribe: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.channel = channel
        self.server = server
        self.position: StreamPosition | None = since
        self._last = last
        self._acked = False
        self._inbox: Inbox[Item | Gap] = Inbox(max_queue)
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsubscribe = unsubscribe

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} position={self.position}>"

    # -- the application's side -----------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        item = await self._inbox.get()
        if isinstance(item, Gap):
            raise item
        return item

    @property
    def acked(self) -> bool:
        """True once the hub acked a subscribe of it (or the server made it)."""
        return self._acked

    @property
    def active(self) -> bool:
        """True until the subscription ended (unsubscribed, by either side, or the client
        closed or stopped)."""
        return not self._inbox.ended

    async def unsubscribe(self) -> None:
        """End this subscription (``client.unsubscribe(channel)``): the iterator stops at
        once; queued messages are dropped."""
        if self._unsubscribe is not None:
            await self._unsubscribe(self.channel)
        else:
            self.finish(drop=True)

    # -- the client's side ----------------------------------------------------------------

    def subscribe_fields(self) -> dict[str, object]:
        """``since`` and ``last`` of the next subscribe frame: ``since`` the position once
        known (or the one given), ``last`` only until the first ack."""
        return {"since": self.position, "last": None if self._acked else self._last}

    def on_ack(self, ack: Ack, since: StreamPosition | None) -> Gap | None:
        """Apply the ack of a subscribe that sent ``since``: set the position, and return
        the :class:`Gap` to report when recovery failed."""
        first = not self._acked
        self._acked = True
        if not self._ready.done():
            self._ready.set_result(None)
        if ack.epoch is None or ack.offset is None:
            return None  # a channel without history
        gap = None
        if since is not None and ack.recovered is False:
            gap = Gap(self.channel, "not_recovered", since.offset + 1, None, ack.epoch)
            if ack.epoch != since.epoch:  # nothing is replayed: go on from the ack
                self.position = StreamPosition(ack.offset, ack.epoch)
            # same epoch: what the history still holds after since follows
        elif since is None:
            floor = ack.offset - (self._last or 0) if first else ack.offset
            self.position = StreamPosition(max(floor, 0), ack.epoch)
        return gap

    def on_subscribed(self, offset: int | None, epoch: str | None) -> None:
        """The server made this subscription at ``offset``/``epoch``: live messages follow."""
        self._acked = True
        if offset is not None and epoch is not None:
            self.position = StreamPosition(offset, epoch)
        if not self._ready.done():
            self._ready.set_result(None)

    def accept(self, message: Message) -> bool:
        """Whether ``message`` is new (then the position moves to it) or a duplicate."""
        if message.offset is None:
            return True
        pos = self.position
        if pos is not None:
            if message.offset <= pos.offset:
                return False
            self.position = StreamPosition(message.offset, pos.epoch)
        return True

    def on_gap(self, frame: GapFrame) -> Gap:
        """The :class:`Gap` of a ``gap`` frame naming this channel; a new epoch restarts
        the offsets (the hub sends the gap before the new epoch's messages)."""
        pos = self.position
        if frame.epoch is not None:
            if pos is None or pos.epoch != frame.epoch:
                self.position = StreamPosition(0, frame.epoch)
            elif frame.to is not None and frame.to > pos.offset:
                self.position = StreamPosition(frame.to, pos.epoch)
        return Gap(self.channel, "gap", frame.from_, frame.to, frame.epoch)

    def fail(self, error: BaseException) -> None:
        """A subscribe the hub refused before its first ack: ``subscribe()`` raises it."""
        if not self._ready.done():
            self._ready.set_exception(error)
        self._inbox.end(error, drop=True)

    def finish(self, error: BaseException | None = None, *, drop: bool = False) -> None:
        """End the iterator: with ``error`` raised after the queued items (None: it just
        stops); ``drop`` discards them."""
        if not self._ready.done():
            self._ready.set_exception(
                error or ClientClosed("the subscription ended before its ack"))
            self._ready.exception()  # retrieved: no "never retrieved" warning
        self._inbox.end(error, drop=drop)

    async def deliver(self, item: Item | Gap) -> None:
        """Queue an item for the iterator, waiting while the inbox is full."""
        await self._inbox.put(item)

    def deliver_now(self, item: Item | Gap) -> None:
        """Queue an item now (a Gap that must come before the messages that follow)."""
        self._inbox.put_now(item)

    async def wait_ready(self) -> None:
        """Until the first ack; raises the error of a refused subscribe."""
        await asyncio.shield(self._ready)
