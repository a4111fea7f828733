"""Recovery, pure: merge a history read with the live publications buffered meanwhile.

A subscriber that recovers (``since``) is subscribed to the live stream first, then reads the
history; publications arriving live meanwhile are buffered. :func:`merge` turns the client's
position, the read and the buffer into what to deliver: every offset after the client's, once
each, in order, or the first *hole* (an offset range that neither the read nor the buffer
holds). :class:`OffsetTracker` is the process-level check of one channel's live stream:
whether a publication is the next one, a duplicate, or comes after a gap to repair.

Offsets here belong to one epoch; the caller compares epochs first (a publication of another
epoch is no continuation of anything).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .brokers.base import Publication

__all__ = ["Accepted", "Hole", "Merge", "OffsetTracker", "merge"]


@dataclass(frozen=True, slots=True)
class Hole:
    """Offsets ``first`` to ``last`` (both included) are missing."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Merge:
    """The result of :func:`merge`.

    ``publications``: the contiguous run to deliver, from the client's offset + 1, ordered,
    without duplicates. ``offset``: the last offset of that run (the client's own when the run
    is empty). ``hole``: None when everything up to the newest known offset is in the run;
    else the first missing range, and ``later`` holds the known publications after it (ordered,
    deduplicated), for a caller that delivers despite the hole.
    """

    publications: list[Publication]
    offset: int
    hole: Hole | None = None
    later: list[Publication] = field(default_factory=list)


def merge(since: int, history: Iterable[Publication], top: int,
          live: Iterable[Publication]) -> Merge:
    """Merge for a client holding every offset up to ``since``.

    ``history``: a read's publications (any order is accepted, oldest first is usual); ``top``:
    the read's top offset (its ``position.offset``), which the run must reach; ``live``: the
    publications buffered meanwhile, in arrival order, possibly overlapping ``history``,
    repeated, or older than ``since``. The run ends at the newest of ``top`` and the live
    offsets. Raises :class:`ValueError` for a publication without an offset.
    """
    known: dict[int, Publication] = {}
    newest = top
    for source in (history, live):
        for publication in source:
            offset = publication.offset
            if offset is None:
                raise ValueError("a publication without an offset cannot be merged")
            newest = max(newest, offset)
            if offset > since:
                known.setdefault(offset, publication)
    run: list[Publication] = []
    offset = since
    while offset < newest:
        nxt = known.get(offset + 1)
        if nxt is None:
            after = sorted(o for o in known if o > offset)
            last = after[0] - 1 if after else newest
            return Merge(run, offset, Hole(offset + 1, last), [known[o] for o in after])
        run.append(nxt)
        offset += 1
    return Merge(run, offset)


#: What :meth:`OffsetTracker.accept` answers.
Accepted = Literal["deliver", "duplicate"] | tuple[Literal["gap"], int, int]


class OffsetTracker:
    """The last offset delivered on one channel (within one epoch).

    :meth:`accept` answers ``"deliver"`` for the next offset, ``"duplicate"`` for one at or
    below the last, and ``("gap", first_missing, last_missing)`` for one beyond the next:
    the caller repairs ``first_missing..last_missing`` from the history, then delivers this
    one. Both ``"deliver"`` and a gap move the tracker to the offset. ``last=None``: nothing
    seen yet, the first offset is delivered whatever it is.
    """

    __slots__ = ("last",)

    def __init__(self, last: int | None = None) -> None:
        self.last = last

    def accept(self, offset: int) -> Accepted:
        """Classify ``offset`` and move on past it (see the class docstring)."""
        last = self.last
        if last is not None and offset <= last:
            return "duplicate"
        self.last = offset
        if last is None or offset == last + 1:
            return "deliver"
        return ("gap", last + 1, offset - 1)

    def reset(self, last: int | None = None) -> None:
        """Start again from ``last`` (a new epoch, a recovery that moved the position)."""
        self.last = last
