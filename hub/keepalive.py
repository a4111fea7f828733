"""The keepalive of one hub process: every open connection pinged every ``--ping-interval``
seconds from one timer, in batches, and failed with 1011 when its pong does not come back.

websockets' own keepalive runs one task per connection (a sleep, a ping future, a timeout
scope: about 75 us of CPU per ping and 1.6 KiB per connection on the benchmark machine,
docs/benchmarks.md "100,000 connections"). Here the process's connections are spread over
``slices`` sets; one timer visits one set every ``interval / slices`` seconds, so each
connection is visited once per ``interval``. A visit either

* finds the ping of the previous visit unanswered (no pong frame since; any pong counts, as
  a peer that sends frames is alive): the connection is failed with close code 1011, reason
  ``"keepalive ping timeout"`` (:meth:`hub.connection.HubConnection.keepalive_timeout`,
  exactly what websockets' keepalive does), or
* sends it a new ping: one ping frame, serialized once per visit, written to every
  connection of the set (:func:`hub.connection.ping`).

A connection joins the slice visited last when its opening handshake has succeeded (where
websockets would start its keepalive task), so its first ping goes out about ``interval``
seconds later, and a silent peer is closed between ``interval`` and ``2 x interval`` (plus
one slice, ``interval / slices`` s) after its last pong; the library's keepalive, with
``ping_timeout`` equal to ``ping_interval``, closed it at ``2 x interval``. It leaves its
slice at ``connection_lost``. No I/O beyond the transports' writes; no task per connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from .connection import HubConnection, ping

__all__ = ["Keepalive"]

logger = logging.getLogger("hub.keepalive")

#: Seconds between two visits of the timer at most: a ping interval of 20 s is 20 slices.
MAX_TICK = 1.0
#: Slices at least, whatever the interval (a short one is still spread over the period).
MIN_SLICES = 4


class Keepalive:
    """Pings every registered connection every ``interval`` seconds (> 0) from one timer.

    ``slices`` (default: ``interval`` / :data:`MAX_TICK` rounded up, at least
    :data:`MIN_SLICES`) is how many batches one interval is cut into. ``clock`` returns
    seconds (``time.monotonic``). A connection failed for a missing pong is counted where
    the hub counts websockets' own closes (``hub_connections_closed_total{code="1011"}``,
    :meth:`hub.session.Sessions.forget`), since the close frame is the library's.
    Raises ValueError for an ``interval`` that is not a positive finite number.
    """

    def __init__(self, interval: float, *, slices: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"keepalive interval must be > 0 seconds, got {interval!r}")
        self.interval = interval
        count = slices if slices is not None else max(MIN_SLICES,
                                                      math.ceil(interval / MAX_TICK))
        self.slices: list[set[HubConnection]] = [set() for _ in range(max(1, count))]
        self.tick = interval / len(self.slices)
        self.clock = clock
        self._cursor = 0  # the slice the next tick visits
        self._round = 0  # the pings' payload: a counter, 4 bytes
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0
        #: Pings written and connections failed for a missing pong, since the start.
        self.pings_sent = 0
        self.timeouts = 0

    def __len__(self) -> int:
        """Connections registered."""
        return sum(len(s) for s in self.slices)

    # -- registration (called by HubConnection) ---------------------------------------------

    def add(self, conn: HubConnection) -> None:
        """Start pinging ``conn`` (its opening handshake succeeded): it joins the slice the
        timer visited last, so its first ping is due in about ``interval`` seconds."""
        index = (self._cursor - 1) % len(self.slices)
        conn.ping_slice = index
        conn.ping_sent = 0.0
        self.slices[index].add(conn)

    def discard(self, conn: HubConnection) -> None:
        """Stop pinging ``conn`` (its TCP connection is gone). Idempotent."""
        index = conn.ping_slice
        if index >= 0:
            conn.ping_slice = -1
            if index < len(self.slices):
                self.slices[index].discard(conn)

    # -- the timer ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the timer on the running loop (its first visit one tick from now)."""
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self.tick
            self._handle = loop.call_at(self._next, self._run)

    def stop(self) -> None:
        """Stop the timer; registered connections stay registered, unpinged. Idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.visit()
        except Exception:  # never let the keepalive die with one bad connection
            logger.exception("keepalive visit failed")
        self._next += self.tick
        now = loop.time()
        if self._next < now:  # the loop was blocked past a tick: no burst of catch-ups
            self._next = now + self.tick
        self._handle = loop.call_at(self._next, self._run)

    def visit(self) -> None:
        """One tick: visit the next slice (fail the connections whose last ping went
        unanswered, ping the others) and move the cursor on. Public for tests."""
        index = self._cursor
        self._cursor = (index + 1) % len(self.slices)
        members = self.slices[index]
        if not members:
            return
        now = self.clock()
        due: list[HubConnection] = []
        late: list[HubConnection] = []
        for conn in members:
            if not conn.is_open:  # closing: connection_lost will discard it
                continue
            if conn.ping_sent:
                late.append(conn)
            else:
                conn.ping_sent = now
                due.append(conn)
        if due:
            self._round = (self._round + 1) & 0xFFFFFFFF
            self.pings_sent += ping(due, self._round.to_bytes(4, "big"))
        for conn in late:
            self.timeouts += 1
            conn.keepalive_timeout()
