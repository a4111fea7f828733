"""The hub process: HTTP paths, the handshake, the connection handler, serve and shutdown.

Paths on the one port: ``/ws`` (the WebSocket endpoint), ``GET /healthz`` (200 while the
process runs), ``GET /readyz`` (200 while the broker is connected and the process is not
stopping, else 503), ``GET /metrics`` (Prometheus text), anything else 404.

Shutdown (SIGTERM or SIGINT), in order: ``/readyz`` turns 503 and the listening socket closes;
every connection gets close code 1001 (going away); connections that have not closed within
``--shutdown-timeout`` seconds are aborted; the broker link closes; the process exits 0.
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin

from .auth import Identity, identify, origin_problems, verify_token
from .brokers import create_broker
from .config import Config, address_error
from .exceptions import AuthError, BrokerUnavailable, ProtocolError, TokenExpired
from .forwarded import client_address, parse_networks
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .node import SLOW_CLOSE_TIMEOUT, Node
from .protocol import (
    CLOSE_AUTH_REQUIRED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INVALID_TOKEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOKEN_EXPIRED,
    Command,
    ack_frame,
    channel_matches,
    connect_ack_frame,
    error_frame,
    parse_command,
    parse_connect,
    personal_channel,
    pong_frame,
)

__all__ = ["Hub", "HubConnection", "run"]

logger = logging.getLogger("hub.server")

#: Seconds the peer has to answer our close frame before the TCP connection is dropped.
CLOSE_TIMEOUT = 5.0


class HubConnection(ServerConnection):
    """A WebSocket connection with the hub's per-connection state.

    ``user`` is the user id (None: anonymous, or not yet authenticated); ``private`` the
    private channel patterns of its token; ``pending`` is True from a handshake without a
    token (with ``--jwt-secret``) until its ``connect`` is accepted; ``remote`` is the client
    address for log lines (``--trusted-proxy``); ``dropping`` is True once the hub decided to
    close it. The rate limiter is a token bucket of ``tokens`` refilled at ``--rate-limit``
    per second up to twice that.
    """

    hub: Hub  # set on the per-server subclass

    # Slots, not __dict__ entries: eight more keys made every connection's instance dict
    # resize, about 1.5 KiB per connection (tracemalloc, 1000 connections).
    __slots__ = ("counted", "dropping", "expiry", "pending", "private", "refilled", "remote",
                 "strikes", "tokens", "user")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user: str | None = None
        self.private: tuple[str, ...] = ()
        self.pending = False
        self.remote = "?"
        self.dropping = False
        self.counted = False
        self.tokens = 0.0
        self.refilled = 0.0
        self.strikes = 0
        self.expiry: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.hub.forget(self)

    def pause_writing(self) -> None:
        """The transport's write buffer passed ``--max-buffer-bytes`` (its high-water mark):
        a slow consumer. Called from inside ``transport.write()``, possibly in the middle of
        a broadcast, so the drop runs on the next loop iteration."""
        super().pause_writing()
        if not self.dropping:
            self.loop.call_soon(self.hub.node.drop_slow_consumer, self)


class Hub:
    """One hub process: the node plus the WebSocket server around it."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        broker = create_broker(config.redis_url, cluster=config.redis_cluster,
                               prefix=config.redis_prefix, probe_interval=config.probe_interval,
                               probe_timeout=config.probe_timeout)
        self.node = Node(broker, self.metrics)
        # Count TCP connections from handshake to connection_lost, not registry entries, so
        # that a connection being closed still counts until it is really gone.
        self.metrics.connections.set_function(lambda: self.open_connections)
        self.stopping = False
        self.open_connections = 0
        self.server: Any = None
        self._rate = config.rate_limit
        self._burst = 2 * config.rate_limit
        self._connection_class = type("HubConnection", (HubConnection,), {"hub": self})
        self._origins = frozenset(config.allowed_origin)
        self._trusted = parse_networks(config.trusted_proxy)
        # Connections pending in-band authentication: in no registry, closed by stop().
        self._pending: set[HubConnection] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, reuse_port: bool = False) -> None:
        """Bind the port, connect the broker (in the background) and start accepting.

        ``reuse_port`` sets SO_REUSEPORT on the listening socket. With ``--tls-cert`` the
        port speaks TLS only: ``wss://`` and ``https://`` for the probes. Raises
        :class:`ConfigError` (one line) when a TLS file is unusable, the host does not resolve
        or the address cannot be bound; then nothing has been started or logged.
        """
        cfg = self.config
        tls = cfg.ssl_context()
        origins = [Origin(o) for o in cfg.allowed_origin] if cfg.allowed_origin else None
        # serve() hands our create_connection subclass to these callbacks; its signature
        # only says ServerConnection, hence the ignores.
        try:
            self.server = await serve(
                self._handler,  # type: ignore[arg-type]
                cfg.host, cfg.port,
                create_connection=self._connection_class,
                process_request=self._process_request,  # type: ignore[arg-type]
                process_response=self._process_response,  # type: ignore[arg-type]
                origins=[*origins, None] if origins else None,
                compression="deflate" if cfg.compression == "deflate" else None,
                max_size=cfg.max_message_bytes,
                ping_interval=cfg.ping_interval or None,
                ping_timeout=cfg.ping_interval or None,
                close_timeout=CLOSE_TIMEOUT,
                # The write buffer's high-water mark is the slow-consumer limit: the transport
                # calls pause_writing() when a connection passes it (websockets' send() also
                # waits for the buffer to fall below it).
                write_limit=cfg.max_buffer_bytes,
                server_header=None,
                # SO_REUSEADDR is asyncio's and uvloop's default on POSIX: TIME-WAIT
                # connections of an earlier hub on the port do not block the bind.
                reuse_port=reuse_port or None,
                ssl=tls,
                start_serving=False,  # bound, so every configuration error is behind us
            )
        except OSError as exc:  # in use, not a local address, a host that does not resolve
            raise address_error(cfg.host, cfg.port, exc) from None
        if cfg.jwt_secret is None:
            logger.warning("authentication is OFF (no --jwt-secret): any client may connect "
                           "and claim any user id with ?user=; never run this in production")
        elif len(cfg.jwt_secret.encode()) < 32:
            logger.warning("--jwt-secret is shorter than 32 bytes; HS256 wants at least 32")
        self._warn_origins()
        await self.node.start()
        await self.server.start_serving()
        logger.info("listening on %s:%d%s (%s broker)", cfg.host, self.port,
                    " with TLS" if tls else "", type(self.node.broker).__name__)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """The ordered shutdown of the module docstring. Never raises."""
        self.stopping = True
        self.server.close(close_connections=False)
        conns = [*self.node.registry.connections(), *self._pending]
        logger.info("shutting down: closing %d connections with 1001", len(conns))
        timeout = self.config.shutdown_timeout
        tasks = [self.node.close_connection(c, CLOSE_GOING_AWAY, "server shutting down",
                                            timeout) for c in conns if not c.dropping]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 1)
        for conn in list(self.server.connections):
            conn.transport.abort()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 2.0)
        except TimeoutError:
            logger.warning("some connection handlers did not finish")
        try:
            await asyncio.wait_for(self.node.stop(), 5.0)
        except TimeoutError:
            logger.warning("the broker did not close within 5 s")
        logger.info("stopped")

    def _warn_origins(self) -> None:
        """Log a warning for each ``--allowed-origin`` value no browser can send."""
        for problem in origin_problems(self.config.allowed_origin):
            logger.warning("%s", problem)

    # -- handshake -------------------------------------------------------------------------

    def _process_request(self, conn: HubConnection, request: Request) -> Response | None:
        """Answer the HTTP paths and decide a ``/ws`` handshake: None lets it upgrade.

        Every refusal of ``/ws`` (and every 404) is logged once by :meth:`_refuse`."""
        path = request.path.partition("?")[0]
        if path == "/healthz":
            return conn.respond(http.HTTPStatus.OK, "OK\n")
        if path == "/readyz":
            if self.node.ready and not self.stopping:
                return conn.respond(http.HTTPStatus.OK, "ready\n")
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "stopping\n" if self.stopping else "broker not connected\n")
        if path == "/metrics":
            response = conn.respond(http.HTTPStatus.OK, "")
            body = self.metrics.render()
            response.headers = Headers([("Content-Type", CONTENT_TYPE_LATEST),
                                        ("Content-Length", str(len(body))),
                                        ("Connection", "close")])
            response.body = body
            return response
        peer = conn.remote_address[0] if conn.remote_address else None
        conn.remote = client_address(peer, request.headers.get_all("X-Forwarded-For"),
                                     self._trusted)
        if path != "/ws":
            return self._refuse(conn, path, http.HTTPStatus.NOT_FOUND,
                                "not found; the WebSocket endpoint is /ws")
        origins = request.headers.get_all("Origin")
        if len(origins) > 1:
            return self._refuse(conn, path, http.HTTPStatus.BAD_REQUEST,
                                "more than one Origin header")
        # Requests without Origin (non-browser clients) are accepted; browsers always send it.
        if self._origins and origins and origins[0] not in self._origins:
            return self._refuse(conn, path, http.HTTPStatus.FORBIDDEN,
                                f"Origin {origins[0][:100]!r} is not an --allowed-origin")
        if self.stopping:
            return self._refuse(conn, path, http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "shutting down")
        if self.open_connections >= self.config.max_connections:
            return self._refuse(conn, path, http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "too many connections")
        authorization = request.headers.get_all("Authorization")
        if len(authorization) > 1:
            return self._refuse(conn, path, http.HTTPStatus.BAD_REQUEST,
                                "more than one Authorization header")
        try:
            identity = identify(request.path, authorization[0] if authorization else None,
                                self.config.jwt_secret)
        except AuthError as exc:
            status = (http.HTTPStatus.BAD_REQUEST if self.config.jwt_secret is None
                      else http.HTTPStatus.UNAUTHORIZED)
            return self._refuse(conn, path, status, str(exc))
        if identity is None:  # no token offered: authenticate in-band with connect
            conn.pending = True
            self._pending.add(conn)
        else:
            self._apply_identity(conn, identity)
        conn.counted = True
        self.open_connections += 1
        return None

    def _refuse(self, conn: HubConnection, path: str, status: http.HTTPStatus,
                reason: str) -> Response:
        """The response refusing a handshake, logged in one line (never the query string,
        where a token may be): WARNING for 403, else INFO."""
        logger.log(logging.WARNING if status == http.HTTPStatus.FORBIDDEN else logging.INFO,
                   "handshake refused (%d) remote=%s path=%r: %s", status, conn.remote,
                   path[:100], reason)
        return conn.respond(status, f"{reason}\n")

    async def _process_response(self, conn: HubConnection, request: Request,
                                response: Response) -> Response | None:
        """Register an accepted connection and make its personal channel live before the
        101 goes out, so a backend may push to ``user:<id>`` as soon as the client is open.
        A connection pending authentication is registered at its ``connect`` instead."""
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            exc = conn.protocol.handshake_exc
            if exc is not None:  # websockets refused it (no Upgrade, bad key...): log it too
                logger.info("handshake refused (%d) remote=%s path=%r: %s",
                            response.status_code, conn.remote,
                            request.path.partition("?")[0][:100], str(exc)[:200])
            return None
        if conn.pending:
            return None
        self.node.attach(conn)
        if conn.user is None:
            return None
        try:
            await self.node.subscribe(conn, personal_channel(conn.user))
        except BrokerUnavailable:
            self.node.detach(conn)
            return self._refuse(conn, request.path.partition("?")[0],
                                http.HTTPStatus.SERVICE_UNAVAILABLE, "broker not connected")
        return None

    def _apply_identity(self, conn: HubConnection, identity: Identity) -> None:
        conn.user = identity.user
        conn.private = identity.channels
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if identity.expires_at is not None:
            delay = max(0.0, identity.expires_at - time.time())
            conn.expiry = asyncio.get_running_loop().call_later(delay, self._expire, conn)

    def _expire(self, conn: HubConnection) -> None:
        conn.expiry = None
        if conn.dropping:
            return
        logger.info("token expired user=%s", conn.user)
        self.node.detach(conn)
        self.node.close_connection(conn, CLOSE_TOKEN_EXPIRED, "token expired",
                                   SLOW_CLOSE_TIMEOUT)

    def forget(self, conn: HubConnection) -> None:
        """Called once the TCP connection is gone, whatever happened before."""
        self._pending.discard(conn)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if conn.counted:
            conn.counted = False
            self.open_connections -= 1
        self.node.detach(conn)

    # -- the connection --------------------------------------------------------------------

    async def _handler(self, conn: HubConnection) -> None:
        remote = conn.remote
        logger.info("open user=%s remote=%s%s", conn.user, remote,
                    " (pending authentication)" if conn.pending else "")
        # The handshake is over: hold none of its headers (cookies, a token in the query or
        # in Authorization) for the life of the connection; about 2 KiB per connection with
        # a library client's few headers, more with a browser's. Cleared in place: the
        # library's handshake parser keeps a reference to the same Request.
        if conn.request is not None:
            conn.request.headers.clear()
            conn.request.path = conn.request.path.partition("?")[0]
        conn.response = None
        conn.tokens = self._burst
        conn.refilled = time.monotonic()
        try:
            if conn.pending and not await self._authenticate(conn):
                return
            async for frame in conn:
                if conn.dropping:  # being closed by the hub: let that close finish
                    continue
                await self._serve_frame(conn, frame)
                # An idle connection waits here; hold nothing of the last command while it
                # does (orjson's reply buffers are about 4 KiB each).
                del frame
        except ConnectionClosed:
            pass
        finally:
            self._pending.discard(conn)
            self.node.detach(conn)
            logger.info("close user=%s remote=%s code=%s", conn.user, remote,
                        conn.close_code)

    async def _authenticate(self, conn: HubConnection) -> bool:
        """In-band authentication of a pending connection: its first frame must be a valid
        ``connect`` within ``--auth-timeout`` seconds. True once the connection is
        authenticated, its personal channel live and the ack sent; False when it was closed
        (4001, 4002, 4005, 4006, or 1011 when the broker cannot take the personal channel).
        Raises ConnectionClosed when the client goes away first."""
        secret = self.config.jwt_secret
        assert secret is not None
        try:
            frame = await asyncio.wait_for(conn.recv(), self.config.auth_timeout)
        except TimeoutError:
            await self._deny(conn, CLOSE_AUTH_TIMEOUT, "authentication timeout",
                             f"no connect within {self.config.auth_timeout:g} s")
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
        assert cmd.token is not None
        try:
            identity = verify_token(cmd.token, secret)
        except TokenExpired:
            await self._deny(conn, CLOSE_TOKEN_EXPIRED, "token expired", "token expired")
            return False
        except AuthError as exc:
            await self._deny(conn, CLOSE_INVALID_TOKEN, "invalid token", str(exc))
            return False
        assert identity.user is not None
        conn.user = identity.user
        conn.private = identity.channels
        conn.pending = False
        self._pending.discard(conn)
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
        if conn.dropping or conn.protocol.state is not State.OPEN:  # closed meanwhile
            return False
        self._apply_identity(conn, identity)  # the exp timer starts with the ack
        await conn.send(connect_ack_frame(cmd.id, identity.user, str(conn.id),
                                          identity.expires_at), text=True)
        logger.info("authenticated user=%s remote=%s", conn.user, conn.remote)
        return True

    async def _deny(self, conn: HubConnection, code: int, reason: str, detail: str) -> None:
        """Close a pending connection with ``code`` (the close reason is ``reason``: short,
        never the token) and log one line with ``detail``; returns once it is closed."""
        logger.info("authentication failed (%d) remote=%s: %s", code, conn.remote, detail)
        await self.node.close_connection(conn, code, reason, SLOW_CLOSE_TIMEOUT)

    async def _serve_frame(self, conn: HubConnection, frame: str | bytes) -> None:
        reply = await self._command(conn, frame)
        if reply is not None:
            await conn.send(reply, text=True)

    def _allow(self, conn: HubConnection) -> bool:
        """Token bucket: True if this command may run."""
        if self._rate <= 0:
            return True
        now = time.monotonic()
        conn.tokens = min(self._burst, conn.tokens + (now - conn.refilled) * self._rate)
        conn.refilled = now
        if conn.tokens >= 1.0:
            conn.tokens -= 1.0
            conn.strikes = 0
            return True
        conn.strikes += 1
        return False

    async def _command(self, conn: HubConnection, frame: str | bytes) -> bytes | None:
        """Run one client frame; return the reply frame."""
        if not self._allow(conn):
            if conn.strikes > self._burst:
                logger.warning("closing flooding connection user=%s", conn.user)
                self.node.detach(conn)
                self.node.close_connection(conn, CLOSE_RATE_LIMITED, "rate limit",
                                           SLOW_CLOSE_TIMEOUT)
                return None
            return self._error(ProtocolError("rate_limited", f"more than {self._rate:g} "
                                             "commands per second"))
        try:
            command = parse_command(frame)
            return await self._run(conn, command)
        except ProtocolError as exc:
            return self._error(exc)

    def _error(self, exc: ProtocolError) -> bytes:
        self.metrics.errors.labels(exc.code).inc()
        return error_frame(exc.code, exc.message, exc.id)

    async def _run(self, conn: HubConnection, cmd: Command) -> bytes:
        op, cid = cmd.op, cmd.id
        if op == "subscribe":
            channel = cmd.channel
            assert channel is not None
            self._check_subscribe(conn, channel, cid)
            subscribed = self.node.registry.channels_of.get(conn)
            if subscribed is None:  # closed meanwhile
                return ack_frame(cid)
            if channel not in subscribed:
                personal = 1 if conn.user is not None else 0
                if len(subscribed) - personal >= self.config.max_subscriptions:
                    raise ProtocolError("limit_exceeded", f"at most "
                                        f"{self.config.max_subscriptions} subscriptions", cid)
                try:
                    await self.node.subscribe(conn, channel)
                except BrokerUnavailable as exc:
                    raise ProtocolError("unavailable", str(exc), cid) from None
            return ack_frame(cid)
        if op == "unsubscribe":
            assert cmd.channel is not None
            if conn.user is None or cmd.channel != personal_channel(conn.user):
                self.node.unsubscribe(conn, cmd.channel)
            return ack_frame(cid)
        if op == "publish":
            assert cmd.channel is not None and cmd.data is not None
            if not channel_matches(cmd.channel, self.config.client_publish):
                raise ProtocolError("forbidden", "clients may not publish to this channel", cid)
            try:
                await self.node.publish(cmd.channel, cmd.data)
            except BrokerUnavailable as exc:
                raise ProtocolError("unavailable", str(exc), cid) from None
            return ack_frame(cid)
        if op == "ping":
            return pong_frame(cid)
        if op == "connect":  # a pending connection's connect never gets here
            raise ProtocolError("bad_request", "already authenticated"
                                if self.config.jwt_secret is not None
                                else "authentication is off", cid)
        assert op == "refresh" and cmd.token is not None
        return self._refresh(conn, cmd.token, cid)

    def _check_subscribe(self, conn: HubConnection, channel: str, cid: object) -> None:
        if channel.startswith("user:"):
            if conn.user is None or channel != personal_channel(conn.user):
                raise ProtocolError("forbidden", "the personal channel of another user", cid)
        elif channel.startswith("private:") and not channel_matches(channel, conn.private):
            raise ProtocolError("forbidden", "the token does not grant this private "
                                "channel", cid)

    def _refresh(self, conn: HubConnection, token: str, cid: object) -> bytes:
        secret = self.config.jwt_secret
        if secret is None:
            raise ProtocolError("bad_request", "authentication is off; nothing to refresh", cid)
        try:
            identity = verify_token(token, secret)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc), cid) from None
        if identity.user != conn.user:
            raise ProtocolError("forbidden", "the token is for another user", cid)
        self._apply_identity(conn, identity)
        # The new token's channels claim applies from now: drop private channels it revokes.
        for channel in list(self.node.registry.channels_of.get(conn, ())):
            if channel.startswith("private:") and not channel_matches(channel, conn.private):
                self.node.unsubscribe(conn, channel)
        return ack_frame(cid)


async def serve_until_signal(config: Config, reuse_port: bool = False) -> int:
    """Run a hub until SIGTERM or SIGINT, then stop it in order. Returns the exit code 0.

    Raises :class:`ConfigError` when the hub cannot start listening (see :meth:`Hub.start`).
    """
    loop = asyncio.get_running_loop()
    hub = Hub(config)
    await hub.start(reuse_port=reuse_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received")
    await hub.stop()
    return 0


def run(config: Config, *, reuse_port: bool = False) -> int:
    """Run one hub process until SIGTERM/SIGINT; returns the exit code (0).

    Uses uvloop when it is installed (the ``hub[uvloop]`` extra). ``reuse_port`` sets
    SO_REUSEPORT so that several processes share the port (``hub serve --workers N``,
    ``--share-port``). Raises :class:`ConfigError` when the hub cannot start listening.
    """
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    # Outside the except block: an error of the server must not carry the ImportError as
    # its context ("No module named 'uvloop'" in every traceback).
    return runner(serve_until_signal(config, reuse_port))
