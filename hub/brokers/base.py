"""The broker interface, the handler it reports to, and their value types (a leaf module).

A broker carries messages between hub processes. Its delivery guarantee is **at most once**:
a message published while the broker link is down, or before a subscription is confirmed,
may be lost; the broker then reports the affected channels to :meth:`BrokerHandler.on_gap`
once the link is back. It never delivers a message twice and keeps the publish order of one
publisher on one channel.

Binding: a broker is built unbound (by :func:`hub.brokers.create_broker` or by hand), then
bound **once** to its handler with :meth:`Broker.bind`, before :meth:`Broker.start`. The node
does this in its constructor (``Node(broker)`` calls ``broker.bind(node)``). A composite broker
(:class:`hub.brokers.sharded.ShardedBroker`) binds its children in its own :meth:`Broker.bind`,
so they report to the same handler. Binding twice raises :class:`RuntimeError`, and so does
starting an unbound broker.

Channel names here are hub names (``news``), never Redis keys (``hub:news``).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Broker", "BrokerHandler", "Publication", "StreamPosition", "batch_handler"]

logger = logging.getLogger("hub.broker")


@dataclass(frozen=True, slots=True)
class Publication:
    """One message as a broker hands it over.

    ``channel`` is the hub channel name; ``payload`` the raw bytes as published (the node checks
    nothing and decodes nothing of it). ``offset`` and ``epoch`` place the publication in the
    channel's history stream (see :class:`StreamPosition`); None: not a history publication.
    ``presence``: True for a presence event of the channel (a join or a leave, received on
    the channel's reserved presence channel, never on its ordinary one; the payload is the
    event of docs/protocol.md section 6), not a message.
    """

    channel: str
    payload: bytes
    offset: int | None = None
    epoch: str | None = None
    presence: bool = False


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A place in a channel's history: ``offset`` counts publications from 1 within ``epoch``,
    an opaque name that changes when the history is lost and the offsets start again."""

    offset: int
    epoch: str


class BrokerHandler(Protocol):
    """What a broker reports to (the node implements it).

    Every method is called from the broker's own task or loop callback, synchronously: it must
    not block, must not await anything and should not raise (an exception from
    :meth:`on_publication` is logged and the message dropped; one from the other two methods
    may cost the link, which is then rebuilt).
    """

    def on_publication(self, publication: Publication) -> None:
        """A message published to a channel this broker is subscribed to."""

    # Optional (see batch_handler): ``on_publications(publications: list[Publication]) ->
    # None``, several messages that reached the broker together (a burst: the Redis link's
    # reader had them all at hand at once), in order. It must handle each as
    # on_publication would; a handler without it gets one on_publication call per message.

    def on_gap(self, channels: list[str]) -> None:
        """Messages of ``channels`` may have been lost in an outage that is now over."""

    def on_state(self, connected: bool) -> None:
        """The link state changed; ``connected`` is the broker's :attr:`Broker.connected`.

        Called after :attr:`Broker.reconnects` is counted up, when :attr:`Broker.connected`
        changes and (for a composite) when the state of one of its parts changes.
        """


class Broker(abc.ABC):
    """Moves messages between hub processes; see the module docstring for the guarantee."""

    def __init__(self) -> None:
        self._handler: BrokerHandler | None = None

    def bind(self, handler: BrokerHandler) -> None:
        """Report to ``handler`` from now on. Call it once, before :meth:`start`.

        Raises :class:`RuntimeError` if the broker is already bound.
        """
        if self._handler is not None:
            raise RuntimeError(f"{type(self).__name__} is already bound to a handler")
        self._handler = handler

    @property
    def handler(self) -> BrokerHandler:
        """The bound handler. Raises :class:`RuntimeError` before :meth:`bind`."""
        if self._handler is None:
            raise RuntimeError(f"{type(self).__name__}: bind() a handler before start()")
        return self._handler

    @abc.abstractmethod
    async def start(self) -> None:
        """Start connecting. Returns at once; :attr:`connected` tells when the link is up.

        Raises :class:`RuntimeError` if no handler is bound.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close every link. The broker cannot be restarted."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the broker can subscribe and publish (drives ``/readyz``)."""

    @property
    def reconnects(self) -> int:
        """How many times a lost link was confirmed again (``hub_broker_reconnects_total``).
        0 for a broker without a link to lose."""
        return 0

    @property
    def connect_attempts(self) -> int:
        """How many times a link was (re)built, successfully or not
        (``hub_broker_connect_attempts_total``). 0 for a broker without a link."""
        return 0

    @property
    def lag(self) -> float:
        """Seconds the delivery of broker messages lags behind the broker: the age of the
        oldest message not yet handed to the handler, as last measured
        (``hub_broker_lag_seconds``). 0.0 for a broker that delivers synchronously, and
        while not connected."""
        return 0.0

    @abc.abstractmethod
    def is_live(self, channel: str) -> bool:
        """True if ``channel`` is confirmed subscribed on the current link."""

    @abc.abstractmethod
    async def subscribe(self, channel: str, timeout: float) -> None:
        """Return once messages published to ``channel`` from now on reach the handler.

        Idempotent. Raises :class:`hub.exceptions.BrokerUnavailable` if that is not confirmed
        within ``timeout`` seconds; the channel then stays wanted and is subscribed when the
        link comes back, unless :meth:`unsubscribe` is called.
        """

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``. Idempotent; never raises for a lost link."""

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish ``payload`` to ``channel``; return the number of hub processes reached.

        Raises :class:`hub.exceptions.BrokerUnavailable` if the broker cannot take it.
        """

    async def publish_presence(self, channel: str, payload: bytes) -> int:
        """Publish the presence event ``payload`` (a join or a leave) of ``channel`` on its
        reserved presence channel (Redis: ``{<prefix><channel>}:j``): the handlers of the
        processes subscribed to ``channel`` get it as a :class:`Publication` with
        ``presence=True``. Raises :class:`hub.exceptions.BrokerUnavailable` as
        :meth:`publish` does (and :class:`NotImplementedError` for a broker without it)."""
        raise NotImplementedError(f"{type(self).__name__} carries no presence events")


def batch_handler(handler: BrokerHandler) -> Callable[[list[Publication]], None]:
    """The function a broker hands a burst of publications to (a list, in arrival order,
    usually of more than one): the handler's optional ``on_publications`` (the node's
    coalesces the writes, :meth:`hub.node.Node.on_publications`), or, for a handler without
    one, a loop over its ``on_publication``. Never raises itself."""
    many: Callable[[list[Publication]], None] | None = getattr(handler, "on_publications",
                                                               None)
    if many is not None:
        return many
    one = handler.on_publication

    def each(publications: list[Publication]) -> None:
        for publication in publications:
            try:
                one(publication)
            except Exception:  # as a single message's: logged, that one dropped
                logger.exception("delivery failed on %r", publication.channel)

    return each
