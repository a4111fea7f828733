"""The HTTP server API on its own listener (aiohttp): routes, authentication, answers.

``POST /api/publish``, ``/api/broadcast``, ``/api/history``, ``/api/batch``, ``/api/info``
take and answer JSON objects; ``GET /api/openapi.json`` serves the OpenAPI 3.1 document
(docs/openapi.json, no key needed). Every other request needs ``Authorization: Bearer <key>``
with one of the configured keys (compared in constant time with every one of them). Errors are
``{"error":{"code":..,"message":..}}`` (:mod:`hub.api.errors`). docs/api.md is the contract.

Why a second listener: websockets' HTTP parser refuses a request with a body, so a ``POST``
cannot be served on the WebSocket port. The :class:`ApiServer` runs in the hub's own event
loop and calls the :class:`~hub.node.Node` directly; it is given the node, the metrics and the
options it uses, never the Config.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from ..brokers.base import StreamPosition
from ..control import encode
from ..exceptions import BrokerUnavailable
from ..metrics import Metrics
from ..node import Node
from ..presence.base import ClientInfo
from ..presence.base import PresenceStats as PresenceStats_
from ..presences import Presences
from ..protocol import history_items
from .commands import (
    Batch,
    Broadcast,
    Channels,
    Command,
    Disconnect,
    History,
    Info,
    Presence,
    PresenceStats,
    Publish,
    Subscribe,
    Unsubscribe,
    parse_body,
    parse_command,
)
from .errors import ApiError, error_body

__all__ = ["ENDPOINTS", "OPENAPI", "ApiServer"]

logger = logging.getLogger("hub.api")

#: The POST endpoints, each ``/api/<name>``.
ENDPOINTS = ("publish", "broadcast", "history", "presence", "presence_stats", "subscribe",
             "unsubscribe", "disconnect", "channels", "batch", "info")
#: The OpenAPI document as served (the package's copy of docs/openapi.json).
OPENAPI: bytes = importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()

_JSON = "application/json"


class _OneLinePerInterval(logging.Filter):
    """aiohttp's connection-level errors (a malformed request, a peer gone mid-body) as one
    line without traceback, at most one per :data:`LOG_INTERVAL` seconds: hostile clients
    cost no log flood."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -float("inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:  # aiohttp's debug lines (--log-level debug)
            return True
        now = time.monotonic()
        if now - self.last < LOG_INTERVAL:
            self.dropped += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = f"HTTP API: {record.getMessage()}{f': {exc}' if exc else ''}" + (
            f" ({self.dropped} more since the last such line)" if self.dropped else "")
        record.args, record.exc_info, record.exc_text = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.last, self.dropped = now, 0
        return True


