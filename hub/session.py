"""One connection's life after the handshake: in-band authentication, the command loop, the
rate limit, dispatch and permissions, token refresh and expiry.

:class:`Sessions` serves every connection of one process; the per-connection state lives in
the slots of :class:`hub.connection.HubConnection` (an object per connection would cost
memory on every idle connection). Commands are the typed values of :mod:`hub.protocol`;
permissions are :class:`hub.channels.ChannelRules`; subscriptions go through the
:class:`hub.node.Node`. docs/protocol.md sections 4-5 are the contract.
"""

from __future__ import annotations

import asyncio
import logging
import time

from websockets.exceptions import ConnectionClosed

from .auth import Identity, verify_token
from .brokers.base import StreamPosition
from .channels import ChannelRules, personal_channel
from .connection import HubConnection
from .exceptions import AuthError, BrokerUnavailable, ProtocolError, TokenExpired
from .metrics import Metrics
from .node import SLOW_CLOSE_TIMEOUT, Node
from .protocol import (
    CLOSE_AUTH_REQUIRED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INVALID_TOKEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_MANY_CONNECTIONS,
    Command,
    CommandId,
    Connect,
    History,
    Ping,
    Presence,
    PresenceStats,
    Publish,
    Refresh,
    Subscribe,
    Unsubscribe,
    ack_frame,
    connect_ack_frame,
    encode_envelope,
    error_frame,
    history_frame,
    history_items,
    parse_command,
    parse_connect,
    pong_frame,
    position_ack_frame,
    presence_frame,
    presence_stats_frame,
    unsubscribed_frame,
)

__all__ = ["Sessions"]

# The connection log keeps the logger name operators already filter on.
logger = logging.getLogger("hub.server")


