"""Exceptions raised by hub.

The hierarchy::

    HubError
    ├── ConfigError          a bad option value (names the flag or environment variable)
    ├── ProtocolError        a client frame the hub rejects; carries the wire error ``code``
    ├── AuthError            a token that is missing, forged, expired or malformed
    │   └── TokenExpired     a token whose exp has passed
    └── BrokerUnavailable    the broker (Redis) could not confirm an operation in time
"""

from __future__ import annotations

__all__ = ["AuthError", "BrokerUnavailable", "ConfigError", "HubError", "ProtocolError",
           "TokenExpired"]


class HubError(Exception):
    """Base class of every exception hub raises on purpose."""


class ConfigError(HubError, ValueError):
    """An option has a bad value. The message names the flag or variable."""


class ProtocolError(HubError):
    """A client command is rejected.

    ``code`` is one of the error codes of docs/protocol.md (``bad_request``, ``bad_channel``,
    ``forbidden``, ``limit_exceeded``, ``rate_limited``, ``unavailable``, ``unauthorized``);
    ``id`` is the command's ``id`` when it could be read, else None.
    """

    def __init__(self, code: str, message: str, id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class AuthError(HubError):
    """A token was rejected. The message is safe to log: it never contains the token."""


class TokenExpired(AuthError):
    """The token is valid but its ``exp`` has passed (close code 4001 for a ``connect``)."""


class BrokerUnavailable(HubError):
    """The broker did not confirm a subscribe or publish within its deadline."""
