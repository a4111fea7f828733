"""The wire format as the client sees it, sans-I/O: command frames out, typed server frames in.

docs/protocol.md sections 3-4 are the contract; spec/frames/ holds a golden file of every
frame (the client's tests read them). Nothing here does I/O or imports the server's modules.

Commands are built as ``dict`` s by :func:`command` and encoded with :func:`encode`. Server
frames are parsed by :func:`parse_frame` into one dataclass per kind; a frame of an unknown
``type`` becomes :class:`Unknown` (newer hubs may send frames this client does not know).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from ..brokers.base import StreamPosition

__all__ = [
    "Ack",
    "ClientInfo",
    "ErrorReply",
    "GapFrame",
    "HistoryReply",
    "Message",
    "Pong",
    "PresenceEvent",
    "PresenceReply",
    "PresenceStatsReply",
    "Sender",
    "ServerFrame",
    "StreamPosition",
    "Subscribed",
    "Unknown",
    "UnsubscribedFrame",
    "command",
    "encode",
    "parse_frame",
    "token_exp",
]


def command(op: str, id: int | str | None = None, **fields: Any) -> dict[str, Any]:
    """The frame ``{"op": op, "id": id, **fields}``; fields whose value is None are left
    out, a :class:`StreamPosition` becomes ``{"offset": N, "epoch": "..."}``."""
    frame: dict[str, Any] = {"op": op}
    if id is not None:
        frame["id"] = id
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, StreamPosition):
            value = {"offset": value.offset, "epoch": value.epoch}
        frame[name] = value
    return frame


def encode(frame: dict[str, Any]) -> str:
    """A command as the text of one WebSocket frame (compact JSON, non-ASCII kept). Raises
    TypeError or ValueError when a ``data`` value is not JSON-serialisable (NaN included)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Sender:
    """Who published a message from a client: ``user`` id (None: an anonymous connection)
    and ``client``, the connection id (the ``client`` of its connect ack)."""

    user: str | None
    client: str


@dataclass(frozen=True, slots=True)
class Message:
    """A delivery: ``channel``, ``data`` (the JSON value, parsed), ``offset`` on a history
    channel (None elsewhere), ``from_`` the :class:`Sender` of a client publish (None for a
    backend's publish). Also the entries of a :class:`HistoryReply`."""

    channel: str
    data: Any
    offset: int | None = None
    from_: Sender | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"type":"ack"}``: ``offset``/``epoch`` on history channels, ``recovered`` on a
    subscribe with ``since``, ``user``/``client``/``exp`` on a connect ack (``exp`` seconds
    since the epoch, None: the token has none)."""

    id: int | str | None
    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None
    user: str | None = None
    client: str | None = None
    exp: float | None = None

    @property
    def position(self) -> StreamPosition | None:
        """``StreamPosition(offset, epoch)`` when the ack carries one, else None."""
        if self.offset is None or self.epoch is None:
            return None
        return StreamPosition(self.offset, self.epoch)


@dataclass(frozen=True, slots=True)
class Pong:
    """``{"type":"pong"}``."""

    id: int | str | None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``{"type":"error","code":...,"message":...}``."""

    id: int | str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class HistoryReply:
    """``{"type":"history"}``: the channel's position and ``messages``, oldest first."""

    id: int | str | None
    channel: str
    offset: int
    epoch: str
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One connection subscribed to a presence channel: ``client`` id and ``user`` (None:
    anonymous)."""

    client: str
    user: str | None


@dataclass(frozen=True, slots=True)
class PresenceReply:
    """``{"type":"presence"}``: every connection subscribed to ``channel``."""

    id: int | str | None
    channel: str
    clients: tuple[ClientInfo, ...]


@dataclass(frozen=True, slots=True)
class PresenceStatsReply:
    """``{"type":"presence_stats"}``: ``clients`` connections, ``users`` distinct users."""

    id: int | str | None
    channel: str
    clients: int
    users: int


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A ``join`` or ``leave`` push (``kind``) on a presence channel with ``join_leave``."""

    kind: str
    channel: str
    client: str
    user: str | None


@dataclass(frozen=True, slots=True)
class GapFrame:
    """``{"type":"gap"}``: messages of ``channels`` may be lost; on a history channel
    ``from_``..``to`` (None: unknown) of ``epoch`` are."""

    channels: tuple[str, ...]
    from_: int | None = None
    to: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Subscribed:
    """``{"type":"subscribed"}``: the server subscribed this connection to ``channel``; on a
    history channel ``offset``/``epoch`` is where live messages follow from."""

    channel: str
    offset: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class UnsubscribedFrame:
    """``{"type":"unsubscribed"}``: the server ended the subscription (``reason``)."""

    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame of a ``type`` this client does not know (ignored by the client)."""

    type: str
    frame: dict[str, Any]


ServerFrame = (Ack | Pong | ErrorReply | HistoryReply | PresenceReply | PresenceStatsReply
               | Message | PresenceEvent | GapFrame | Subscribed | UnsubscribedFrame | Unknown)


def _sender(value: Any) -> Sender | None:
    if not isinstance(value, dict):
        return None
    return Sender(value.get("user"), str(value.get("client", "")))


def _message(channel: str, obj: dict[str, Any]) -> Message:
    return Message(channel, obj.get("data"), obj.get("offset"), _sender(obj.get("from")))


def parse_frame(text: str | bytes) -> ServerFrame:
    """Parse one server frame. Raises ValueError when it is not a JSON object with a string
    ``type`` or a known type misses a required field (the hub never sends such a frame)."""
    try:
        obj = json.loads(text)
        kind = obj["type"]
        if not isinstance(kind, str):
            raise TypeError
        cid = obj.get("id")
        if kind == "message":
            return _message(obj["channel"], obj)
        if kind == "ack":
            exp = obj.get("exp")
            return Ack(cid, obj.get("offset"), obj.get("epoch"), obj.get("recovered"),
                       obj.get("user"), obj.get("client"),
                       float(exp) if exp is not None else None)
        if kind == "pong":
            return Pong(cid)
        if kind == "error":
            return ErrorReply(cid, str(obj["code"]), str(obj.get("message", "")))
        if kind == "history":
            channel = obj["channel"]
            return HistoryReply(cid, channel, obj["offset"], obj["epoch"],
                                tuple(_message(channel, m) for m in obj["messages"]))
        if kind == "presence":
            return PresenceReply(cid, obj["channel"], tuple(
                ClientInfo(c["client"], c.get("user")) for c in obj["clients"]))
        if kind == "presence_stats":
            return PresenceStatsReply(cid, obj["channel"], obj["clients"], obj["users"])
        if kind in ("join", "leave"):
            return PresenceEvent(kind, obj["channel"], obj["client"], obj.get("user"))
        if kind == "gap":
            return GapFrame(tuple(obj["channels"]), obj.get("from"), obj.get("to"),
                            obj.get("epoch"))
        if kind == "subscribed":
            return Subscribed(obj["channel"], obj.get("offset"), obj.get("epoch"))
        if kind == "unsubscribed":
            return UnsubscribedFrame(obj["channel"], str(obj.get("reason", "")))
        return Unknown(kind, obj)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a hub frame: {str(text)[:80]!r}") from exc


def token_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying anything (the hub verifies; the
    client only needs to know when to refresh), in seconds since the epoch; None when the
    token has none or cannot be read."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, AttributeError):
        return None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)
