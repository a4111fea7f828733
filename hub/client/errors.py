"""What the client raises.

The hierarchy::

    hub.exceptions.HubError
    └── ClientError                  every exception hub.client raises on purpose
        ├── HubError                 an error reply of the hub: .code, .message
        │   ├── BadRequest           bad_request
        │   ├── BadChannel           bad_channel
        │   ├── Forbidden            forbidden
        │   ├── LimitExceeded        limit_exceeded
        │   ├── RateLimited          rate_limited
        │   ├── Unavailable          unavailable
        │   ├── Unauthorized         unauthorized
        │   ├── NoHistory            no_history
        │   └── NoPresence           no_presence
        ├── ConnectionStopped        the client stopped for good: .close_code or .status, .reason
        │   └── AuthenticationFailed HTTP 401/403 at the handshake, 4001 with no way to
        │                            refresh, 4002
        ├── ConnectionLost           the connection closed before a request's reply came
        │                            (the hub may or may not have applied it)
        ├── ClientClosed             a request on a client that close() ended
        ├── Gap                      messages of a subscription are lost (raised by its iterator)
        └── Unsubscribed             the server ended a subscription (raised by its iterator)

``HubError`` here is the error *reply* of docs/protocol.md section 3 ("Errors"); it is a
subclass of the package-wide :class:`hub.exceptions.HubError`, so ``except
hub.exceptions.HubError`` catches every error of hub, server or client.
"""

from __future__ import annotations

from ..exceptions import HubError as _HubBase

__all__ = [
    "AuthenticationFailed",
    "BadChannel",
    "BadRequest",
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "ConnectionStopped",
    "Forbidden",
    "Gap",
    "HubError",
    "LimitExceeded",
    "NoHistory",
    "NoPresence",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "Unsubscribed",
    "error_from_reply",
]


class ClientError(_HubBase):
    """Base class of every exception of :mod:`hub.client`."""


class HubError(ClientError):
    """An error reply ``{"type":"error","code":...,"message":...}`` of the hub.

    ``code`` is the wire code (``forbidden`` ...), ``message`` the hub's human text, ``id``
    the id of the command it answers. A code this client does not know is raised as a plain
    ``HubError`` with that code.
    """

    code: str = ""

    def __init__(self, code: str, message: str, id: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


class BadRequest(HubError):
    """``bad_request``: the hub could not read the command (a bug of the caller or of the
    client)."""


class BadChannel(HubError):
    """``bad_channel``: not a valid channel name (``^[A-Za-z0-9_.:@/-]{1,128}$``)."""


class Forbidden(HubError):
    """``forbidden``: another user's personal channel, a private channel the token does not
    grant, a publish no ``--client-publish`` pattern allows."""


class LimitExceeded(HubError):
    """``limit_exceeded``: too many subscriptions, or a publish's data is too large."""


class RateLimited(HubError):
    """``rate_limited``: the command was dropped by the hub's rate limit; slow down."""


class Unavailable(HubError):
    """``unavailable``: the hub's broker (Redis) did not confirm in time; nothing was done."""


class Unauthorized(HubError):
    """``unauthorized``: the token of a refresh was refused."""


class NoHistory(HubError):
    """``no_history``: history, since, last or an idempotency key on a channel without
    history."""


class NoPresence(HubError):
    """``no_presence``: presence or presence_stats on a channel without presence."""


_BY_CODE: dict[str, type[HubError]] = {
    "bad_request": BadRequest, "bad_channel": BadChannel, "forbidden": Forbidden,
    "limit_exceeded": LimitExceeded, "rate_limited": RateLimited, "unavailable": Unavailable,
    "unauthorized": Unauthorized, "no_history": NoHistory, "no_presence": NoPresence,
}


def error_from_reply(code: str, message: str, id: object = None) -> HubError:
    """The typed exception of an error reply: the subclass named after ``code``, or a plain
    :class:`HubError` for a code this client does not know."""
    cls = _BY_CODE.get(code, HubError)
    return cls(code, message, id)


class ConnectionStopped(ClientError):
    """The client stopped and will not reconnect.

    ``close_code`` is the WebSocket close code that stopped it (4003: the server disconnected
    this client; 4006, 1002, 1007, 1008, 1009, an unknown 4xxx ...), or ``status`` the HTTP
    status of a refused handshake (400, 404 ...); the other is None. ``reason`` is the close
    reason or a few words.
    """

    def __init__(self, reason: str, *, close_code: int | None = None,
                 status: int | None = None) -> None:
        what = (f"close code {close_code}" if close_code is not None
                else f"HTTP {status}" if status is not None else "stopped")
        super().__init__(f"{what}: {reason}" if reason else what)
        self.close_code = close_code
        self.status = status
        self.reason = reason


class AuthenticationFailed(ConnectionStopped):
    """The hub refused the credentials: HTTP 401 or 403 at the handshake, close 4002
    (invalid token), or 4001 (expired) when there is no ``get_token`` to get a fresh one."""


class ConnectionLost(ClientError):
    """The connection closed before the reply to a request came. The hub may or may not
    have applied the command: retry a publish with an ``idempotency_key`` to make it safe."""


class ClientClosed(ClientError):
    """The client was closed with :meth:`~hub.client.Client.close`."""


class Gap(ClientError):
    """Messages of a subscription are lost: raised once by the subscription's iterator, in
    the place of the lost messages; iterating again goes on with the next ones.

    ``reason`` is ``"not_recovered"`` (a resubscribe with ``since`` after a reconnect was
    acked with ``recovered:false``: the history no longer holds what was missed, or its epoch
    changed) or ``"gap"`` (a ``gap`` frame: the hub lost messages of this channel).
    ``from_`` and ``to`` are the first and last lost offsets when known (None: unknown; both
    None on a channel without history), ``epoch`` the channel's epoch from now on (None on a
    channel without history). The application should reload the channel's state from its
    own backend.
    """

    def __init__(self, channel: str, reason: str, from_: int | None = None,
                 to: int | None = None, epoch: str | None = None) -> None:
        span = "" if from_ is None and to is None else f" (offsets {from_}..{to})"
        super().__init__(f"messages of {channel!r} lost: {reason}{span}")
        self.channel = channel
        self.reason = reason
        self.from_ = from_
        self.to = to
        self.epoch = epoch


class Unsubscribed(ClientError):
    """The server ended a subscription: raised by its iterator once the messages received
    before are consumed; the iterator then stays finished.

    ``reason`` is the frame's: ``"server"`` (the HTTP API or Publisher.unsubscribe),
    ``"revoked"`` (a refreshed token no longer grants the private channel), or the
    :class:`HubError` code of a resubscribe the hub refused after a reconnect (``error`` is
    that exception then, else None).
    """

    def __init__(self, channel: str, reason: str, error: HubError | None = None) -> None:
        super().__init__(f"subscription to {channel!r} ended by the server: {reason}")
        self.channel = channel
        self.reason = reason
        self.error = error
