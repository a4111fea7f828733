"""The history interface, its value types and the history message format (a leaf module).

A *history* keeps, per channel, the last ``size`` publications for ``ttl`` seconds after the
channel's last publish, numbered by *offsets* 1, 2, 3... without holes within an *epoch* (see
:class:`~hub.brokers.base.StreamPosition`). The epoch is a string (lower-case hex, never a
``:``) that changes whenever the channel's metadata is lost (Redis restarted without
persistence, keys expired or flushed); offsets then start again from 1 in the new epoch.

The metadata (last offset, epoch) lives ``meta_ttl`` seconds after the last write (default 30
days), much longer than the stream of publications: when the stream expired but the metadata
did not, the next publish continues the offsets in the same epoch, and a reader positioned
before the lost publications learns that they are gone (``complete=False``).

Channel names here are hub names (``chat:room1``), never Redis keys. docs/history-format.md is
the contract of the Redis implementation.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

from ..brokers.base import Publication, StreamPosition

__all__ = [
    "IDEMPOTENCY_TTL",
    "META_TTL",
    "History",
    "HistoryRead",
    "format_history_message",
    "history_channel",
    "history_keys",
    "parse_history_message",
]

#: Seconds an idempotency key is remembered per channel.
IDEMPOTENCY_TTL = 300.0
#: Default seconds the metadata (offset, epoch) outlives the channel's last write: 30 days.
META_TTL = 30 * 24 * 3600.0

_MESSAGE_RE = re.compile(rb"([1-9][0-9]{0,18}):([0-9a-f]{1,64}):", re.DOTALL)
_NAME_RE = re.compile(r"[^{}]+")


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """The answer of :meth:`History.read`, taken atomically.

    ``position``: the channel's current top (offset of the last publish, 0 when none, and its
    epoch). ``publications``: oldest first, each with ``offset`` and ``epoch`` set.
    ``complete``: True when the read was given a ``since`` of the current epoch and every
    publication after ``since.offset`` is still held: the first of ``publications`` is
    ``since.offset + 1``, or nothing was published since. When more than ``limit``
    publications follow ``since``, ``complete`` is still True but only the first ``limit`` are
    returned (:attr:`more` tells; read again from the last one). Always False without
    ``since``.
    """

    position: StreamPosition
    publications: list[Publication] = field(default_factory=list)
    complete: bool = False

    @property
    def more(self) -> bool:
        """True when publications newer than the returned ones exist (``limit`` cut them)."""
        last = self.publications[-1].offset if self.publications else None
        return last is not None and last < self.position.offset


class History(abc.ABC):
    """Per-channel publication history. Every method is a coroutine and atomic per channel.

    ``size`` is a number of publications (at least 1), ``ttl`` and every other duration are
    seconds (float; ``ttl <= 0``: the stream never expires). The store trims to the ``size``
    it is given on each publish, so when publishers disagree, the last publisher's size wins.
    """

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes, *, size: int, ttl: float,
                      idempotency_key: str | None = None) -> StreamPosition:
        """Append ``payload`` to ``channel``'s history and deliver it; return its position.

        Atomically: the next offset (1 after a new epoch, no holes), the append (the stream then
        holds exactly the last ``size``), the stream's expiry ``ttl`` seconds from now, the
        metadata's expiry, and the delivery of the history message (Redis: on
        :func:`history_channel`). With an ``idempotency_key`` already used on this channel in
        the last :data:`IDEMPOTENCY_TTL` seconds, nothing is appended or delivered and the
        first publish's position is returned. Raises :class:`ValueError` for ``size < 1``.
        """

    @abc.abstractmethod
    async def position(self, channel: str, *, ttl: float) -> StreamPosition:
        """The current top of ``channel`` (offset 0 when nothing was published).

        Creates the epoch when the channel has no metadata, so that the position handed to a
        subscriber is recoverable later; refreshes the metadata's expiry (the longer of
        ``ttl`` and the store's ``meta_ttl``).
        """

    @abc.abstractmethod
    async def read(self, channel: str, *, since: StreamPosition | None, limit: int,
                   ttl: float = 0.0) -> HistoryRead:
        """The current position and publications of ``channel``, in one atomic step.

        With ``since`` of the current epoch, at or below the top: the first ``limit``
        publications after ``since.offset`` (for recovery) and ``complete`` as described in
        :class:`HistoryRead`. Without ``since``, or with one of another epoch or beyond the
        top: the ``limit`` most recent publications, ``complete=False``. ``limit >= 0``
        (0: position and ``complete`` only). Creates the epoch like :meth:`position`
        (``ttl`` as there). Raises :class:`ValueError` for ``limit < 0``.
        """

    @abc.abstractmethod
    async def new_epoch(self, channel: str, expected: str, *, ttl: float) -> StreamPosition:
        """Retire epoch ``expected`` of ``channel`` if it is still the current one: a new
        epoch begins at offset 0 and the stream is dropped (a hub saw offsets reused: Redis
        came back with fewer messages). Returns the current position either way."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the store (Redis: load the function library, never downgrading it).
        Never raises for an unreachable Redis: the library is loaded again on first use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds (the Redis store does not own its client)."""


def history_keys(key: str) -> tuple[str, str, str]:
    """``(metadata hash, stream, idempotency key prefix)`` of the declared key ``key``
    (``<prefix><channel>``): ``{key}:m``, ``{key}:s``, ``{key}:i:``. Raises ValueError when
    ``key`` contains a brace (it would break the hash tag)."""
    base = _base(key)
    return base + ":m", base + ":s", base + ":i:"


def history_channel(key: str) -> str:
    """The pub/sub channel of ``key``'s history messages: ``{<prefix><channel>}:h``.

    It starts with ``{``, which no ordinary hub channel (``<prefix><channel>``, the prefix
    having no brace) does, and it hashes to the slot of ``key`` (Redis Cluster)."""
    return _base(key) + ":h"


def _base(key: str) -> str:
    if not _NAME_RE.fullmatch(key):
        raise ValueError(f"a history key must be non-empty and brace-free: {key!r}")
    return "{" + key + "}"


def format_history_message(offset: int, epoch: str, payload: bytes) -> bytes:
    """``<offset>:<epoch>:<payload bytes>`` (offset in decimal, epoch as given)."""
    return b"%d:%s:%s" % (offset, epoch.encode(), payload)


def parse_history_message(redis_channel: str | bytes, data: bytes, *,
                          prefix: str) -> Publication:
    """The publication carried by the history message ``data`` received on ``redis_channel``.

    ``redis_channel`` must be ``{<prefix><channel>}:h`` and ``data``
    ``<offset>:<epoch>:<payload>`` with an offset from 1 and a lower-case hex epoch; anything
    else raises :class:`ValueError`, so a plain PUBLISH to the ordinary channel
    ``<prefix><channel>`` can never be taken for a history message.
    """
    name = redis_channel.decode() if isinstance(redis_channel, bytes) else redis_channel
    head = "{" + prefix
    if not (name.startswith(head) and name.endswith("}:h")) or len(name) <= len(head) + 3:
        raise ValueError(f"not a history channel of prefix {prefix!r}: {name!r}")
    channel = name[len(head):-3]
    if not _NAME_RE.fullmatch(channel):
        raise ValueError(f"not a history channel of prefix {prefix!r}: {name!r}")
    match = _MESSAGE_RE.match(data)
    if match is None:
        raise ValueError("not a history message: expected <offset>:<epoch>:<payload>")
    return Publication(channel=channel, payload=data[match.end():],
                       offset=int(match.group(1)), epoch=match.group(2).decode())
