"""The opening handshake of ``/ws`` (RFC 6455 section 4.2): who may upgrade, as who.

A handshake is refused with an HTTP status and one log line (never the query string, where a
token may be): 400 for a malformed request (two ``Origin`` or ``Authorization`` headers, a
bad ``?user=`` in development mode), 401 for a bad token, 403 for an Origin that is not an
``--allowed-origin``, 429 for a user that already has ``--max-connections-per-user``
connections, 503 while stopping, past ``--max-connections`` or when the personal
channel cannot be subscribed. An accepted handshake either carries an identity (a token in
``Authorization`` or ``?token=``, or ``?user=`` without ``--jwt-secret``) or none, and then
waits for an in-band ``connect`` (:mod:`hub.session`). docs/protocol.md section 2.

Before any of that, a TCP connection counts as a handshake in progress from its accept to the
end of its opening handshake. At most ``--max-pending-handshakes`` are: when one more is
accepted, the oldest is aborted (:meth:`Handshake.admit`). Evicting the oldest rather than
refusing the newest means that sockets held open without finishing their request cannot
lock legitimate clients out: a real handshake takes one round trip, a flood would have to
open ``--max-pending-handshakes`` connections within it.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence

from websockets.http11 import Request, Response

from .auth import identify
from .channels import personal_channel
from .connection import HubConnection
from .exceptions import AuthError, BrokerUnavailable
from .forwarded import client_address, parse_networks
from .metrics import Metrics
from .node import Node
from .session import Sessions

__all__ = ["Handshake"]

# The connection log keeps the logger name operators already filter on.
logger = logging.getLogger("hub.server")


class Handshake:
    """Decides every ``/ws`` handshake of one process and counts the open connections.

    ``allowed_origin`` are the accepted ``Origin`` values (empty: any); ``trusted_proxy`` the
    addresses or networks whose ``X-Forwarded-For`` names the client in log lines;
    ``jwt_secret`` None means authentication is off. ``max_connections`` bounds
    :attr:`open_connections`, counted from an accepted handshake to ``connection_lost``;
    ``max_connections_per_user`` (0: no limit) bounds the attached connections of one user
    id (the node's registry; a handshake with an identity is attached in :meth:`response`,
    in the same step as its acceptance here). ``max_pending_handshakes`` bounds
    :attr:`in_progress`, the TCP connections accepted whose opening handshake has not ended.
    ``metrics`` gets the handshakes aborted.
    """

    def __init__(self, node: Node, sessions: Sessions, metrics: Metrics, *,
                 allowed_origin: Sequence[str], trusted_proxy: Sequence[str],
                 jwt_secret: str | None, max_connections: int,
                 max_connections_per_user: int, max_pending_handshakes: int) -> None:
        self.node = node
        self.sessions = sessions
        self.origins = frozenset(allowed_origin)
        self.trusted = parse_networks(trusted_proxy)
        self.jwt_secret = jwt_secret
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
        self.open_connections = 0
        self.metrics = metrics
        self.max_pending_handshakes = max_pending_handshakes
        # Insertion-ordered: the first key is the oldest handshake in progress.
        self._pending: dict[HubConnection, None] = {}
        #: Set by the server when it starts stopping: new handshakes get 503.
        self.stopping = False

    def admit(self, conn: HubConnection) -> None:
        """A TCP connection was accepted: it counts in :attr:`in_progress` until
        :meth:`settled`. Past ``max_pending_handshakes``, the oldest handshake in progress is
        aborted (``hub_handshakes_aborted_total{reason="evicted"}``; no log line, so that a
        flood does not become a log flood)."""
        if len(self._pending) >= self.max_pending_handshakes:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self.metrics.handshakes_aborted.labels("evicted").inc()
            oldest.abort()
        self._pending[conn] = None

    def settled(self, conn: HubConnection, reason: str | None) -> None:
        """``conn``'s opening handshake ended; ``reason`` ``"timeout"``
        (``--handshake-timeout`` passed) and ``"malformed"`` (past the request limits, or
        not HTTP) are counted in ``hub_handshakes_aborted_total{reason}``. Idempotent."""
        if self._pending.pop(conn, 0) is None and reason is not None:
            self.metrics.handshakes_aborted.labels(reason).inc()

    @property
    def in_progress(self) -> int:
        """TCP connections accepted whose opening handshake has not ended."""
        return len(self._pending)

    def request(self, conn: HubConnection, request: Request) -> Response | None:
        """Decide the handshake of ``request`` (path ``/ws`` or any other but the probes):
        None lets it upgrade, else the refusal to send."""
        path = request.path.partition("?")[0]
        peer = conn.remote_address[0] if conn.remote_address else None
        conn.remote = client_address(peer, request.headers.get_all("X-Forwarded-For"),
                                     self.trusted)
        if path != "/ws":
            return self.refuse(conn, path, http.HTTPStatus.NOT_FOUND,
                               "not found; the WebSocket endpoint is /ws")
        if conn.lost:
            # The request and the client's EOF came in one read: connection_lost ran before
            # this callback, so nothing may be counted or registered now (it would never be
            # released: a leak that ends in 503 "too many connections" for everyone).
            return conn.respond(http.HTTPStatus.BAD_REQUEST, "connection lost\n")
        origins = request.headers.get_all("Origin")
        if len(origins) > 1:
            return self.refuse(conn, path, http.HTTPStatus.BAD_REQUEST,
                               "more than one Origin header")
        # Requests without Origin (non-browser clients) are accepted; browsers always send it.
        if self.origins and origins and origins[0] not in self.origins:
            return self.refuse(conn, path, http.HTTPStatus.FORBIDDEN,
                               f"Origin {origins[0][:100]!r} is not an --allowed-origin")
        if self.stopping:
            return self.refuse(conn, path, http.HTTPStatus.SERVICE_UNAVAILABLE,
                               "shutting down")
        if self.open_connections >= self.max_connections:
            return self.refuse(conn, path, http.HTTPStatus.SERVICE_UNAVAILABLE,
                               "too many connections")
        authorization = request.headers.get_all("Authorization")
        if len(authorization) > 1:
            return self.refuse(conn, path, http.HTTPStatus.BAD_REQUEST,
                               "more than one Authorization header")
        try:
            identity = identify(request.path, authorization[0] if authorization else None,
                                self.jwt_secret)
        except AuthError as exc:
            status = (http.HTTPStatus.BAD_REQUEST if self.jwt_secret is None
                      else http.HTTPStatus.UNAUTHORIZED)
            return self.refuse(conn, path, status, str(exc))
        if identity is None:  # no token offered: authenticate in-band with connect
            self.sessions.expect_connect(conn)
        else:
            limit = self.max_connections_per_user
            if (limit and identity.user is not None
                    and self.node.connections_of_user(identity.user) >= limit):
                return self.refuse(conn, path, http.HTTPStatus.TOO_MANY_REQUESTS,
                                   f"user {identity.user[:64]!r} already has {limit} "
                                   "connections")
            self.sessions.authorize(conn, identity)
        conn.counted = True
        self.open_connections += 1
        return None

    def refuse(self, conn: HubConnection, path: str, status: http.HTTPStatus,
               reason: str) -> Response:
        """The response refusing a handshake, logged in one line (never the query string,
        where a token may be): WARNING for 403, else INFO."""
        logger.log(logging.WARNING if status == http.HTTPStatus.FORBIDDEN else logging.INFO,
                   "handshake refused (%d) remote=%s path=%r: %s", status, conn.remote,
                   path[:100], reason)
        return conn.respond(status, f"{reason}\n")

    async def response(self, conn: HubConnection, request: Request,
                       response: Response) -> Response | None:
        """Register an accepted connection and make its personal channel live before the
        101 goes out, so a backend may push to ``user:<id>`` as soon as the client is open.
        A connection pending authentication is registered at its ``connect`` instead.
        Returns a 503 instead of the 101 when the broker cannot take the personal channel."""
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            exc = conn.handshake_error
            if exc is not None:  # websockets refused it (no Upgrade, bad key...): log it too
                logger.info("handshake refused (%d) remote=%s path=%r: %s",
                            response.status_code, conn.remote,
                            request.path.partition("?")[0][:100], str(exc)[:200])
            return None
        if conn.pending or conn.lost:  # lost: forgotten already, never to be attached again
            return None
        self.node.attach(conn)
        if conn.user is None:
            return None
        try:
            await self.node.subscribe(conn, personal_channel(conn.user))
        except BrokerUnavailable:
            self.node.detach(conn)
            return self.refuse(conn, request.path.partition("?")[0],
                               http.HTTPStatus.SERVICE_UNAVAILABLE, "broker not connected")
        return None

    def release(self, conn: HubConnection) -> None:
        """``conn``'s TCP connection is gone: it no longer counts. Idempotent."""
        if conn.counted:
            conn.counted = False
            self.open_connections -= 1
