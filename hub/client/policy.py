"""When and how soon the client reconnects: the close-code policy and the backoff (pure).

The policy (docs/clients.md has the table):

* reconnect with backoff: no close frame (network loss, 1006), 1001, 1011, 1012, 1013,
  4005, 4008, and close codes below 4000 not named below (1000, 1014 ...); a handshake that
  failed without an HTTP answer, HTTP 500, 502, 504;
* reconnect after a longer backoff (x4 the delay, still capped): 4009, 4029, HTTP 429, 503;
* 4001 (token expired): get a fresh token and reconnect; with no ``get_token``: stop;
* stop: HTTP 401 and 403 (:class:`AuthenticationFailed`), any other HTTP status, 4002
  (:class:`AuthenticationFailed`), 4003, 4006, 1002, 1007, 1008, 1009, and every other code
  of 4000-4999.

The backoff: the n-th attempt in a row (n from 0) after a failure waits a random time in
``[0, min(max_delay, min_delay * 2**n)]`` (full jitter), ``min_delay`` 0.25 s, ``max_delay``
10 s; a longer one draws from ``[0, min(max_delay, 4 * min_delay * 2**n)]``. A connection
that stayed up ``reset_after`` seconds (10) resets n to 0.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Action", "Backoff", "for_close_code", "for_status"]


class Action(enum.Enum):
    """What the client does after a connection ended (or an attempt failed)."""

    RECONNECT = "reconnect"            # after the backoff
    RECONNECT_SLOW = "reconnect_slow"  # after the longer backoff
    REFRESH_TOKEN = "refresh_token"    # get a fresh token, then reconnect (4001)
    STOP = "stop"                      # raise ConnectionStopped / AuthenticationFailed


_RECONNECT = frozenset({1001, 1006, 1011, 1012, 1013, 4005, 4008})
_SLOW = frozenset({4009, 4029})
_STOP = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


def for_close_code(code: int | None) -> Action:
    """The action for a connection that closed with ``code`` (None: no close frame, as
    1006). Never raises."""
    if code is None or code in _RECONNECT:
        return Action.RECONNECT
    if code in _SLOW:
        return Action.RECONNECT_SLOW
    if code == 4001:
        return Action.REFRESH_TOKEN
    if code in _STOP or 4000 <= code <= 4999:
        return Action.STOP
    return Action.RECONNECT  # 1000, 1014 ... and codes outside the ranges the hub uses


def for_status(status: int) -> Action:
    """The action for a handshake the hub answered with HTTP ``status`` instead of 101."""
    if status in (429, 503):
        return Action.RECONNECT_SLOW
    if status in (500, 502, 504):
        return Action.RECONNECT
    return Action.STOP  # 400, 401, 403, 404, 426, ...


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter.

    ``min_delay`` and ``max_delay`` are seconds (> 0, ``min_delay <= max_delay``);
    ``slow_factor`` multiplies the ceiling of a longer backoff; ``reset_after`` is how many
    seconds a connection must stay up to reset the attempt count; ``rng`` returns a float in
    [0, 1) (injectable for tests). Raises ValueError for bad figures.
    """

    min_delay: float = 0.25
    max_delay: float = 10.0
    slow_factor: float = 4.0
    reset_after: float = 10.0
    rng: Callable[[], float] = field(default=random.random, repr=False)
    attempts: int = 0  # failures in a row so far

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay:
            raise ValueError("backoff needs 0 < min_delay <= max_delay")
        if self.slow_factor < 1 or self.reset_after < 0:
            raise ValueError("backoff needs slow_factor >= 1 and reset_after >= 0")

    def ceiling(self, slow: bool = False) -> float:
        """The largest delay the next :meth:`next_delay` may return, in seconds."""
        base = self.min_delay * 2.0 ** min(self.attempts, 64)
        if slow:
            base *= self.slow_factor
        return min(self.max_delay, base)

    def next_delay(self, slow: bool = False) -> float:
        """Seconds to wait before the next attempt (uniform in ``[0, ceiling(slow)]``), and
        count one more failure."""
        delay = self.rng() * self.ceiling(slow)
        self.attempts += 1
        return delay

    def connected_for(self, seconds: float) -> None:
        """A connection ended after ``seconds`` up: reset the count if that is at least
        ``reset_after``."""
        if seconds >= self.reset_after:
            self.attempts = 0
