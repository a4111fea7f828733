"""The control channel: commands that must reach every hub process, and their heartbeats.

Every process subscribes, through its broker and for its whole life, to two reserved channels
that no client can name (``$`` is not a channel character, docs/protocol.md section 5):

* :data:`CONTROL_CHANNEL` ``$control`` (Redis channel ``<prefix>$control``, on the shard of
  that name with several Redis URLs, ``SPUBLISH`` in a Redis Cluster): commands for every
  process, and every process's heartbeat;
* ``$node:<node id>`` (:func:`node_channel`): the replies addressed to one process.

A control message is one JSON object with ``"v":1`` and a ``type`` (docs/control-format.md is
the contract; :func:`encode` builds them, for the hub and for :class:`hub.Publisher`):

``heartbeat``
    ``{"v":1,"type":"heartbeat","node":"<id>","name":"<host>:<pid>","version":..,"pid":..,
    "host":..,"connections":N,"subscriptions":N,"channels":N,"uptime":S,"ready":true}``,
    every :data:`HEARTBEAT_INTERVAL` seconds; a process unheard of for :data:`NODE_TTL`
    seconds is forgotten. ``{"v":1,"type":"bye","node":"<id>"}`` at an ordered shutdown
    forgets it at once. A process that hears a node it did not know answers with its own
    heartbeat within :data:`HELLO_DELAY` seconds, so a new process knows the others at once.
``disconnect``
    ``{"v":1,"type":"disconnect","user":"alice","code":4003,"reason":"banned"}``: every
    connection of the user is closed with ``code`` (4000-4999, default
    :data:`~hub.protocol.CLOSE_DISCONNECTED`) and ``reason``.
``subscribe`` / ``unsubscribe``
    ``{"v":1,"type":"subscribe","user":"alice","channel":"news"}``: every connection of the
    user is subscribed (told with a ``subscribed`` frame) or unsubscribed (an
    ``unsubscribed`` frame with reason ``server``).
``channels`` / ``channels_reply``
    ``{"v":1,"type":"channels","request":"<id>","reply_to":"<node id>","pattern":"chat:*"}``
    asks every process for its channels with local subscribers matching a glob pattern;
    each answers on ``$node:<reply_to>`` with ``{"v":1,"type":"channels_reply","request":..,
    "node":..,"channels":{"chat:a":3},"truncated":false}`` (at most :data:`MAX_CHANNELS`).

A malformed or unknown message is ignored (logged at debug level): anyone who can PUBLISH on
the Redis can send control messages, exactly as they can publish to any channel, so the Redis
must be as private as the hub's backends. Delivery is the broker's, at most once: a process
whose Redis link is down at that moment misses a command (the caller is told how many
processes the PUBLISH reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .brokers.base import Publication
from .connection import HubConnection, send_text
from .exceptions import BrokerUnavailable, ProtocolError
from .protocol import CLOSE_DISCONNECTED, check_channel, subscribed_frame, unsubscribed_frame

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "CHANNELS_TIMEOUT",
    "CONTROL_CHANNEL",
    "HEARTBEAT_INTERVAL",
    "HELLO_DELAY",
    "MAX_CHANNELS",
    "MAX_REASON_BYTES",
    "NODE_TTL",
    "Control",
    "NodeInfo",
    "check_close",
    "encode",
    "node_channel",
]

logger = logging.getLogger("hub.control")

#: The hub channel every process subscribes for commands and heartbeats.
CONTROL_CHANNEL = "$control"
#: Seconds between two heartbeats of a process.
HEARTBEAT_INTERVAL = 3.0
#: Seconds after its last heartbeat that a process is no longer listed by ``/api/info``.
NODE_TTL = 10.0
#: Most seconds before a process answers the first heartbeat of a process it did not know.
HELLO_DELAY = 0.2
#: Seconds ``/api/channels`` waits for the other processes' replies.
CHANNELS_TIMEOUT = 2.0
#: Most channels one process reports to ``/api/channels`` (then ``truncated``).
MAX_CHANNELS = 10_000
#: Most bytes of a close reason (RFC 6455 section 5.5: a control frame's payload is at most
#: 125 bytes, two of them the code).
MAX_REASON_BYTES = 123
VERSION = 1


def node_channel(node_id: str) -> str:
    """The reserved hub channel of the replies to process ``node_id``: ``$node:<id>``."""
    return "$node:" + node_id


def encode(type_: str, **fields: Any) -> bytes:
    """A control message: ``{"v":1,"type":type_, **fields}`` as JSON bytes."""
    return orjson.dumps({"v": VERSION, "type": type_, **fields})


def check_close(code: object, reason: object) -> tuple[int, str]:
    """``(code, reason)`` of a disconnect command: ``code`` an integer 4000-4999 (None: 4003),
    ``reason`` a string of at most :data:`MAX_REASON_BYTES` UTF-8 bytes (None: ``""``).
    Raises ValueError with the rule that was broken."""
    if code is None:
        code = CLOSE_DISCONNECTED
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        raise ValueError("code must be an integer from 4000 to 4999")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason.encode("utf-8", "surrogatepass")) > \
            MAX_REASON_BYTES:
        raise ValueError(f"reason must be a string of at most {MAX_REASON_BYTES} UTF-8 bytes")
    try:
        reason.encode()
    except UnicodeEncodeError:
        raise ValueError("reason must be valid Unicode (no lone surrogates)") from None
    return code, reason


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One live hub process as its last heartbeat (or, for this process, now) tells:
    ``node`` its id (a UUID hex), ``name`` ``<host>:<pid>``, ``uptime`` seconds,
    ``age`` seconds since that heartbeat (0 for this process)."""

    node: str
    name: str
    version: str
    pid: int
    host: str
    connections: int
    subscriptions: int
    channels: int
    uptime: float
    ready: bool
    age: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "name": self.name, "version": self.version, "pid": self.pid,
                "host": self.host, "connections": self.connections,
                "subscriptions": self.subscriptions, "channels": self.channels,
                "uptime": round(self.uptime, 3), "ready": self.ready,
                "age": round(self.age, 3)}


