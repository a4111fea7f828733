"""What the operating system grants one hub process: its file-descriptor limit, and the
event loop's failed ``accept()`` calls when that limit is reached anyway.

Every connection, open or still in its opening handshake, holds one file descriptor. A process
whose ``RLIMIT_NOFILE`` is below ``--max-connections`` plus ``--max-pending-handshakes``
would run out before its own limits apply: ``accept()`` then fails (EMFILE) and legitimate
clients and probes are starved. So at start the soft limit is raised to the hard one
(:func:`raise_fd_limit`), and a hub that would still not have enough refuses to start.

asyncio reports each failed ``accept()`` through the loop's exception handler, one ERROR with
a traceback per failure (hundreds of thousands of lines a minute under a flood); the
:class:`AcceptErrors` handler counts them in ``hub_accept_errors_total`` instead and logs one
line per :data:`ACCEPT_LOG_INTERVAL` at most.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from typing import Any

from prometheus_client import Counter

from .exceptions import ConfigError

__all__ = ["ACCEPT_LOG_INTERVAL", "FD_RESERVE", "AcceptErrors", "fds_needed", "raise_fd_limit"]

logger = logging.getLogger("hub.server")

#: File descriptors kept beyond the connections: the listening sockets, Redis links, log
#: files, and the up to 100 (the listen backlog) connections asyncio accepts in one loop
#: iteration before the hub aborts those past ``--max-pending-handshakes``.
FD_RESERVE = 128

#: Seconds between two log lines about failed ``accept()`` calls.
ACCEPT_LOG_INTERVAL = 10.0

_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def fds_needed(max_connections: int, max_pending_handshakes: int) -> int:
    """File descriptors one process needs at its limits: one per connection, open or in its
    handshake, plus :data:`FD_RESERVE`."""
    return max_connections + max_pending_handshakes + FD_RESERVE


def raise_fd_limit(need: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (no privilege needed;
    child processes inherit it) and return the soft limit now in force.

    Raises :class:`ConfigError` (one line, naming the limit and what to change) when the
    limit is below ``need`` file descriptors (:func:`fds_needed`).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit: ask for what is needed, not infinity (which Linux refuses
    # above fs.nr_open).
    target = max(soft, need) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ConfigError(
            f"the file-descriptor limit (RLIMIT_NOFILE) is {soft} (hard {hard}), below the "
            f"{need} that --max-connections + --max-pending-handshakes + {FD_RESERVE} need: "
            f"raise it (ulimit -n, LimitNOFILE=) or lower --max-connections")
    return soft


class AcceptErrors:
    """The event loop's exception handler: failed ``accept()`` calls are counted in
    ``counter`` and logged once per ``interval`` seconds at most (WARNING, with the count);
    every other context goes to the handler installed before, or the loop's default.

    Install it with :meth:`install` on the running loop.
    """

    def __init__(self, counter: Counter, interval: float = ACCEPT_LOG_INTERVAL) -> None:
        self.counter = counter
        self.interval = interval
        self.unlogged = 0
        self._next_log = 0.0
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    @staticmethod
    def is_accept_error(context: dict[str, Any]) -> bool:
        """True for asyncio's "socket.accept() out of system resource" report (and any
        other accept failure the loop reports with one of those errnos)."""
        exc = context.get("exception")
        message = str(context.get("message", ""))
        return "accept" in message and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not self.is_accept_error(context):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.counter.inc()
        self.unlogged += 1
        now = loop.time()
        if now >= self._next_log:
            exc = context["exception"]
            logger.warning("accept() failed %d time(s) since the last such line: %s; new "
                           "connections wait in the listen backlog (hub_accept_errors_total)",
                           self.unlogged, exc.strerror or exc)
            self.unlogged = 0
            self._next_log = now + self.interval
