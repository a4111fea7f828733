"""The hub process, lifecycle only: build the parts, serve, answer the probes, stop in order.

Paths on the one port: ``/ws`` (the WebSocket endpoint, :mod:`hub.handshake`), ``GET
/healthz`` (200 while the process runs), ``GET /readyz`` (200 while the broker is connected,
lags at most ``--max-lag`` seconds behind Redis, and the process is not stopping, else 503),
``GET /metrics`` (Prometheus text), with ``--demo`` ``GET /demo`` and ``GET /hub.js`` (the
chat page and the JS client, :mod:`hub.demo`), anything else 404. With ``--metrics-port``, a
second listener answers ``/metrics``, ``/healthz`` and ``/readyz`` (plain HTTP, its own accept
queue, so probes do not wait behind the public port), and ``/metrics`` on the main port
answers 404. With ``--api-port`` (and ``--api-key``), a third listener serves the HTTP
server API (:mod:`hub.api`, aiohttp, docs/api.md), started after the node.

Shutdown (SIGTERM or SIGINT), in order: the HTTP API stops listening and lets its requests
in flight finish (at most ``--shutdown-timeout`` seconds); ``/readyz`` turns 503 and the
listening socket closes; the process's presence entries are removed and their leaves
announced; every connection gets close code 1001 (going away); connections that have not
closed within
``--shutdown-timeout`` seconds are aborted; the broker link closes; the process exits 0.
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import __version__
from .auth import origin_problems
from .brokers import create_broker
from .channels import ChannelRules
from .config import Config, address_error
from .connection import HubConnection, limit_requests
from .demo import ASSETS, asset, demo_channels
from .exceptions import ConfigError
from .handshake import Handshake
from .history import create_history
from .keepalive import Keepalive
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .node import Node
from .oslimits import AcceptErrors
from .presence import create_presence
from .protocol import CLOSE_GOING_AWAY
from .session import Sessions

__all__ = ["Hub", "run"]

logger = logging.getLogger("hub.server")

#: Seconds the peer has to answer our close frame before the TCP connection is dropped.
CLOSE_TIMEOUT = 5.0

#: Seconds the whole opening handshake may take beyond --handshake-timeout: the hub's own
#: work before the 101 (the personal channel's subscription waits up to 5 s for Redis).
OPEN_MARGIN = 10.0
#: The WebSocket port's accept queue (listen(2) backlog; the kernel caps it at
#: net.core.somaxconn, 4096 on current Linux).
LISTEN_BACKLOG = 4096


class Hub:
    """One hub process: builds the broker, node, sessions and handshake from ``config``,
    each given only the options it uses, and runs the WebSocket server around them.

    ``metrics`` defaults to a fresh :class:`Metrics` registry. Implements
    :class:`hub.connection.ConnectionOwner` for its connections.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        client_publish, namespaces = config.client_publish, dict(config.namespaces)
        if config.demo:  # the page's rooms: demo:<room>, unless the file defines "demo"
            client_publish, namespaces = demo_channels(client_publish, namespaces)
        rules = ChannelRules(client_publish, namespaces, config.channels)
        keeps_history = rules.keeps_history
        broker = create_broker(config.redis_url, cluster=config.redis_cluster,
                               prefix=config.redis_prefix, probe_interval=config.probe_interval,
                               probe_timeout=config.probe_timeout, history=keeps_history,
                               presence=rules.join_leave)
        history = None
        if rules.any_history:
            history = create_history(config.redis_url, cluster=config.redis_cluster,
                                     prefix=config.redis_prefix, timeout=config.probe_timeout,
                                     on_publish=getattr(broker, "inject", None))
        presence = None
        if rules.any_presence:
            presence = create_presence(config.redis_url, cluster=config.redis_cluster,
                                       prefix=config.redis_prefix, timeout=config.probe_timeout)
        self.node = Node(broker, self.metrics, max_payload_bytes=config.max_payload_bytes,
                         max_lag=config.max_lag, history=history, rules=rules,
                         presence=presence, version=__version__)
        self.sessions = Sessions(self.node, rules, self.metrics,
                                 jwt_secret=config.jwt_secret,
                                 auth_timeout=config.auth_timeout,
                                 rate_limit=config.rate_limit,
                                 max_subscriptions=config.max_subscriptions,
                                 max_connections_per_user=config.max_connections_per_user)
        self.handshake = Handshake(self.node, self.sessions, self.metrics,
                                   allowed_origin=config.allowed_origin,
                                   trusted_proxy=config.trusted_proxy,
                                   jwt_secret=config.jwt_secret,
                                   max_connections=config.max_connections,
                                   max_connections_per_user=config.max_connections_per_user,
                                   max_pending_handshakes=config.max_pending_handshakes)
        # Count TCP connections from handshake to connection_lost, not registry entries, so
        # that a connection being closed still counts until it is really gone.
        self.metrics.connections.set_function(lambda: self.handshake.open_connections)
        self.metrics.handshakes_in_progress.set_function(lambda: self.handshake.in_progress)
        self.stopping = False
        self.server: Any = None
        self.metrics_server: Any = None
        self.api: Any = None  # hub.api.ApiServer with --api-port (aiohttp imported then only)
        # --ping-interval: one timer pings every connection in batches (hub.keepalive), in
        # place of websockets' keepalive task per connection.
        self.keepalive = Keepalive(config.ping_interval) if config.ping_interval else None
        self._connection_class = type("HubConnection", (HubConnection,), {
            "owner": self, "keepalive_timer": self.keepalive, "frame_rate": config.max_frame_rate,
            "frame_burst": 2 * config.max_frame_rate,
            "request_timeout": config.handshake_timeout})

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
        if cfg.demo:
            for path, file in ASSETS.items():  # read now: a broken install fails at start
                try:
                    asset(path)
                except OSError as exc:
                    raise ConfigError(f"--demo: cannot read {file.name} of the hub.demo "
                                      f"package ({exc.strerror or exc}); reinstall hub") from None
        limit_requests(cfg.max_request_headers, cfg.max_header_line_bytes)
        AcceptErrors(self.metrics.accept_errors).install(asyncio.get_running_loop())
        # serve() hands our create_connection subclass to these callbacks; its signature
        # only says ServerConnection, hence the ignores.
        try:
            self.server = await serve(
                self.sessions.serve,  # type: ignore[arg-type]
                cfg.host, cfg.port,
                create_connection=self._connection_class,
                process_request=self._process_request,  # type: ignore[arg-type]
                process_response=self._process_response,  # type: ignore[arg-type]
                compression="deflate" if cfg.compression == "deflate" else None,
                max_size=cfg.max_message_bytes,
                ping_interval=None,  # self.keepalive pings (HubConnection.start_keepalive)
                ping_timeout=None,
                # The client has --handshake-timeout for the TLS handshake and then for its
                # request (HubConnection.request_timeout); the whole handshake, with the
                # personal channel's subscription (up to 5 s), gets OPEN_MARGIN more.
                open_timeout=cfg.handshake_timeout + OPEN_MARGIN,
                ssl_handshake_timeout=cfg.handshake_timeout if tls else None,
                close_timeout=CLOSE_TIMEOUT,
                # The write buffer's high-water mark is the slow-consumer limit: the transport
                # calls pause_writing() when a connection passes it (websockets' send() also
                # waits for the buffer to fall below it).
                write_limit=cfg.max_buffer_bytes,
                server_header=None,
                # SO_REUSEADDR is asyncio's and uvloop's default on POSIX: TIME-WAIT
                # connections of an earlier hub on the port do not block the bind.
                reuse_port=reuse_port or None,
                # asyncio's default accept queue is 100: a reconnect storm of thousands of
                # clients overflowed it (SYN retries, connect timeouts; bench.storm).
                backlog=LISTEN_BACKLOG,
                ssl=tls,
                start_serving=False,  # bound, so every configuration error is behind us
            )
        except OSError as exc:  # in use, not a local address, a host that does not resolve
            raise address_error(cfg.host, cfg.port, exc) from None
        if cfg.metrics_port is not None:
            try:
                self.metrics_server = await self._serve_metrics(cfg.metrics_port, reuse_port)
            except OSError as exc:
                self.server.close()
                raise address_error(cfg.host, cfg.metrics_port, exc) from None
        if cfg.api_port is not None:
            self._bind_api(reuse_port)
        if cfg.jwt_secret is None:
            logger.warning("authentication is OFF (no --jwt-secret): any client may connect "
                           "and claim any user id with ?user=; never run this in production")
        elif len(cfg.jwt_secret.encode()) < 32:
            logger.warning("--jwt-secret is shorter than 32 bytes; HS256 wants at least 32")
        self._warn_origins()
        await self.node.start()
        if self.api is not None:
            await self.api.start()
        if self.keepalive is not None:
            self.keepalive.start()
        await self.server.start_serving()
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        logger.info("listening on %s:%d%s (%s broker, %s loop)", cfg.host, self.port,
                    " with TLS" if tls else "", type(self.node.broker).__name__, loop)
        if self.metrics_server is not None:
            await self.metrics_server.start_serving()
            logger.info("metrics and probes on http://%s:%d (/metrics, /healthz, /readyz)",
                        cfg.host, self.metrics_port)
        if self.api is not None:
            logger.info("HTTP API on http://%s:%d/api/ (%d keys)", cfg.api_host, self.api.port,
                        len(cfg.api_key))

    def _bind_api(self, reuse_port: bool) -> None:
        """Build the ``--api-port`` server and bind its socket (it serves once the node has
        started); on a bind error undo what :meth:`start` did so far and raise
        :class:`ConfigError`."""
        from .api import ApiServer

        cfg = self.config
        assert cfg.api_port is not None
        api = ApiServer(self.node, self.metrics, keys=cfg.api_key,
                        max_body_bytes=cfg.api_max_body_bytes,
                        max_inflight=cfg.api_max_inflight, version=__version__,
                        shutdown_timeout=cfg.shutdown_timeout)
        try:
            api.bind(cfg.api_host, cfg.api_port, reuse_port=reuse_port)
        except OSError as exc:
            self.server.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
            raise address_error(cfg.api_host, cfg.api_port, exc, "--api-host") from None
        self.api = api
        if any(len(key.encode()) < 16 for key in cfg.api_key):
            logger.warning("an --api-key is shorter than 16 characters; use long random keys "
                           "(openssl rand -hex 32)")

    async def _serve_metrics(self, port: int, reuse_port: bool) -> Any:
        """The ``--metrics-port`` listener, bound but not serving: a websockets server
        whose ``process_request`` answers every request (no upgrade ever happens), plain
        HTTP, SO_REUSEPORT when the main port has it (``--workers``: each worker answers
        for itself)."""
        async def never(conn: ServerConnection) -> None:  # every request gets a response
            pass

        return await serve(never, self.config.host, port,
                           process_request=self._process_private_request,
                           open_timeout=self.config.handshake_timeout,
                           server_header=None, reuse_port=reuse_port or None,
                           start_serving=False)

    @property
    def metrics_port(self) -> int | None:
        """The bound ``--metrics-port`` (useful with 0), or None without one."""
        if self.metrics_server is None:
            return None
        port: int = self.metrics_server.sockets[0].getsockname()[1]
        return port

    @property
    def api_port(self) -> int | None:
        """The bound ``--api-port`` (useful with 0), or None without one."""
        return None if self.api is None else int(self.api.port)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """The ordered shutdown of the module docstring. Never raises."""
        self.stopping = self.handshake.stopping = True
        if self.api is not None:
            try:
                await asyncio.wait_for(self.api.stop(), self.config.shutdown_timeout + 1)
                logger.info("HTTP API stopped")
            except TimeoutError:
                logger.warning("the HTTP API did not stop in time")
            except Exception:  # stop() never raises: the WebSocket side must still close
                logger.exception("the HTTP API failed to stop")
        self.server.close(close_connections=False)
        if self.metrics_server is not None:
            self.metrics_server.close()
        # presence first: the leaves of this process's connections go out while the broker
        # still runs, instead of waiting for another process's sweep
        await self.node.leave_all()
        conns = [*self.node.connections(), *self.sessions.pending]
        logger.info("shutting down: closing %d connections with 1001", len(conns))
        timeout = self.config.shutdown_timeout
        tasks = [self.node.close_connection(c, CLOSE_GOING_AWAY, "server shutting down",
                                            timeout) for c in conns if not c.dropping]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 1)
        for conn in list(self.server.connections):
            conn.transport.abort()
        if self.keepalive is not None:
            self.keepalive.stop()
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

    # -- HTTP paths ------------------------------------------------------------------------

    def _process_request(self, conn: HubConnection, request: Request) -> Response | None:
        """Answer the probe paths (and ``/metrics`` without ``--metrics-port``); hand every
        other request to :class:`Handshake` (None lets a ``/ws`` handshake upgrade)."""
        path = request.path.partition("?")[0]
        if path == "/metrics" and self.config.metrics_port is not None:
            return conn.respond(http.HTTPStatus.NOT_FOUND, "not found; /metrics is on "
                                "--metrics-port\n")
        response = self._probe(conn, path)
        if response is not None:
            return response
        if self.config.demo:
            found = asset(path)
            if found is not None:
                return self._file(conn, found[0].content_type, found[1])
        return self.handshake.request(conn, request)

    @staticmethod
    def _file(conn: ServerConnection, content_type: str, body: bytes) -> Response:
        """A ``200`` carrying ``body`` as ``content_type``, not to be cached without
        asking again (a restarted hub may serve a newer page)."""
        response = conn.respond(http.HTTPStatus.OK, "")
        response.headers = Headers([("Content-Type", content_type),
                                    ("Content-Length", str(len(body))),
                                    ("Cache-Control", "no-cache"),
                                    ("X-Content-Type-Options", "nosniff"),
                                    ("Connection", "close")])
        response.body = body
        return response

    def _process_private_request(self, conn: ServerConnection, request: Request) -> Response:
        """Every request of the ``--metrics-port`` listener: the probe paths and
        ``/metrics``, else 404."""
        response = self._probe(conn, request.path.partition("?")[0])
        if response is None:
            return conn.respond(http.HTTPStatus.NOT_FOUND,
                                "not found; this port serves /metrics, /healthz, /readyz\n")
        return response

    def _probe(self, conn: ServerConnection, path: str) -> Response | None:
        """The answer of ``/healthz``, ``/readyz`` or ``/metrics``; None for another path."""
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
        return None

    async def _process_response(self, conn: HubConnection, request: Request,
                                response: Response) -> Response | None:
        return await self.handshake.response(conn, request, response)

    # -- ConnectionOwner -------------------------------------------------------------------

    def accepted(self, conn: HubConnection) -> None:
        self.handshake.admit(conn)

    def handshake_over(self, conn: HubConnection, reason: str | None) -> None:
        self.handshake.settled(conn, reason)

    def forget(self, conn: HubConnection) -> None:
        """Called once the TCP connection is gone, whatever happened before."""
        self.sessions.forget(conn)
        self.handshake.release(conn)
        self.node.detach(conn)

    def slow_consumer(self, conn: HubConnection) -> None:
        self.node.drop_slow_consumer(conn)

    def frame_flood(self, conn: HubConnection) -> None:
        self.sessions.frame_flood(conn)


