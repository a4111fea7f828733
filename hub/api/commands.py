"""The HTTP API's requests, sans-I/O: a JSON body in, a typed command out (or an ApiError).

Every body is a JSON object (an empty body counts as ``{}``); an unknown field is refused
(``bad_request``), so that a misspelt ``idempotency_key`` is never dropped silently. The
field rules are those of the WebSocket commands (docs/protocol.md section 3): channel names
of :func:`hub.protocol.check_channel`, ``limit`` 1 to 1000, ``since`` ``{offset, epoch}``,
``idempotency_key`` 1 to 64 characters. ``data`` is any JSON value; the data of
``publish`` and ``broadcast`` is the request's own JSON text of it (as a WebSocket publish's:
:func:`hub.protocol.data_span`), so ``10**30+1``, ``1.0`` and ``-0`` arrive as written; a
batch's ``data`` is serialised again by orjson (an integer past 64 bits becomes a float).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..auth import check_user_id
from ..brokers.base import StreamPosition
from ..control import check_close
from ..exceptions import AuthError, ProtocolError
from ..protocol import (
    MAX_EPOCH_LEN,
    MAX_HISTORY_LIMIT,
    MAX_IDEMPOTENCY_KEY_LEN,
    check_channel,
    data_span,
)
from .errors import ApiError

__all__ = [
    "MAX_BATCH_COMMANDS",
    "MAX_BROADCAST_CHANNELS",
    "METHODS",
    "Batch",
    "Broadcast",
    "Channels",
    "Command",
    "Disconnect",
    "History",
    "Info",
    "Presence",
    "PresenceStats",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "parse_body",
    "parse_command",
]

#: Most channels of one broadcast.
MAX_BROADCAST_CHANNELS = 100
#: Most commands of one batch.
MAX_BATCH_COMMANDS = 100


@dataclass(frozen=True, slots=True)
class Publish:
    channel: str
    data: bytes  # the JSON text of the value
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Broadcast:
    channels: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class History:
    channel: str
    limit: int = 100
    since: StreamPosition | None = None


@dataclass(frozen=True, slots=True)
class Info:
    pass


@dataclass(frozen=True, slots=True)
class Batch:
    commands: tuple[_Simple, ...]


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body (``{}`` for an empty one); ``bad_request`` else."""
    if not body.strip():
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError("bad_request", f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    return obj


def parse_command(method: str, obj: Mapping[str, Any], *, max_payload_bytes: float,
                  body: bytes | None = None) -> Command:
    """The command of endpoint ``method`` (``publish``, ``broadcast``, ``history``,
    ``presence``, ``presence_stats``, ``subscribe``, ``unsubscribe``, ``disconnect``,
    ``channels``, ``info``, ``batch``) for the body ``obj``. A ``data`` whose JSON is over
    ``max_payload_bytes`` is ``too_large`` (the hub would deliver it to nobody). ``body`` is
    the request body ``obj`` was parsed from (:func:`parse_body`): given, the ``data`` of a
    ``publish`` or ``broadcast`` is its exact JSON text there; None: ``obj["data"]``
    serialised by orjson.
    Raises :class:`ApiError`."""
    if method == "batch":
        return _batch(obj, max_payload_bytes)
    parser = _PARSERS.get(method)
    if parser is None:
        raise ApiError("bad_request", f"unknown method {method[:32]!r}")
    return parser(obj, max_payload_bytes, body)


def _fields(obj: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()
            ) -> None:
    for name in required:
        if name not in obj:
            raise ApiError("bad_request", f"missing field {name!r}")
    for name in obj:
        if name not in required and name not in optional:
            raise ApiError("bad_request", f"unknown field {str(name)[:32]!r}")


def _channel(value: object) -> str:
    try:
        return check_channel(value)
    except ProtocolError as exc:
        raise ApiError(exc.code, exc.message) from None


def _data(obj: Mapping[str, Any], limit: float, body: bytes | None) -> bytes:
    """The JSON of ``obj["data"]``: its text in ``body`` (the body ``obj`` was parsed from)
    when given, else orjson's serialisation; ``too_large`` past ``limit`` bytes."""
    if body is not None:
        text = body.decode()  # valid UTF-8: orjson parsed it
        try:
            start, end = data_span(text)
        except ValueError as exc:  # more members than a publish may have
            raise ApiError("bad_request", str(exc)) from None
        data = text[start:end].encode()
    else:
        try:
            data = orjson.dumps(obj["data"])
        except (TypeError, orjson.JSONEncodeError) as exc:  # not reachable from parsed JSON
            raise ApiError("bad_request", f"data cannot be serialised: {exc}") from None
    if len(data) > limit:
        raise ApiError("too_large", f"data is {len(data)} bytes of JSON, over "
                       f"--max-payload-bytes ({limit:g})")
    return data


def _publish(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Publish:
    _fields(obj, ("channel", "data"), ("idempotency_key",))
    channel = _channel(obj["channel"])
    key = obj.get("idempotency_key")
    if "idempotency_key" in obj and (not isinstance(key, str) or not key
                                     or len(key) > MAX_IDEMPOTENCY_KEY_LEN):
        # null too: the document says a string, and a client sending null meant something
        raise ApiError("bad_request", f"idempotency_key must be a string of 1 to "
                       f"{MAX_IDEMPOTENCY_KEY_LEN} characters")
    return Publish(channel, _data(obj, limit, body), key)


def _broadcast(obj: Mapping[str, Any], limit: float, body: bytes | None = None
               ) -> Broadcast:
    _fields(obj, ("channels", "data"))
    channels = obj["channels"]
    if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_BROADCAST_CHANNELS:
        raise ApiError("bad_request", f"channels must be an array of 1 to "
                       f"{MAX_BROADCAST_CHANNELS} channel names")
    names = tuple(_channel(c) for c in channels)
    if len(set(names)) != len(names):
        raise ApiError("bad_request", "a channel is listed twice")
    return Broadcast(names, _data(obj, limit, body))


def _history(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> History:
    _fields(obj, ("channel",), ("limit", "since"))
    channel = _channel(obj["channel"])
    count = obj.get("limit", 100)  # present and null is refused below, as the document says
    if (isinstance(count, bool) or not isinstance(count, int)
          or not 1 <= count <= MAX_HISTORY_LIMIT):
        raise ApiError("bad_request", f"limit must be an integer from 1 to {MAX_HISTORY_LIMIT}")
    since = obj.get("since")
    position = None
    if "since" in obj:
        offset = since.get("offset") if isinstance(since, dict) else None
        epoch = since.get("epoch") if isinstance(since, dict) else None
        if (not isinstance(since, dict) or set(since) - {"offset", "epoch"}
                or isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
                or not isinstance(epoch, str) or not epoch or len(epoch) > MAX_EPOCH_LEN):
            raise ApiError("bad_request", f"since must be an object with an integer offset "
                           f">= 0 and an epoch string of 1 to {MAX_EPOCH_LEN} characters")
        position = StreamPosition(offset, epoch)
    return History(channel, count, position)


@dataclass(frozen=True, slots=True)
class Presence:
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    channel: str


def _presence(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Presence:
    _fields(obj, ("channel",))
    return Presence(_channel(obj["channel"]))


def _presence_stats(obj: Mapping[str, Any], limit: float, body: bytes | None = None
                    ) -> PresenceStats:
    _fields(obj, ("channel",))
    return PresenceStats(_channel(obj["channel"]))


def _info(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Info:
    _fields(obj, ())
    return Info()


@dataclass(frozen=True, slots=True)
class Subscribe:
    user: str
    channel: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    user: str
    channel: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    user: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Channels:
    pattern: str | None = None


#: Most characters of a ``channels`` pattern.
MAX_PATTERN_LEN = 256


def _user(value: object) -> str:
    try:
        return check_user_id(value)
    except AuthError as exc:
        raise ApiError("bad_request", str(exc)) from None


def _subscribe(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Subscribe:
    _fields(obj, ("user", "channel"))
    return Subscribe(_user(obj["user"]), _channel(obj["channel"]))


def _unsubscribe(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Unsubscribe:
    _fields(obj, ("user", "channel"))
    return Unsubscribe(_user(obj["user"]), _channel(obj["channel"]))


def _disconnect(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Disconnect:
    _fields(obj, ("user",), ("code", "reason"))
    user = _user(obj["user"])
    if ("code" in obj and obj["code"] is None) or ("reason" in obj and obj["reason"] is None):
        raise ApiError("bad_request", "code and reason may be left out, not null")
    try:
        code, reason = check_close(obj.get("code"), obj.get("reason"))
    except ValueError as exc:
        raise ApiError("bad_request", str(exc)) from None
    return Disconnect(user, code, reason)


def _channels(obj: Mapping[str, Any], limit: float, body: bytes | None = None) -> Channels:
    _fields(obj, (), ("pattern",))
    pattern = obj.get("pattern")
    if "pattern" in obj and (not isinstance(pattern, str) or not pattern
                             or len(pattern) > MAX_PATTERN_LEN):
        raise ApiError("bad_request", f"pattern must be a string of 1 to {MAX_PATTERN_LEN} "
                       "characters")
    return Channels(pattern)


_Simple = (Publish | Broadcast | History | Presence | PresenceStats | Info | Subscribe
           | Unsubscribe | Disconnect | Channels)
#: One API command: what an endpoint (or one entry of a batch) asks for.
Command = _Simple | Batch
#: Each takes the body object, --max-payload-bytes and the body's bytes (None in a batch).
_PARSERS: dict[str, Callable[[Mapping[str, Any], float, bytes | None], _Simple]] = {
    "publish": _publish, "broadcast": _broadcast, "history": _history, "presence": _presence,
    "presence_stats": _presence_stats, "subscribe": _subscribe, "unsubscribe": _unsubscribe,
    "disconnect": _disconnect, "channels": _channels, "info": _info}
#: The methods a batch may hold (every endpoint but batch itself).
METHODS = tuple(_PARSERS)


def _batch(obj: Mapping[str, Any], limit: float) -> Batch:
    _fields(obj, ("commands",))
    commands = obj["commands"]
    if not isinstance(commands, list) or not 1 <= len(commands) <= MAX_BATCH_COMMANDS:
        raise ApiError("bad_request", f"commands must be an array of 1 to "
                       f"{MAX_BATCH_COMMANDS} commands")
    parsed: list[_Simple] = []
    for index, item in enumerate(commands):
        where = f"commands[{index}]"
        if not isinstance(item, dict):
            raise ApiError("bad_request", f"{where}: a command is an object "
                           "{\"method\": ..., \"params\": {...}}")
        try:
            _fields(item, ("method",), ("params",))
            method, params = item["method"], item.get("params", {})
            if not isinstance(method, str) or method not in _PARSERS:
                raise ApiError("bad_request", f"unknown method {str(method)[:32]!r}; one of "
                               f"{', '.join(METHODS)}")
            if not isinstance(params, dict):
                raise ApiError("bad_request", "params must be an object")
            parsed.append(_PARSERS[method](params, limit, None))
        except ApiError as exc:
            raise exc.prefixed(where) from None
    return Batch(tuple(parsed))