class Control:
    """The control channel of one process (see the module docstring).

    ``node`` is the process's node: its registry is what commands act on and heartbeats
    count, its broker carries the messages. ``version`` is reported in heartbeats. Call
    :meth:`start` once the broker started and :meth:`stop` at shutdown.
    """

    def __init__(self, node: Node, *, version: str) -> None:
        self.node = node
        self.version = version
        self.node_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.name = f"{self.host}:{os.getpid()}"
        self.channel = node_channel(self.node_id)
        self._started = time.monotonic()
        self._peers: dict[str, tuple[float, NodeInfo]] = {}  # id -> (monotonic seen, info)
        self._requests: dict[str, _Request] = {}
        self._task: asyncio.Task[None] | None = None
        self._hello: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe the two control channels and start the heartbeats (in the background:
        the broker keeps both channels wanted, so they are subscribed whenever its link is
        up)."""
        # Its own task, not one of the node's short background tasks: it runs until stop().
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hub-control")

    async def stop(self) -> None:
        """Stop the heartbeats and tell the other processes this one is gone. Never
        raises."""
        if self._hello is not None:
            self._hello.cancel()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.node.broker.publish(
                CONTROL_CHANNEL, encode("bye", node=self.node_id)), 1.0)
        except (BrokerUnavailable, TimeoutError):
            pass
        except Exception:  # a broker already stopping
            logger.debug("control: bye not sent", exc_info=True)
        for request in self._requests.values():
            if not request.done.done():
                request.done.set_result(None)

    async def _run(self) -> None:
        for channel in (CONTROL_CHANNEL, self.channel):
            # On BrokerUnavailable it stays wanted: subscribed when the link is up.
            with contextlib.suppress(BrokerUnavailable):
                await self.node.subscribe_reserved(channel)
        while True:
            await self.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL * random.uniform(0.9, 1.1))

    async def heartbeat(self) -> None:
        """Publish this process's heartbeat now (never raises for the broker)."""
        try:
            await self.node.broker.publish(CONTROL_CHANNEL,
                                           encode("heartbeat", **self._info_fields()))
        except BrokerUnavailable:
            pass  # the next one, once the link is back
        except Exception:  # never let the heartbeats stop
            logger.exception("control: heartbeat failed")

    # -- what the process knows ------------------------------------------------------------

    def info(self) -> NodeInfo:
        """This process, now."""
        registry = self.node.registry
        return NodeInfo(self.node_id, self.name, self.version, os.getpid(), self.host,
                        len(registry),
                        sum(len(c) for c in registry.channels_of.values()),
                        len(registry.by_channel), time.monotonic() - self._started,
                        self.node.ready)

    def _info_fields(self) -> dict[str, Any]:
        fields = self.info().to_json()
        del fields["age"]
        return fields

    def nodes(self) -> list[NodeInfo]:
        """Every live process: this one first, then those heard from within
        :data:`NODE_TTL` seconds, by name."""
        now = time.monotonic()
        for node_id in [n for n, (seen, _) in self._peers.items() if now - seen > NODE_TTL]:
            del self._peers[node_id]
        peers = sorted((_aged(info, now - seen) for seen, info in self._peers.values()),
                       key=lambda i: (i.name, i.node))
        return [self.info(), *peers]

    # -- commands (published for every process, this one included) ------------------------

    async def send(self, payload: bytes) -> int:
        """Publish the control message ``payload`` (:func:`encode`); returns the number of
        hub processes that received it. Raises :class:`BrokerUnavailable`."""
        return await self.node.broker.publish(CONTROL_CHANNEL, payload)

    async def channels(self, pattern: str | None, timeout: float = CHANNELS_TIMEOUT
                       ) -> tuple[dict[str, int], list[NodeInfo], bool]:
        """The channels with subscribers on any live process, each with its number of
        subscribers (connections) summed over the processes; ``pattern`` a glob
        (``fnmatch``: ``*``, ``?``, ``[...]``), None for every channel. Returns ``(channels,
        the processes that did not answer within timeout seconds, truncated)``. Raises
        :class:`BrokerUnavailable` when the request cannot be published."""
        own, truncated = self._local_channels(pattern)
        expected = {i.node: i for i in self.nodes()[1:]}
        if not expected:
            return own, [], truncated
        request_id = uuid.uuid4().hex
        request = _Request(set(expected), asyncio.get_running_loop().create_future())
        request.counts.update(own)
        request.truncated = truncated
        self._requests[request_id] = request
        try:
            await self.send(encode("channels", request=request_id, reply_to=self.node_id,
                                   pattern=pattern))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(request.done), timeout)
        finally:
            del self._requests[request_id]
        missing = [expected[n] for n in sorted(request.waiting)]
        return request.counts, missing, request.truncated

    def _local_channels(self, pattern: str | None) -> tuple[dict[str, int], bool]:
        counts: dict[str, int] = {}
        for channel, conns in self.node.registry.by_channel.items():
            if pattern is None or fnmatch.fnmatchcase(channel, pattern):
                if len(counts) >= MAX_CHANNELS:
                    return counts, True
                counts[channel] = len(conns)
        return counts, False

    # -- receiving -------------------------------------------------------------------------

    def receive(self, publication: Publication) -> None:
        """A message on a reserved channel (the node hands over every ``$`` channel's)."""
        try:
            message = orjson.loads(publication.payload)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or message.get("v") != VERSION:
            logger.debug("control: ignored %r", publication.payload[:200])
            return
        try:
            self._dispatch(message)
        except (KeyError, TypeError, ValueError) as exc:
            logger.debug("control: ignored %r: %s", publication.payload[:200], exc)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "heartbeat":
            self._heard(message)
        elif kind == "bye":
            self._peers.pop(_text(message["node"]), None)
        elif kind == "disconnect":
            code, reason = check_close(message.get("code"), message.get("reason"))
            self.disconnect_local(_text(message["user"]), code, reason)
        elif kind == "subscribe":
            self.subscribe_local(_text(message["user"]), _channel(message["channel"]))
        elif kind == "unsubscribe":
            self.unsubscribe_local(_text(message["user"]), _channel(message["channel"]))
        elif kind == "channels":
            self._answer_channels(message)
        elif kind == "channels_reply":
            self._channels_reply(message)
        else:
            raise ValueError("unknown type")

    def _heard(self, message: dict[str, Any]) -> None:
        node_id = _text(message["node"])
        if node_id == self.node_id:
            return
        info = NodeInfo(node_id, _text(message["name"]), _text(message["version"]),
                        int(message["pid"]), _text(message["host"]),
                        int(message["connections"]), int(message["subscriptions"]),
                        int(message["channels"]), float(message["uptime"]),
                        bool(message["ready"]))
        new = node_id not in self._peers
        now = time.monotonic()
        self._peers[node_id] = (now, info)
        if new:  # forget the processes gone meanwhile (every restart brings a new id)
            for gone in [n for n, (seen, _) in self._peers.items() if now - seen > NODE_TTL]:
                del self._peers[gone]
        if new and self._hello is None and self._task is not None:
            # Tell the newcomer about this process now rather than at the next heartbeat.
            loop = asyncio.get_running_loop()
            self._hello = loop.call_later(random.uniform(0, HELLO_DELAY), self._say_hello)

    def _say_hello(self) -> None:
        self._hello = None
        self.node.spawn(self.heartbeat())

    def disconnect_local(self, user: str, code: int, reason: str) -> int:
        """Close every local connection of ``user`` with ``code`` and ``reason``; returns
        how many."""
        conns = [c for c in self._connections(user) if not c.dropping]
        for conn in conns:
            self.node.disconnect(conn, code, reason)
        if conns:
            logger.info("disconnected user=%s: %d connections, code %d", user, len(conns),
                        code)
        return len(conns)

    def subscribe_local(self, user: str, channel: str) -> int:
        """Subscribe every local connection of ``user`` not yet subscribed to ``channel``
        (in the background; each gets a ``subscribed`` frame once live); returns how
        many."""
        node = self.node
        conns = [c for c in self._connections(user)
                 if not c.dropping and channel not in (node.channels_of(c) or ())]
        for conn in conns:
            node.spawn(self._subscribe(conn, channel))
        return len(conns)

    async def _subscribe(self, conn: HubConnection, channel: str) -> None:
        node = self.node
        try:
            if node.keeps_history(channel):
                await node.subscribe_stream(
                    conn, channel, since=None, last=None,
                    ack=lambda c: subscribed_frame(channel, c.position.offset,
                                                   c.position.epoch))
            else:
                await node.subscribe(conn, channel)
                send_text(conn, subscribed_frame(channel))
        except BrokerUnavailable as exc:
            logger.warning("server-side subscribe of user=%s to %r failed: %s", conn.user,
                           channel, exc)

    def unsubscribe_local(self, user: str, channel: str) -> int:
        """Unsubscribe every local connection of ``user`` from ``channel`` (not from its own
        personal channel, which lasts the connection's life), each told with an
        ``unsubscribed`` frame (reason ``server``); returns how many."""
        node = self.node
        if node.rules.is_implicit(user, channel):
            return 0
        conns = [c for c in self._connections(user)
                 if not c.dropping and channel in (node.channels_of(c) or ())]
        for conn in conns:
            node.unsubscribe(conn, channel)
            send_text(conn, unsubscribed_frame(channel, "server"))
        return len(conns)

    def _connections(self, user: str) -> list[HubConnection]:
        return list(self.node.registry.by_user.get(user, ()))

    def _answer_channels(self, message: dict[str, Any]) -> None:
        reply_to = _text(message["reply_to"])
        if reply_to == self.node_id:
            return
        pattern = message.get("pattern")
        if pattern is not None:
            pattern = _text(pattern)
        channels, truncated = self._local_channels(pattern)
        payload = encode("channels_reply", request=_text(message["request"]),
                         node=self.node_id, channels=channels, truncated=truncated)
        self.node.spawn(self._reply(node_channel(reply_to), payload))

    async def _reply(self, channel: str, payload: bytes) -> None:
        try:
            await self.node.broker.publish(channel, payload)
        except BrokerUnavailable as exc:
            logger.debug("control: reply not sent: %s", exc)

    def _channels_reply(self, message: dict[str, Any]) -> None:
        request = self._requests.get(_text(message["request"]))
        node_id = _text(message["node"])
        if request is None or node_id not in request.waiting:
            return
        channels = message["channels"]
        if not isinstance(channels, dict):
            raise ValueError("channels must be an object")
        request.waiting.discard(node_id)
        counts = request.counts
        for channel, count in channels.items():
            counts[channel] = counts.get(channel, 0) + int(count)
        request.truncated |= bool(message.get("truncated"))
        if not request.waiting and not request.done.done():
            request.done.set_result(None)


class _Request:
    """A ``channels`` request waiting for the replies of ``waiting`` (node ids)."""

    __slots__ = ("counts", "done", "truncated", "waiting")

    def __init__(self, waiting: Iterable[str], done: asyncio.Future[None]) -> None:
        self.waiting = set(waiting)
        self.done = done
        self.counts: dict[str, int] = {}
        self.truncated = False


def _aged(info: NodeInfo, age: float) -> NodeInfo:
    return dataclasses.replace(info, uptime=info.uptime + age, age=age)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _channel(value: object) -> str:
    try:
        return check_channel(value)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