#: Seconds between two log lines about malformed requests (the count in between).
LOG_INTERVAL = 10.0
_QUIET = logging.getLogger("hub.api.http")
_QUIET.addFilter(_OneLinePerInterval())
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiServer:
    """The HTTP API of one hub process.

    ``node`` is the started node (its ``rules`` say which channels keep a history);
    ``metrics`` receives ``hub_api_requests_total`` and ``hub_api_request_seconds``;
    ``keys`` are the ``--api-key`` values (any one of them is accepted: rotation);
    ``max_body_bytes`` is the largest request body (413 past it); ``max_inflight`` the
    requests run at once (one more: 429 ``rate_limited``, ``Retry-After: 1``); ``version`` is
    reported by ``/api/info``; ``shutdown_timeout`` is how long :meth:`stop` lets requests
    in flight end.
    """

    def __init__(self, node: Node, metrics: Metrics, *, keys: Sequence[str],
                 max_body_bytes: int, version: str, max_inflight: int = 256,
                 shutdown_timeout: float = 5.0) -> None:
        if not keys:
            raise ValueError("the API needs at least one key")
        self.node = node
        self.metrics = metrics
        self._keys = tuple(k.encode() for k in keys)
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self._inflight = 0  # requests of the POST endpoints being run
        self.version = version
        self.max_payload_bytes = node.max_payload_bytes
        self.shutdown_timeout = shutdown_timeout
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[self._middleware])
        for name in ENDPOINTS:
            self.app.router.add_post(f"/api/{name}", self._endpoint, name=name)
        self.app.router.add_get("/api/openapi.json", self._openapi, name="openapi",
                                allow_head=False)
        self.app.on_response_prepare.append(_server_header)
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Bind and listen on ``host:port`` (SO_REUSEPORT with ``reuse_port``: ``--workers``)
        without serving yet, so that a bad address fails before anything starts. Raises
        OSError (socket.gaierror for a host that does not resolve)."""
        family, type_, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    async def start(self) -> None:
        """Serve on the socket of :meth:`bind`."""
        assert self._sock is not None, "bind() first"
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                               shutdown_timeout=self.shutdown_timeout, logger=_QUIET)
        await runner.setup()
        self._site = web.SockSite(runner, self._sock)
        self._runner = runner
        await self._site.start()

    @property
    def port(self) -> int:
        """The bound port (useful with 0)."""
        assert self._sock is not None, "bind() first"
        port: int = self._sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (``shutdown_timeout``), close; also
        closes a socket bound but never served."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        elif self._sock is not None:
            self._sock.close()

    # -- the pipeline: metrics, errors, authentication -------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler
                          ) -> web.StreamResponse:
        start = time.perf_counter()
        route = request.match_info.route.name
        endpoint = route if route is not None else "other"
        try:
            response = await self._answer(request, handler)
        except ApiError as exc:
            response = self._error(exc)
        except web.HTTPException as exc:  # aiohttp's own: a body over client_max_size...
            response = self._error(_from_http(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("API request %s %s failed", request.method, request.path[:128])
            response = self._error(ApiError("internal", "internal error"))
        self.metrics.api_requests.labels(endpoint, str(response.status)).inc()
        self.metrics.api_seconds.labels(endpoint).observe(time.perf_counter() - start)
        return response

    async def _answer(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        missing = request.match_info.http_exception
        if isinstance(missing, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(missing.allowed_methods))
            response = self._error(ApiError("method_not_allowed", f"{request.method[:16]} "
                                            f"is not allowed here; use {allowed}"))
            response.headers["Allow"] = allowed
            return response
        if missing is not None:
            raise ApiError("not_found", "no such path; see /api/openapi.json")
        if request.match_info.route.name != "openapi":
            self._authenticate(request)
        return await handler(request)

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError("unauthorized", "send Authorization: Bearer <key>")
        token = given.strip().encode("utf-8", "replace")
        match = False
        for key in self._keys:  # every key, whichever matches: no early exit
            match |= hmac.compare_digest(token, key)
        if not match:
            raise ApiError("unauthorized", "the key is not valid")

    @staticmethod
    def _error(error: ApiError) -> web.Response:
        response = web.Response(status=error.status, body=error_body(error), content_type=_JSON)
        if error.code == "unauthorized":
            response.headers["WWW-Authenticate"] = 'Bearer realm="hub"'
        elif error.code == "rate_limited":
            response.headers["Retry-After"] = "1"
        return response

    # -- handlers --------------------------------------------------------------------------

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI, content_type=_JSON)

    async def _endpoint(self, request: web.Request) -> web.Response:
        if self._inflight >= self.max_inflight:
            raise ApiError("rate_limited", f"{self.max_inflight} requests are running "
                           "(--api-max-inflight); retry later")
        self._inflight += 1
        try:
            return await self._run(request)
        finally:
            self._inflight -= 1

    async def _run(self, request: web.Request) -> web.Response:
        method = request.match_info.route.name or ""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("too_large", f"the body is over --api-max-body-bytes "
                           f"({self.max_body_bytes})") from None
        command = parse_command(method, parse_body(body),
                                max_payload_bytes=self.max_payload_bytes, body=body)
        reply = await self.execute(command)
        return web.Response(body=orjson.dumps(reply), content_type=_JSON)

    async def execute(self, command: Command) -> dict[str, Any]:
        """The reply object of ``command``; raises :class:`ApiError`."""
        match command:
            case Publish(channel, data, key):
                return await self._publish(channel, data, key)
            case Broadcast(channels, data):
                return await self._broadcast(channels, data)
            case History(channel, limit, since):
                return await self._history(channel, limit, since)
            case Presence(channel):
                clients = await self._presence(channel).clients(channel)
                return {"clients": [{"client": c.client, "user": c.user} for c in clients]}
            case PresenceStats(channel):
                stats = await self._presence(channel).stats(channel)
                return {"clients": stats.clients, "users": stats.users}
            case Subscribe(user, channel):
                return await self._control(encode("subscribe", user=user, channel=channel))
            case Unsubscribe(user, channel):
                return await self._control(encode("unsubscribe", user=user, channel=channel))
            case Disconnect(user, code, reason):
                return await self._control(encode("disconnect", user=user, code=code,
                                                  reason=reason))
            case Channels(pattern):
                return await self._channels(pattern)
            case Info():
                return self._info()
            case Batch(commands):
                replies: list[dict[str, Any]] = []
                for cmd in commands:  # in order: a history after a publish sees it
                    try:
                        replies.append(await self.execute(cmd))
                    except ApiError as exc:
                        replies.append({"error": exc.to_json()})
                return {"replies": replies}
        raise AssertionError(command)  # unreachable: every command type is matched above

    async def _publish(self, channel: str, data: bytes, key: str | None) -> dict[str, Any]:
        if key is not None and not self.node.keeps_history(channel):
            raise ApiError("no_history", "idempotency_key needs a history channel")
        try:
            result = await self.node.publish(channel, data, key)
        except BrokerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        if isinstance(result, StreamPosition):
            return {"offset": result.offset, "epoch": result.epoch}
        return {}

    async def _broadcast(self, channels: tuple[str, ...], data: bytes) -> dict[str, Any]:
        async def one(channel: str) -> dict[str, Any]:
            try:
                return {"channel": channel, **await self._publish(channel, data, None)}
            except ApiError as exc:
                return {"channel": channel, "error": exc.to_json()}

        results = await asyncio.gather(*(one(c) for c in channels))
        if all("error" in r for r in results):  # nothing published: a retry is safe
            raise ApiError("unavailable", f"no channel took the message: "
                           f"{results[0]['error']['message']}")
        return {"results": results}

    def _presence(self, channel: str) -> _PresenceReader:
        """The reader of ``channel``'s presence; ApiError ``no_presence`` without one."""
        presences = self.node.presences
        if presences is None or not presences.keeps_presence(channel):
            raise ApiError("no_presence", "the channel keeps no presence")
        return _PresenceReader(presences)

    async def _history(self, channel: str, limit: int, since: StreamPosition | None
                       ) -> dict[str, Any]:
        streams = self.node.streams
        if streams is None or not streams.keeps_history(channel):
            raise ApiError("no_history", "the channel keeps no history")
        try:
            read = await streams.read(channel, since=since, limit=limit)
        except Exception as exc:
            raise ApiError("unavailable", f"history unavailable: {exc}") from None
        messages: list[dict[str, Any]] = []
        for offset, data, sender in history_items(read.publications):
            message = {"offset": offset, "data": orjson.Fragment(data)}
            if sender is not None:  # a client publish: who sent it
                message["from"] = orjson.Fragment(sender)
            messages.append(message)
        return {"offset": read.position.offset, "epoch": read.position.epoch,
                "messages": messages}

    async def _control(self, payload: bytes) -> dict[str, Any]:
        """Publish a control message for every process (:mod:`hub.control`); the reply says
        how many hub processes received it."""
        try:
            reached = await self.node.control.send(payload)
        except BrokerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        return {"processes": reached}

    async def _channels(self, pattern: str | None) -> dict[str, Any]:
        try:
            counts, missing, truncated = await self.node.control.channels(pattern)
        except BrokerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        return {"channels": [{"channel": name, "subscribers": counts[name]}
                             for name in sorted(counts)],
                "missing": [info.name for info in missing], "truncated": truncated}

    def _info(self) -> dict[str, Any]:
        node = self.node
        nodes = node.control.nodes()
        return {"version": self.version, "node": node.control.node_id, "pid": os.getpid(),
                "broker_connected": node.broker.connected, "ready": node.ready,
                "connections": sum(n.connections for n in nodes),
                "subscriptions": sum(n.subscriptions for n in nodes),
                "nodes": [n.to_json() for n in nodes]}


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: hub`` instead of aiohttp's, which names the Python and aiohttp versions."""
    response.headers["Server"] = "hub"


def _from_http(exc: web.HTTPException) -> ApiError:
    """The API error of an HTTP exception aiohttp raised on its own."""
    if exc.status == 413:
        return ApiError("too_large", "the body is over --api-max-body-bytes")
    if exc.status == 404:
        return ApiError("not_found", "no such path")
    if exc.status == 405:
        return ApiError("method_not_allowed", "method not allowed")
    if 400 <= exc.status < 500:
        return ApiError("bad_request", exc.reason or "bad request")
    return ApiError("internal", exc.reason or "internal error")


class _PresenceReader:
    """Presence reads for the API: a store error is ``unavailable``."""

    def __init__(self, presences: Presences) -> None:
        self.presences = presences

    async def clients(self, channel: str) -> list[ClientInfo]:
        try:
            return await self.presences.clients(channel)
        except Exception as exc:
            raise ApiError("unavailable", f"presence unavailable: {exc}") from None

    async def stats(self, channel: str) -> PresenceStats_:
        try:
            return await self.presences.stats(channel)
        except Exception as exc:
            raise ApiError("unavailable", f"presence unavailable: {exc}") from None
