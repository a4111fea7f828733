"""Local connections of one process, by channel and by user. No I/O.

The registry is the source of truth for which channels this process needs from the broker:
a channel is in :attr:`Registry.by_channel` exactly while at least one local connection is
subscribed to it. The node subscribes the broker on the first local subscriber and
unsubscribes it on the last (see :mod:`hub.node`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["Registry"]

C = TypeVar("C", bound=Hashable)


class Registry(Generic[C]):
    """Maps channel -> set of connections, connection -> set of channels, user -> connections.

    ``by_channel[channel]`` is the very set passed to the fan-out (``hub.node.fan_out``):
    never mutate it while a fan-out iterates it (the fan-out is synchronous, so any await
    point is safe).
    """

    def __init__(self) -> None:
        self.by_channel: dict[str, set[C]] = {}
        self.by_user: dict[str, set[C]] = {}
        self.channels_of: dict[C, set[str]] = {}

    def add_connection(self, conn: C, user: str | None) -> None:
        """Register ``conn`` (of ``user``, or anonymous when None) with no subscriptions."""
        self.channels_of.setdefault(conn, set())
        if user is not None:
            self.by_user.setdefault(user, set()).add(conn)

    def remove_connection(self, conn: C, user: str | None) -> list[str]:
        """Forget ``conn``; return the channels that now have no local subscriber."""
        emptied = []
        for channel in self.channels_of.pop(conn, ()):
            if self._discard(conn, channel):
                emptied.append(channel)
        if user is not None:
            conns = self.by_user.get(user)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.by_user[user]
        return emptied

    def subscribe(self, conn: C, channel: str) -> bool:
        """Subscribe ``conn`` to ``channel``. Returns False if it already was.

        Raises KeyError if ``conn`` was not added with :meth:`add_connection`.
        """
        channels = self.channels_of[conn]
        if channel in channels:
            return False
        channels.add(channel)
        self.by_channel.setdefault(channel, set()).add(conn)
        return True

    def unsubscribe(self, conn: C, channel: str) -> bool:
        """Unsubscribe ``conn``; returns True if ``channel`` now has no local subscriber."""
        channels = self.channels_of.get(conn)
        if channels is None or channel not in channels:
            return False
        channels.discard(channel)
        return self._discard(conn, channel)

    def _discard(self, conn: C, channel: str) -> bool:
        conns = self.by_channel.get(channel)
        if conns is None:
            return False
        conns.discard(conn)
        if not conns:
            del self.by_channel[channel]
            return True
        return False

    def subscribers(self, channel: str) -> set[C] | None:
        """The set of local subscribers of ``channel``, or None when there is none."""
        return self.by_channel.get(channel)

    def has_channel(self, channel: str) -> bool:
        return channel in self.by_channel

    def channels(self) -> Iterable[str]:
        """Every channel with at least one local subscriber."""
        return self.by_channel.keys()

    def connections(self) -> Iterable[C]:
        return self.channels_of.keys()

    def __len__(self) -> int:
        return len(self.channels_of)
