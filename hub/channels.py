"""Channel rules, pure: namespaces, personal and private channels, who may do what.

A channel's *namespace* is the part of its name before the first ``:`` (``chat:room1`` is in
``chat``; a name without ``:`` is in the default namespace ``""``). Two namespaces are
reserved and have fixed rules:

* ``user:<id>``, the *personal* channel of user ``<id>``: every authenticated connection of
  that user is subscribed to it from the handshake on, and no other connection may subscribe;
* ``private:<name>``: a connection may subscribe only when its token's ``channels`` claim
  grants the name (an exact name or a prefix ending in ``*``).

Everything else is public to subscribe. Clients publish only to channels matching
``--client-publish``. This module is the home of the per-namespace options that history and
presence add; docs/protocol.md section 3 is the contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .exceptions import ProtocolError

__all__ = [
    "PERSONAL_PREFIX",
    "PRIVATE_PREFIX",
    "RESERVED_PREFIXES",
    "ChannelRules",
    "NamespaceOptions",
    "channel_matches",
    "namespace_of",
    "personal_channel",
]

#: The namespace of personal channels, ``user:<id>``.
PERSONAL_PREFIX = "user:"
#: The namespace of channels granted by a token's ``channels`` claim.
PRIVATE_PREFIX = "private:"
#: Prefixes whose look-alikes in another letter case are refused (``User:alice``).
RESERVED_PREFIXES = (PERSONAL_PREFIX, PRIVATE_PREFIX)


def personal_channel(user_id: str) -> str:
    """The personal channel of ``user_id``: ``user:<id>``."""
    return PERSONAL_PREFIX + user_id


def namespace_of(channel: str) -> str:
    """The namespace of ``channel``: its name up to the first ``:`` (``chat:room1`` ->
    ``chat``, ``user:alice`` -> ``user``), or ``""`` when it has no ``:``."""
    namespace, sep, _ = channel.partition(":")
    return namespace if sep else ""


def channel_matches(channel: str, patterns: Sequence[str]) -> bool:
    """True if ``channel`` equals a pattern, or starts with a pattern ending in ``*`` minus it."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if channel.startswith(pattern[:-1]):
                return True
        elif channel == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class NamespaceOptions:
    """The options of the channels of one namespace (``[namespaces.<name>]`` in the
    configuration file, :mod:`hub.configfile`).

    ``history_size``: messages kept per channel (0: no history); ``history_ttl``: seconds the
    history lives after the channel's last publish. ``presence``: the hub keeps, per channel,
    who is subscribed (the ``presence`` and ``presence_stats`` ops); ``join_leave``: the
    subscribers also get a ``join``/``leave`` frame when a connection subscribes or leaves
    (needs ``presence``); ``presence_ttl``: seconds an entry of a process that stopped
    refreshing it (a dead process) lives (:mod:`hub.presences`).
    """

    history_size: int = 0
    history_ttl: float = 0.0
    presence: bool = False
    join_leave: bool = False
    presence_ttl: float = 60.0

    @property
    def history(self) -> bool:
        """True when the channels of this namespace keep a history."""
        return self.history_size > 0


#: The options of a reserved channel (``$...``): no history, no presence.
_RESERVED = NamespaceOptions()


class ChannelRules:
    """The channel rules of one hub process: permissions and per-namespace options.

    ``client_publish`` are the ``--client-publish`` patterns (exact names or prefixes ending
    in ``*``; ``*`` alone allows every channel, personal ones included). ``namespaces`` maps a
    namespace name to its options; ``defaults`` are the options of every other channel. The
    checks raise :class:`ProtocolError` ``forbidden`` carrying the command id ``cid``.
    """

    def __init__(self, client_publish: Sequence[str] = (),
                 namespaces: Mapping[str, NamespaceOptions] | None = None,
                 defaults: NamespaceOptions | None = None) -> None:
        self.client_publish = tuple(client_publish)
        self.namespaces = dict(namespaces or {})
        self.defaults = defaults or NamespaceOptions()

    def options(self, channel: str) -> NamespaceOptions:
        """The options of ``channel``: its namespace's, else the defaults; a reserved
        channel (``$...``: :mod:`hub.control`) keeps nothing."""
        if channel[:1] == "$":
            return _RESERVED
        return self.namespaces.get(namespace_of(channel), self.defaults)

    def keeps_history(self, channel: str) -> bool:
        """True when ``channel``'s namespace keeps a history."""
        return self.options(channel).history

    def keeps_presence(self, channel: str) -> bool:
        """True when ``channel``'s namespace keeps presence."""
        return self.options(channel).presence

    def join_leave(self, channel: str) -> bool:
        """True when ``channel``'s subscribers get join and leave frames."""
        options = self.options(channel)
        return options.presence and options.join_leave

    @property
    def any_presence(self) -> bool:
        """True when some channel may keep presence (a namespace or the defaults do)."""
        return self.defaults.presence or any(o.presence for o in self.namespaces.values())

    @property
    def any_history(self) -> bool:
        """True when some channel may keep a history (a namespace or the defaults do)."""
        return self.defaults.history or any(o.history for o in self.namespaces.values())

    def check_subscribe(self, user: str | None, grants: Sequence[str], channel: str,
                        cid: object = None) -> None:
        """Raise ``forbidden`` unless a connection of ``user`` (None: anonymous) whose token
        grants the private patterns ``grants`` may subscribe to ``channel``."""
        if channel.startswith(PERSONAL_PREFIX):
            if user is None or channel != personal_channel(user):
                raise ProtocolError("forbidden", "the personal channel of another user", cid)
        elif channel.startswith(PRIVATE_PREFIX) and not channel_matches(channel, grants):
            raise ProtocolError("forbidden", "the token does not grant this private "
                                "channel", cid)

    def check_publish(self, channel: str, cid: object = None) -> None:
        """Raise ``forbidden`` unless clients may publish to ``channel``."""
        if not channel_matches(channel, self.client_publish):
            raise ProtocolError("forbidden", "clients may not publish to this channel", cid)

    @staticmethod
    def is_implicit(user: str | None, channel: str) -> bool:
        """True for the personal channel of ``user``: held for the connection's whole life,
        so an ``unsubscribe`` of it is acknowledged and has no effect."""
        return user is not None and channel == personal_channel(user)

    @staticmethod
    def revoked(channels: Iterable[str], grants: Sequence[str]) -> list[str]:
        """The private channels among ``channels`` that ``grants`` (a refreshed token's
        ``channels`` claim) no longer allow."""
        return [c for c in channels
                if c.startswith(PRIVATE_PREFIX) and not channel_matches(c, grants)]