class Sessions:
    """The command handling of one hub process.

    ``node`` takes the subscriptions and publishes; ``rules`` decides permissions;
    ``metrics`` counts errors and closes. ``jwt_secret`` (None: authentication off) verifies
    ``connect`` and ``refresh`` tokens; ``auth_timeout`` is the seconds a pending connection
    has to send its ``connect``.

    Limits: ``rate_limit`` commands per second per connection (a token bucket with a burst of
    twice that; 0 disables; a refused command gets ``rate_limited`` with its id), and a
    flooder is closed with 4029: commands are counted in windows of :attr:`window` (4 x the
    burst) commands and a connection is closed as soon as more than half of the commands of
    its current window were refused, however it paces them. ``max_subscriptions`` per
    connection (the personal channel not counted); ``max_connections_per_user``
    connections of one user id after an in-band ``connect`` (0: no limit; the handshake
    checks its own in :mod:`hub.handshake`), past it close 4009.
    """

    def __init__(self, node: Node, rules: ChannelRules, metrics: Metrics, *,
                 jwt_secret: str | None, auth_timeout: float,
                 # Limits
                 rate_limit: float, max_subscriptions: int,
                 max_connections_per_user: int) -> None:
        self.node = node
        self.rules = rules
        self.metrics = metrics
        self.jwt_secret = jwt_secret
        self.auth_timeout = auth_timeout
        self.rate = rate_limit
        self.burst = 2 * rate_limit
        #: Commands per flood-detection window; more than half of them refused closes 4029.
        self.window = max(4, int(4 * self.burst))
        self.max_subscriptions = max_subscriptions
        self.max_connections_per_user = max_connections_per_user
        #: Connections accepted without a token, until their ``connect``: in no registry.
        self.pending: set[HubConnection] = set()

    # -- identity --------------------------------------------------------------------------

    def expect_connect(self, conn: HubConnection) -> None:
        """Mark ``conn`` (handshake accepted without a token) pending in-band authentication."""
        conn.pending = True
        self.pending.add(conn)

    def authorize(self, conn: HubConnection, identity: Identity) -> None:
        """Give ``conn`` the user and private channels of ``identity`` and (re)start the timer
        that closes it with 4001 at the identity's ``expires_at``."""
        conn.user = identity.user
        conn.private = identity.channels
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if identity.expires_at is not None:
            delay = max(0.0, identity.expires_at - time.time())
            conn.expiry = asyncio.get_running_loop().call_later(delay, self._expire, conn)

    def forget(self, conn: HubConnection) -> None:
        """Drop what the session holds of ``conn`` (its TCP connection is gone), and count a
        close websockets sent on its own (1011 keepalive timeout, 1009, 1007, 1002) into
        ``hub_connections_closed_total``, as :meth:`Node.close_connection` counts the hub's
        own (those set ``dropping``, so no close is counted twice)."""
        code = conn.close_sent_by_library
        if code is not None:
            self.metrics.closes.labels(str(code)).inc()
        self.pending.discard(conn)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def _expire(self, conn: HubConnection) -> None:
        conn.expiry = None
        if conn.dropping:
            return
        logger.info("token expired user=%s", conn.user)
        self.node.detach(conn)
        self.node.close_connection(conn, CLOSE_TOKEN_EXPIRED, "token expired",
                                   SLOW_CLOSE_TIMEOUT)

    def frame_flood(self, conn: HubConnection) -> None:
        """Close ``conn`` with 4029: it sent more frames than ``--max-frame-rate`` allows
        (:meth:`HubConnection.process_event`)."""
        logger.warning("closing flooding connection user=%s: more than %g frames per second",
                       conn.user, conn.frame_rate)
        self._close_flood(conn)

    def _close_flood(self, conn: HubConnection) -> None:
        self.node.detach(conn)
        self.node.close_connection(conn, CLOSE_RATE_LIMITED, "rate limit", SLOW_CLOSE_TIMEOUT)

    # -- the connection's life -------------------------------------------------------------

    async def serve(self, conn: HubConnection) -> None:
        """The connection handler: authenticate a pending connection, then run its frames
        until it closes. Never raises for anything the client does."""
        remote = conn.remote
        logger.info("open user=%s remote=%s%s", conn.user, remote,
                    " (pending authentication)" if conn.pending else "")
        conn.drop_handshake()
        conn.tokens = self.burst
        conn.refilled = time.monotonic()
        try:
            if conn.pending and not await self._authenticate(conn):
                return
            async for frame in conn:
                if conn.dropping:  # being closed by the hub: let that close finish
                    continue
                reply = await self._command(conn, frame)
                # An idle connection waits in the loop; hold nothing of the last command
                # while it does (orjson's reply buffers are large: docs/benchmarks.md).
                del frame
                if isinstance(reply, list):  # a reply and the frames that follow it
                    for item in reply:
                        await conn.send(item, text=True)
                    del reply
                elif reply is not None:
                    await conn.send(reply, text=True)
                    del reply
        except ConnectionClosed:
            pass
        finally:
            self.pending.discard(conn)
            self.node.detach(conn)
            logger.info("close user=%s remote=%s code=%s", conn.user, remote,
                        conn.close_code)

    async def _authenticate(self, conn: HubConnection) -> bool:
        """In-band authentication of a pending connection: its first frame must be a valid
        ``connect`` within ``auth_timeout`` seconds. True once the connection is
        authenticated, its personal channel live and the ack sent; False when it was closed
        (4001, 4002, 4005, 4006, or 1011 when the broker cannot take the personal channel).
        Raises ConnectionClosed when the client goes away first."""
        secret = self.jwt_secret
        assert secret is not None
        try:
            frame = await asyncio.wait_for(conn.recv(), self.auth_timeout)
        except TimeoutError:
            await self._deny(conn, CLOSE_AUTH_TIMEOUT, "authentication timeout",
                             f"no connect within {self.auth_timeout:g} s")
            return False
        try:
            cmd = parse_connect(frame)
        except ProtocolError as exc:
            await self._deny(conn, CLOSE_INVALID_TOKEN, "invalid token", exc.message)
            return False
        del frame
        if cmd is None:
            await self._deny(conn, CLOSE_AUTH_REQUIRED, "authentication required",
                             "the first frame was not a connect command")
            return False
        try:
            identity = verify_token(cmd.token, secret)
        except TokenExpired:
            await self._deny(conn, CLOSE_TOKEN_EXPIRED, "token expired", "token expired")
            return False
        except AuthError as exc:
            await self._deny(conn, CLOSE_INVALID_TOKEN, "invalid token", str(exc))
            return False
        assert identity.user is not None
        limit = self.max_connections_per_user
        if limit and self.node.connections_of_user(identity.user) >= limit:
            await self._deny(conn, CLOSE_TOO_MANY_CONNECTIONS, "too many connections",
                             f"user {identity.user[:64]!r} already has {limit} connections")
            return False
        conn.user = identity.user
        conn.private = identity.channels
        conn.pending = False
        self.pending.discard(conn)
        self.node.attach(conn)
        try:
            await self.node.subscribe(conn, personal_channel(identity.user))
        except BrokerUnavailable as exc:
            self.node.detach(conn)
            logger.warning("connect refused user=%s remote=%s: personal channel: %s",
                           conn.user, conn.remote, exc)
            await conn.send(self._error(ProtocolError("unavailable", str(exc), cmd.id)),
                            text=True)
            await self.node.close_connection(conn, CLOSE_INTERNAL_ERROR, "broker unavailable",
                                             SLOW_CLOSE_TIMEOUT)
            return False
        if conn.dropping or not conn.is_open:  # closed meanwhile
            return False
        self.authorize(conn, identity)  # the exp timer starts with the ack
        await conn.send(connect_ack_frame(cmd.id, identity.user, str(conn.id),
                                          identity.expires_at), text=True)
        logger.info("authenticated user=%s remote=%s", conn.user, conn.remote)
        return True

    async def _deny(self, conn: HubConnection, code: int, reason: str, detail: str) -> None:
        """Close a pending connection with ``code`` (the close reason is ``reason``: short,
        never the token) and log one line with ``detail``; returns once it is closed."""
        logger.info("authentication failed (%d) remote=%s: %s", code, conn.remote, detail)
        await self.node.close_connection(conn, code, reason, SLOW_CLOSE_TIMEOUT)

    # -- commands --------------------------------------------------------------------------

    def _allow(self, conn: HubConnection) -> bool | None:
        """Token bucket: True if this command may run, False if it is refused, None if it is
        refused and the connection is a flooder: more than half of the commands of its
        current window of :attr:`window` commands were refused."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        conn.tokens = min(self.burst, conn.tokens + (now - conn.refilled) * self.rate)
        conn.refilled = now
        conn.commands += 1
        if conn.commands > self.window:  # a new window starts with this command
            conn.commands = 1
            conn.refused = 0
        if conn.tokens >= 1.0:
            conn.tokens -= 1.0
            return True
        conn.refused += 1
        if 2 * conn.refused > self.window:
            return None
        return False

    async def _command(self, conn: HubConnection, frame: str | bytes
                       ) -> bytes | list[bytes] | None:
        """Run one client frame; return the reply frame (None: the connection is closed)."""
        allowed = self._allow(conn)
        if not allowed:
            if allowed is None:
                logger.warning("closing flooding connection user=%s: more than half of %d "
                               "commands refused", conn.user, self.window)
                self._close_flood(conn)
                return None
            return self._error(ProtocolError("rate_limited", f"more than {self.rate:g} "
                                             "commands per second", self._id_of(frame)))
        try:
            return await self._run(conn, parse_command(frame))
        except ProtocolError as exc:
            return self._error(exc)

    @staticmethod
    def _id_of(frame: str | bytes) -> object:
        """The id of the command in ``frame`` as its reply would echo it (None when the
        frame has none or a bad one): :func:`hub.protocol.parse_command`'s own reading, so
        a refused command's error carries exactly the id a served one would. The frame is
        at most ``--max-message-bytes``, and the connection refusing it is closed once more
        than half of a window is refused, so the parse is bounded."""
        try:
            return parse_command(frame).id
        except ProtocolError as exc:
            return exc.id

    def _error(self, exc: ProtocolError) -> bytes:
        self.metrics.errors.labels(exc.code).inc()
        return error_frame(exc.code, exc.message, exc.id)

    async def _run(self, conn: HubConnection, cmd: Command) -> bytes | list[bytes] | None:
        """The reply to ``cmd`` (None: already written, as the ack of a subscribe to a history
        channel is); raises :class:`ProtocolError` for an error reply."""
        match cmd:
            case Subscribe(channel, cid, since, last):
                return await self._subscribe(conn, channel, cid, since, last)
            case History(channel, cid, limit, since):
                return await self._history(conn, channel, cid, limit, since)
            case Presence(channel, cid):
                return await self._presence(conn, channel, cid, stats=False)
            case PresenceStats(channel, cid):
                return await self._presence(conn, channel, cid, stats=True)
            case Unsubscribe(channel, cid):
                if not self.rules.is_implicit(conn.user, channel):
                    self.node.unsubscribe(conn, channel)
                return ack_frame(cid)
            case Publish(channel, data, cid, key):
                self.rules.check_publish(channel, cid)
                if len(data) > self.node.max_payload_bytes:
                    raise ProtocolError("limit_exceeded", f"data is larger than "
                                        f"--max-payload-bytes {self.node.max_payload_bytes:g}",
                                        cid)
                if key is not None and not self.node.keeps_history(channel):
                    raise ProtocolError("no_history", "idempotency_key needs a history "
                                        "channel", cid)
                # The envelope names the sender (docs/protocol.md section 6): subscribers
                # get "from", which nothing in data can change.
                payload = encode_envelope(conn.user, str(conn.id), data)
                try:
                    result = await self.node.publish(channel, payload, key)
                except BrokerUnavailable as exc:
                    raise ProtocolError("unavailable", str(exc), cid) from None
                if isinstance(result, StreamPosition):
                    return position_ack_frame(cid, result.offset, result.epoch)
                return ack_frame(cid)
            case Ping(cid):
                return pong_frame(cid)
            case Connect(_, cid):  # a pending connection's connect never gets here
                raise ProtocolError("bad_request", "already authenticated"
                                    if self.jwt_secret is not None
                                    else "authentication is off", cid)
            case Refresh(token, cid):
                return self._refresh(conn, token, cid)
        return None  # unreachable: every command type is matched above

    async def _subscribe(self, conn: HubConnection, channel: str, cid: CommandId,
                         since: StreamPosition | None, last: int | None) -> bytes | None:
        self.rules.check_subscribe(conn.user, conn.private, channel, cid)
        history = self.node.keeps_history(channel)
        if not history and (since is not None or last is not None):
            raise ProtocolError("no_history", "since and last need a history channel", cid)
        subscribed = self.node.channels_of(conn)
        if subscribed is None:  # closed meanwhile
            return ack_frame(cid)
        if channel not in subscribed:
            personal = 1 if conn.user is not None else 0
            if len(subscribed) - personal >= self.max_subscriptions:
                raise ProtocolError("limit_exceeded", f"at most {self.max_subscriptions} "
                                    "subscriptions", cid)
        elif not history:
            return ack_frame(cid)
        try:
            if history:
                # The ack goes out from inside, before the replay and the live messages.
                await self.node.subscribe_stream(
                    conn, channel, since=since, last=last,
                    ack=lambda c: position_ack_frame(cid, c.position.offset, c.position.epoch,
                                                     c.recovered))
                return None
            await self.node.subscribe(conn, channel)
        except BrokerUnavailable as exc:
            raise ProtocolError("unavailable", str(exc), cid) from None
        return ack_frame(cid)

    async def _history(self, conn: HubConnection, channel: str, cid: CommandId, limit: int,
                       since: StreamPosition | None) -> bytes:
        self.rules.check_subscribe(conn.user, conn.private, channel, cid)
        streams = self.node.streams
        if streams is None or not streams.keeps_history(channel):
            raise ProtocolError("no_history", "the channel keeps no history", cid)
        try:
            read = await streams.read(channel, since=since, limit=limit)
        except Exception as exc:
            raise ProtocolError("unavailable", f"history unavailable: {exc}", cid) from None
        return history_frame(cid, channel, read.position.offset, read.position.epoch,
                             history_items(read.publications))

    async def _presence(self, conn: HubConnection, channel: str, cid: CommandId, *,
                        stats: bool) -> bytes:
        """The ``presence`` or ``presence_stats`` reply: allowed where ``conn`` may
        subscribe."""
        self.rules.check_subscribe(conn.user, conn.private, channel, cid)
        presences = self.node.presences
        if presences is None or not presences.keeps_presence(channel):
            raise ProtocolError("no_presence", "the channel keeps no presence", cid)
        try:
            if stats:
                counts = await presences.stats(channel)
                return presence_stats_frame(cid, channel, counts.clients, counts.users)
            clients = await presences.clients(channel)
        except Exception as exc:
            raise ProtocolError("unavailable", f"presence unavailable: {exc}", cid) from None
        return presence_frame(cid, channel, [(c.client, c.user) for c in clients])

    def _refresh(self, conn: HubConnection, token: str, cid: CommandId) -> list[bytes]:
        secret = self.jwt_secret
        if secret is None:
            raise ProtocolError("bad_request", "authentication is off; nothing to refresh", cid)
        try:
            identity = verify_token(token, secret)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc), cid) from None
        if identity.user != conn.user:
            raise ProtocolError("forbidden", "the token is for another user", cid)
        self.authorize(conn, identity)
        # The new token's channels claim applies from now: drop private channels it revokes,
        # and say so after the ack (a subscription never goes quiet without a word).
        frames = [ack_frame(cid)]
        for channel in self.rules.revoked(self.node.channels_of(conn) or (), conn.private):
            self.node.unsubscribe(conn, channel)
            frames.append(unsubscribed_frame(channel, "revoked"))
        return frames