async def serve_until_signal(config: Config, reuse_port: bool = False) -> int:
    """Run a hub until SIGTERM or SIGINT, then stop it in order. Returns the exit code 0.

    Raises :class:`ConfigError` when the hub cannot start listening (see :meth:`Hub.start`).
    """
    loop = asyncio.get_running_loop()
    hub = Hub(config)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start stops it right after
        loop.add_signal_handler(sig, stop.set)
    await hub.start(reuse_port=reuse_port)
    await stop.wait()
    logger.info("signal received")
    await hub.stop()
    return 0


def loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """The function that runs the event loop for ``--loop`` ``choice``: ``asyncio.run`` for
    ``asyncio``, ``uvloop.run`` for ``uvloop``, and for ``auto`` uvloop when it is installed
    (the ``hub-realtime[uvloop]`` extra), else asyncio. Raises :class:`ConfigError` for
    ``uvloop`` when uvloop is not installed."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop uvloop: uvloop is not installed (pip install "
                              "'hub-realtime[uvloop]')") from None
        return asyncio.run
    runner: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return runner


def run(config: Config, *, reuse_port: bool = False) -> int:
    """Run one hub process until SIGTERM/SIGINT; returns the exit code (0).

    The event loop is the one of ``config.loop`` (:func:`loop_runner`). ``reuse_port`` sets
    SO_REUSEPORT so that several processes share the port (``hub serve --workers N``,
    ``--share-port``). Raises :class:`ConfigError` when the hub cannot start listening or
    the loop asked for is not installed.
    """
    # The runner is chosen outside any except block: an error of the server must not carry
    # an ImportError as its context ("No module named 'uvloop'" in every traceback).
    return loop_runner(config.loop)(serve_until_signal(config, reuse_port))
