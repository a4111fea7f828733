"""The wire format, sans-I/O: parse client frames, check channel names, build server frames.

Everything here is pure: no sockets, no asyncio. docs/protocol.md is the contract this module
implements; tests/unit/test_protocol.py pins it.

Client frames are UTF-8 JSON objects ``{"op": ..., "id": ...}`` (RFC 6455 section 5.6 text
frames). Server frames are built as bytes once and sent as text frames.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from .brokers.base import Publication, StreamPosition
from .channels import RESERVED_PREFIXES
from .exceptions import ProtocolError

__all__ = [
    "CHANNEL_RE",
    "CLOSE_AUTH_REQUIRED",
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_CODES",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_TOKEN",
    "CLOSE_RATE_LIMITED",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TOO_MANY_CONNECTIONS",
    "ENVELOPE_MARK",
    "ERROR_CODES",
    "MAX_ENVELOPE_OVERHEAD",
    "MAX_FROM_BYTES",
    "MAX_HISTORY_LIMIT",
    "MAX_PUBLISH_MEMBERS",
    "MAX_TOKEN_BYTES",
    "OPS",
    "Command",
    "CommandId",
    "Connect",
    "History",
    "Ping",
    "Presence",
    "PresenceStats",
    "Publish",
    "Refresh",
    "Subscribe",
    "Unsubscribe",
    "ack_frame",
    "check_channel",
    "connect_ack_frame",
    "data_span",
    "decode_envelope",
    "encode_data",
    "encode_envelope",
    "error_frame",
    "gap_frame",
    "history_frame",
    "history_items",
    "join_leave_frame",
    "message_frame",
    "parse_command",
    "parse_connect",
    "payload_to_json",
    "pong_frame",
    "position_ack_frame",
    "presence_frame",
    "presence_stats_frame",
    "stream_gap_frame",
    "subscribed_frame",
    "unpack_payload",
    "unsubscribed_frame",
]

#: Valid channel names: 1 to 128 characters of letters, digits and ``_ . : @ / -``.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")
OPS = ("connect", "subscribe", "unsubscribe", "publish", "ping", "refresh", "history",
       "presence", "presence_stats")

#: Tokens longer than this many characters are refused (``connect`` here; the handshake and
#: ``refresh`` in :func:`hub.auth.verify_token`). Re-exported as ``hub.auth.MAX_TOKEN_BYTES``.
MAX_TOKEN_BYTES = 4096

#: Error codes of ``{"type":"error"}`` replies (docs/protocol.md "Errors").
ERROR_CODES = {
    "bad_request": "invalid JSON, not an object, a binary frame, a missing or wrong-typed field "
                   "(a channel that is not a string included), an unknown op, or a connect on "
                   "an authenticated connection",
    "bad_channel": "the channel is a string that does not match ^[A-Za-z0-9_.:@/-]{1,128}$ or "
                   "misspells a reserved prefix",
    "forbidden": "the connection may not subscribe or publish to this channel",
    "limit_exceeded": "the connection already has --max-subscriptions subscriptions, or a "
                      "publish's data is larger than --max-payload-bytes",
    "rate_limited": "more commands than --rate-limit allows; the command was dropped",
    "unavailable": "the broker (Redis) could not confirm the operation in time; retry",
    "no_history": "history, since, last or an idempotency_key on a channel whose namespace "
                  "keeps no history",
    "no_presence": "presence or presence_stats on a channel whose namespace keeps no presence",
    "unauthorized": "the token of a refresh is missing, invalid, expired or for another user",
}

# Close codes (RFC 6455 section 7.4; 4000-4999 are ours).
CLOSE_GOING_AWAY = 1001      # the hub is shutting down
CLOSE_INTERNAL_ERROR = 1011  # also: the personal channel could not be subscribed at connect
CLOSE_TOKEN_EXPIRED = 4001   # the JWT expired and no refresh came in time, or connect's expired
CLOSE_INVALID_TOKEN = 4002   # connect's token is malformed, forged, too long or lacks a sub
CLOSE_DISCONNECTED = 4003    # disconnected by the server: /api/disconnect, Publisher.disconnect
CLOSE_AUTH_TIMEOUT = 4005    # no connect within --auth-timeout
CLOSE_AUTH_REQUIRED = 4006   # the first frame of a pending connection was not a connect
CLOSE_SLOW_CONSUMER = 4008   # the write buffer passed --max-buffer-bytes
CLOSE_TOO_MANY_CONNECTIONS = 4009  # connect past --max-connections-per-user
CLOSE_RATE_LIMITED = 4029    # a command flood past --rate-limit, or frames past --max-frame-rate
CLOSE_CODES = {
    1001: "going away: the hub is shutting down",
    1007: "invalid UTF-8 in a text frame (RFC 6455 section 8.1)",
    1009: "a frame or message larger than --max-message-bytes",
    1011: "internal error (also: the personal channel could not be subscribed at connect)",
    4001: "token expired: send a refresh before exp (or connect with a fresh token)",
    4002: "invalid token in connect",
    4003: "disconnected by the server (/api/disconnect, Publisher.disconnect): do not "
          "reconnect",
    4005: "authentication timeout: no connect within --auth-timeout",
    4006: "authentication required: the first frame was not a connect",
    4008: "slow consumer: the client did not read fast enough",
    4009: "too many connections: the user already has --max-connections-per-user",
    4029: "rate limit: a flood of commands past --rate-limit or of frames past "
          "--max-frame-rate",
}

_MAX_ID_LEN = 64


#: A command's ``id`` as the client sent it, echoed in the reply: an int, a string of at
#: most 64 characters, or None when absent.
CommandId = int | str | None


#: Largest ``last`` of a subscribe and ``limit`` of a history command.
MAX_HISTORY_LIMIT = 1000
#: Longest ``epoch`` a client may send back, and longest ``idempotency_key``, in characters.
MAX_EPOCH_LEN = 64
MAX_IDEMPOTENCY_KEY_LEN = 64


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``{"op":"subscribe","channel":...}``: ``channel`` is a valid name (not yet checked
    against the connection's permissions). On a history channel ``since`` asks for recovery
    from that position and ``last`` (1 to :data:`MAX_HISTORY_LIMIT`) for the most recent
    messages first; None when absent."""

    channel: str
    id: CommandId = None
    since: StreamPosition | None = None
    last: int | None = None
    op: ClassVar[str] = "subscribe"


@dataclass(frozen=True, slots=True)
class History:
    """``{"op":"history","channel":...,"limit":N,"since":{...}}``: the ``limit`` (1 to
    :data:`MAX_HISTORY_LIMIT`, default 100) most recent messages, or with ``since`` the
    first ``limit`` after it."""

    channel: str
    id: CommandId = None
    limit: int = 100
    since: StreamPosition | None = None
    op: ClassVar[str] = "history"


@dataclass(frozen=True, slots=True)
class Presence:
    """``{"op":"presence","channel":...}``: the connections subscribed to the channel."""

    channel: str
    id: CommandId = None
    op: ClassVar[str] = "presence"


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """``{"op":"presence_stats","channel":...}``: how many connections and distinct users
    are subscribed to the channel."""

    channel: str
    id: CommandId = None
    op: ClassVar[str] = "presence_stats"


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``{"op":"unsubscribe","channel":...}``."""

    channel: str
    id: CommandId = None
    op: ClassVar[str] = "unsubscribe"


@dataclass(frozen=True, slots=True)
class Publish:
    """``{"op":"publish","channel":...,"data":...}``: ``data`` is the client's own JSON
    text of the value, UTF-8 encoded (valid JSON, delivered unchanged)."""

    channel: str
    data: bytes
    id: CommandId = None
    idempotency_key: str | None = None
    op: ClassVar[str] = "publish"


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"op":"ping"}``: answered with a ``pong``."""

    id: CommandId = None
    op: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class Connect:
    """``{"op":"connect","token":...}``: ``token`` is a non-empty string of at most
    :data:`MAX_TOKEN_BYTES` characters, not yet verified."""

    token: str
    id: CommandId = None
    op: ClassVar[str] = "connect"


@dataclass(frozen=True, slots=True)
class Refresh:
    """``{"op":"refresh","token":...}``: ``token`` is a non-empty string, not yet verified."""

    token: str
    id: CommandId = None
    op: ClassVar[str] = "refresh"


#: One parsed client command: one frozen dataclass per op of :data:`OPS`; each has the
#: client's ``id`` and its ``op`` name as a class attribute.
Command = (Subscribe | Unsubscribe | Publish | Ping | Connect | Refresh | History | Presence
           | PresenceStats)


def parse_command(frame: str | bytes) -> Command:
    """Parse one client frame into a :class:`Command`.

    ``frame`` is the message as websockets returns it: ``str`` for a text frame, ``bytes`` for a
    binary one. Raises :class:`ProtocolError` with code ``bad_request`` (binary frame, invalid
    JSON, nesting deeper than 1024 levels (orjson's limit since 3.9.15), not an object,
    unknown op, missing or wrong-typed field, a connect token longer than
    :data:`MAX_TOKEN_BYTES` characters, a publish of more than :data:`MAX_PUBLISH_MEMBERS`
    fields) or ``bad_channel``; the error carries the command's
    id when it was read.

    A publish's ``data`` is the client's own text of the value (:func:`data_span`), UTF-8
    encoded: ``10**30+1``, ``-0``, ``1.0`` and escapes reach subscribers as written, not as
    orjson would print them again.
    """
    obj, cid, op = _envelope(frame)
    if op == "subscribe":
        channel = check_channel(obj.get("channel"), cid)
        since = _position(obj.get("since"), cid)
        last = _count(obj, "last", None, cid)
        return Subscribe(channel, cid, since, last)
    if op == "history":
        channel = check_channel(obj.get("channel"), cid)
        return History(channel, cid, _count(obj, "limit", 100, cid) or 100,
                       _position(obj.get("since"), cid))
    if op == "unsubscribe":
        return Unsubscribe(check_channel(obj.get("channel"), cid), cid)
    if op == "presence":
        return Presence(check_channel(obj.get("channel"), cid), cid)
    if op == "presence_stats":
        return PresenceStats(check_channel(obj.get("channel"), cid), cid)
    if op == "publish":
        channel = check_channel(obj.get("channel"), cid)
        if "data" not in obj:
            raise ProtocolError("bad_request", "publish needs a 'data' field", cid)
        key = obj.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key
                                or len(key) > MAX_IDEMPOTENCY_KEY_LEN):
            raise ProtocolError("bad_request", f"idempotency_key must be a string of 1 to "
                                f"{MAX_IDEMPOTENCY_KEY_LEN} characters", cid)
        assert isinstance(frame, str)  # _envelope refused bytes
        try:
            start, end = data_span(frame)
        except ValueError as exc:  # too many members
            raise ProtocolError("bad_request", str(exc), cid) from None
        return Publish(channel, frame[start:end].encode(), cid, key)
    if op == "ping":
        return Ping(cid)
    if op == "connect":
        return Connect(_connect_token(obj, cid), cid)
    if op == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("bad_request", "refresh needs a string field 'token'", cid)
        return Refresh(token, cid)
    raise ProtocolError("bad_request", f"unknown op {op[:32]!r}", cid)


def parse_connect(frame: str | bytes) -> Connect | None:
    """Parse the first frame of a connection pending authentication.

    Returns the :class:`Connect` command, or None when ``frame`` is no
    ``connect`` command at all: a binary frame, invalid JSON, not an object, a bad ``id``,
    another op (the hub closes with 4006). Raises :class:`ProtocolError` ``bad_request`` for
    a ``connect`` whose ``token`` is missing, not a string, empty or too long (close 4002).
    """
    try:
        obj, cid, op = _envelope(frame)
    except ProtocolError:
        return None
    if op != "connect":
        return None
    return Connect(_connect_token(obj, cid), cid)


def _position(value: object, cid: object) -> StreamPosition | None:
    """The ``since`` field: None when absent, else ``{"offset": int >= 0, "epoch": str}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("bad_request", "since must be an object {offset, epoch}", cid)
    offset, epoch = value.get("offset"), value.get("epoch")
    if (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
            or not isinstance(epoch, str) or not epoch or len(epoch) > MAX_EPOCH_LEN):
        raise ProtocolError("bad_request", f"since needs an integer offset >= 0 and an epoch "
                            f"string of 1 to {MAX_EPOCH_LEN} characters", cid)
    return StreamPosition(offset, epoch)


def _count(obj: dict[str, Any], name: str, default: int | None, cid: object) -> int | None:
    """An optional count field (``last``, ``limit``): 1 to :data:`MAX_HISTORY_LIMIT`."""
    value = obj.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_HISTORY_LIMIT):
        raise ProtocolError("bad_request", f"{name} must be an integer from 1 to "
                            f"{MAX_HISTORY_LIMIT}", cid)
    return value


def _connect_token(obj: dict[str, Any], cid: object) -> str:
    token = obj.get("token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
        raise ProtocolError("bad_request", f"connect needs a string field 'token' of 1 to "
                            f"{MAX_TOKEN_BYTES} characters", cid)
    return token


def _envelope(frame: str | bytes) -> tuple[dict[str, Any], CommandId, str]:
    """The JSON object of ``frame``, its checked ``id`` and its ``op`` (not yet checked
    against :data:`OPS`). Raises ``bad_request`` as :func:`parse_command` says."""
    if isinstance(frame, bytes):
        raise ProtocolError("bad_request", "binary frames are not accepted; send JSON text")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_request", f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a command is a JSON object")
    cid = obj.get("id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, (int, str))
                            or (isinstance(cid, str) and len(cid) > _MAX_ID_LEN)):
        raise ProtocolError("bad_request", f"id must be an integer or a string of at most "
                            f"{_MAX_ID_LEN} characters")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing or non-string field 'op'", cid)
    return obj, cid, op


def encode_data(data: Any, cid: object = None) -> bytes:
    """Serialise a publish payload to JSON bytes; raise ``bad_request`` if orjson cannot."""
    try:
        return orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. an integer past 64 bits
        raise ProtocolError("bad_request", f"data cannot be serialised: {exc}", cid) from None


# The scanner of data_span. Its text is valid JSON (orjson checked it), so it needs no
# grammar, just where each key and value ends. JSON whitespace is these four characters.
_WS_CHARS = " \t\n\r"
# One member of an object, from the end of the previous value (the comma and whitespace
# between): the key (group 1) and, when it is a string or a scalar, the value (group 2).
_MEMBER = re.compile(r'[ \t\n\r,]*("[^"\\]*(?:\\.[^"\\]*)*")[ \t\n\r]*:[ \t\n\r]*'
                     r'("[^"\\]*(?:\\.[^"\\]*)*"|[^ \t\n\r,\]}\[{"]+)?', re.DOTALL)
#: Top-level members a publish frame may have (``op``, ``channel``, ``data``, ``id`` and
#: unknown ones, repeated keys counted each time): bounds data_span's work per frame.
MAX_PUBLISH_MEMBERS = 64
#: Characters of the first window in which _container_end looks for the end of a container
#: after the first one (the first one gets the whole rest of the text).
_WINDOW = 512


def data_span(text: str) -> tuple[int, int]:
    """``(start, end)``: where the value of the top-level ``"data"`` key of ``text`` is,
    whitespace around it excluded, so that ``text[start:end]`` is the client's own JSON text.

    ``text`` must be a JSON object that :func:`orjson.loads` accepted (on other text the
    result is undefined); the key may be written with escapes (``"d\\u0061ta"``) and, when
    it is repeated, the last one counts, as in orjson. Raises ValueError when there is no
    ``"data"`` key or more than :data:`MAX_PUBLISH_MEMBERS` members.

    Cost: one regular-expression step per member whose value is a string or a scalar, and
    one or two :func:`orjson.loads` of each object or array value (the ``data`` of an
    ordinary publish): C speed, whatever the depth. Members cost a few microseconds each,
    hence their limit.
    """
    span: tuple[int, int] | None = None
    pos = text.index("{") + 1
    close = text.rindex("}")  # the object's own closing brace
    window: int | None = None  # the first container may look at the whole rest
    members = 0
    while (member := _MEMBER.match(text, pos)) is not None:
        members += 1
        if members > MAX_PUBLISH_MEMBERS:
            raise ValueError(f"a publish has at most {MAX_PUBLISH_MEMBERS} fields")
        if member.group(2) is not None:  # a string or a scalar: already whole
            start, pos = member.span(2)
        else:  # an object or an array
            start = member.end()
            pos = _container_end(text, start, close, window)
            window = _WINDOW
        raw = member.group(1)
        if (raw[1:-1] if "\\" not in raw else orjson.loads(raw)) == "data":
            span = (start, pos)
    if span is None:
        raise ValueError("no data key")
    return span


def _container_end(text: str, start: int, close: int, window: int | None) -> int:
    """The index just past the JSON object or array that starts at ``text[start]`` and is
    followed, in valid JSON, by a comma or by the closing brace at ``close``.

    orjson parses ``window`` characters from ``start`` (up to ``close`` if None: one parse
    when the value is the last member; twice as many
    each time the window proves too short). Either the window is exactly the value, or
    orjson stops past its end and names the position; the cut there is checked with one
    more parse: in valid JSON only the value's true end makes a valid JSON text (a cut
    inside the value leaves it unfinished, a cut past it leaves a top-level comma).
    """
    while True:
        stop = close if window is None else min(close, start + window)
        candidate = text[start:stop]
        try:
            orjson.loads(candidate)
        except orjson.JSONDecodeError as exc:
            cut = candidate[:exc.pos].rstrip(_WS_CHARS)
            if 0 < len(cut) < len(candidate):
                try:
                    orjson.loads(cut)
                except orjson.JSONDecodeError:
                    pass
                else:
                    return start + len(cut)
            if stop == close:
                raise ValueError(f"no JSON value at {start}") from None
            window = (window or _WINDOW) * 2
            continue
        return start + len(candidate.rstrip(_WS_CHARS))


def check_channel(name: object, cid: object = None) -> str:
    """Return ``name`` if it is a valid channel name.

    Raises ``bad_request`` when ``name`` is not a string (a missing or wrong-typed field, as
    for every other field) and ``bad_channel`` for a string that is not a valid name.

    Names are matched exactly and are case-sensitive. A name whose prefix spells a reserved
    namespace in another letter case (``User:alice``, ``PRIVATE:x``) is rejected, so that it
    cannot be mistaken for the personal or private channel it resembles.
    """
    if not isinstance(name, str):
        raise ProtocolError("bad_request", "missing or non-string field 'channel'", cid)
    if CHANNEL_RE.fullmatch(name) is None:
        raise ProtocolError("bad_channel", "channel names are 1-128 characters of "
                            "A-Z a-z 0-9 _ . : @ / -", cid)
    lowered = name[:8].lower()
    for prefix in RESERVED_PREFIXES:
        if lowered.startswith(prefix) and not name.startswith(prefix):
            raise ProtocolError("bad_channel", f"the reserved prefix is spelled {prefix!r}", cid)
    return name


def payload_to_json(payload: bytes) -> bytes:
    """The ``data`` JSON of an ordinary broker payload (not an envelope): the payload itself
    if it is valid JSON, else the payload as a JSON string (invalid UTF-8 replaced by
    U+FFFD). Nothing is dropped."""
    try:
        orjson.loads(payload)
        return payload
    except orjson.JSONDecodeError:
        return orjson.dumps(payload.decode("utf-8", "replace"))


#: The first byte of a client publish's broker payload, an *envelope* (docs/protocol.md
#: section 6): ``ENVELOPE_MARK + <from JSON> + ENVELOPE_MARK + <data JSON>``. No JSON text
#: starts with it (nor holds it raw), so no JSON payload of a backend is ever taken for one.
ENVELOPE_MARK = b"\x00"
#: Longest ``<from JSON>`` of an envelope, in bytes (a user id is at most 123 characters, a
#: connection id a UUID); a longer one makes the payload an ordinary one.
MAX_FROM_BYTES = 512
#: The most an envelope adds to its data: the two marks and the longest ``<from JSON>``.
MAX_ENVELOPE_OVERHEAD = MAX_FROM_BYTES + 2


def encode_envelope(user: str | None, client: str, data: bytes) -> bytes:
    """The broker payload of a client publish: ``\\x00{"user":..,"client":..}\\x00<data>``.

    ``user`` is the publisher's user id (None: anonymous), ``client`` its connection id,
    ``data`` the JSON text of the message (UTF-8, as :class:`Publish` holds it). Subscribers
    then get ``"from":{"user":..,"client":..}`` next to ``data`` (:func:`unpack_payload`).
    Raises ValueError when the sender's JSON is over :data:`MAX_FROM_BYTES` bytes.
    """
    sender = orjson.dumps({"user": user, "client": client})
    if len(sender) > MAX_FROM_BYTES:
        raise ValueError(f"the sender's JSON is over {MAX_FROM_BYTES} bytes")
    return ENVELOPE_MARK + sender + ENVELOPE_MARK + data


def decode_envelope(payload: bytes) -> tuple[bytes, bytes] | None:
    """``(data JSON, from JSON)`` of an envelope (:func:`encode_envelope`), or None when
    ``payload`` is not a well-formed one: it does not start with :data:`ENVELOPE_MARK`, has
    no second mark within :data:`MAX_FROM_BYTES` bytes, its sender is not a JSON object of
    exactly ``"user"`` (a string or null) and ``"client"`` (a string), or its data is not
    valid JSON (section 6's definition). The from JSON returned is orjson's own compact
    ``{"user":..,"client":..}``, whatever the envelope's spelling."""
    if payload[:1] != ENVELOPE_MARK:
        return None
    end = payload.find(ENVELOPE_MARK, 1, MAX_FROM_BYTES + 2)
    if end < 0:
        return None
    data = payload[end + 1:]
    try:
        sender = orjson.loads(payload[1:end])
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(sender, dict) or len(sender) != 2:
        return None
    user, client = sender.get("user"), sender.get("client")
    if not isinstance(client, str) or not (user is None or isinstance(user, str)):
        return None
    return data, orjson.dumps({"user": user, "client": client})


def unpack_payload(payload: bytes) -> tuple[bytes, bytes | None]:
    """``(data JSON, from JSON or None)`` of any broker or history payload, as delivered: an
    envelope's data and sender (:func:`decode_envelope`), else :func:`payload_to_json` of
    the whole payload and None (a backend publish; a malformed envelope too)."""
    if payload[:1] == ENVELOPE_MARK:
        parts = decode_envelope(payload)
        if parts is not None:
            return parts
    return payload_to_json(payload), None


def message_frame(channel_json: bytes, data_json: bytes, offset: int | None = None,
                  from_json: bytes | None = None) -> bytes:
    """``{"type":"message","channel":...,"data":...}`` from the already-encoded channel name
    and data, with ``"offset":N`` on a history channel and ``"from":{"user":..,"client":..}``
    (``from_json``, already encoded) for a client publish. Built once per message per
    process, never per recipient."""
    tail = b"}" if offset is None else b',"offset":%d}' % offset
    if from_json is not None:
        tail = tail[:-1] + b',"from":' + from_json + b"}"
    return b"".join((b'{"type":"message","channel":', channel_json, b',"data":', data_json,
                     tail))


def position_ack_frame(cid: object, offset: int, epoch: str,
                       recovered: bool | None = None) -> bytes:
    """``{"type":"ack","id":<id>,"offset":N,"epoch":"..."}`` (the ack of a subscribe to, or a
    publish into, a history channel), with ``"recovered":true|false`` when the subscribe
    asked for recovery with ``since``."""
    body: dict[str, object] = {"type": "ack", "id": cid, "offset": offset, "epoch": epoch}
    if recovered is not None:
        body["recovered"] = recovered
    return orjson.dumps(body)


def history_frame(cid: object, channel: str, offset: int, epoch: str,
                  messages: list[tuple[int, bytes, bytes | None]]) -> bytes:
    """``{"type":"history","id":..,"channel":..,"offset":N,"epoch":"..","messages":[{"offset":
    ..,"data":..},...]}``; ``messages`` are ``(offset, data JSON, from JSON or None)``
    triples, oldest first (:func:`history_items`); a message with a sender (a client
    publish) carries ``"from":{"user":..,"client":..}``."""
    head = orjson.dumps({"type": "history", "id": cid, "channel": channel, "offset": offset,
                         "epoch": epoch})
    items = b",".join(b'{"offset":%d,"data":%s}' % (o, data) if sender is None
                      else b'{"offset":%d,"data":%s,"from":%s}' % (o, data, sender)
                      for o, data, sender in messages)
    return head[:-1] + b',"messages":[' + items + b"]}"


def history_items(publications: Iterable[Publication]) -> list[tuple[int, bytes, bytes | None]]:
    """``(offset, data JSON, from JSON or None)`` of each publication of a history read
    (:func:`unpack_payload`), in order: the ``messages`` of :func:`history_frame` and of the
    HTTP API's history answer."""
    return [(p.offset or 0, *unpack_payload(p.payload)) for p in publications]


def unsubscribed_frame(channel: str, reason: str) -> bytes:
    """``{"type":"unsubscribed","channel":...,"reason":...}``: the server ended the
    connection's subscription to ``channel`` (``reason`` ``revoked``: a refreshed token no
    longer grants the private channel; ``server``: the HTTP API's ``/api/unsubscribe`` or
    ``Publisher.unsubscribe``)."""
    return orjson.dumps({"type": "unsubscribed", "channel": channel, "reason": reason})


def subscribed_frame(channel: str, offset: int | None = None, epoch: str | None = None
                     ) -> bytes:
    """``{"type":"subscribed","channel":...}``: the server subscribed the connection to
    ``channel`` (``/api/subscribe``, ``Publisher.subscribe``); on a history channel with the
    channel's position, ``"offset":N,"epoch":"..."``, from which live messages follow."""
    if offset is None:
        return orjson.dumps({"type": "subscribed", "channel": channel})
    return orjson.dumps({"type": "subscribed", "channel": channel, "offset": offset,
                         "epoch": epoch})


def stream_gap_frame(channel: str, first: int | None, last: int | None,
                     epoch: str | None) -> bytes:
    """``{"type":"gap","channels":[<channel>],"from":F,"to":L,"epoch":"..."}``: offsets F to L
    of a history channel are lost (``to`` null: up to the current epoch's start or unknown;
    ``from`` null: unknown); ``epoch`` is the channel's current epoch (null when unknown)."""
    return orjson.dumps({"type": "gap", "channels": [channel], "from": first, "to": last,
                         "epoch": epoch})


def presence_frame(cid: object, channel: str, clients: list[tuple[str, str | None]]) -> bytes:
    """``{"type":"presence","id":..,"channel":..,"clients":[{"client":..,"user":..},...]}``;
    ``clients`` are ``(client id, user id or None)`` pairs."""
    return orjson.dumps({"type": "presence", "id": cid, "channel": channel,
                         "clients": [{"client": c, "user": u} for c, u in clients]})


def presence_stats_frame(cid: object, channel: str, clients: int, users: int) -> bytes:
    """``{"type":"presence_stats","id":..,"channel":..,"clients":N,"users":M}``."""
    return orjson.dumps({"type": "presence_stats", "id": cid, "channel": channel,
                         "clients": clients, "users": users})


def join_leave_frame(kind: str, channel: str, client: str, user: str | None) -> bytes:
    """``{"type":"join"|"leave","channel":..,"client":..,"user":..}``: a connection
    subscribed to (``join``) or left (``leave``) a channel whose namespace has
    ``join_leave``; ``user`` is null for an anonymous connection. Built once per event per
    process."""
    return orjson.dumps({"type": kind, "channel": channel, "client": client, "user": user})


def ack_frame(cid: object) -> bytes:
    """``{"type":"ack","id":<id>}``."""
    return orjson.dumps({"type": "ack", "id": cid})


def connect_ack_frame(cid: object, user: str, client: str, exp: float | None) -> bytes:
    """``{"type":"ack","id":<id>,"user":<user id>,"client":<connection id>,"exp":<exp>}``:
    the reply to an accepted ``connect``; ``exp`` is the token's expiry in seconds since the
    epoch (an integer when it is one), null when the token has none."""
    if exp is not None and exp.is_integer():
        exp = int(exp)
    return orjson.dumps({"type": "ack", "id": cid, "user": user, "client": client, "exp": exp})


def pong_frame(cid: object) -> bytes:
    """``{"type":"pong","id":<id>}``."""
    return orjson.dumps({"type": "pong", "id": cid})


def error_frame(code: str, message: str, cid: object = None) -> bytes:
    """``{"type":"error","id":<id or null>,"code":<code>,"message":<text>}``."""
    return orjson.dumps({"type": "error", "id": cid, "code": code, "message": message})


def gap_frame(channels: list[str]) -> bytes:
    """``{"type":"gap","channels":[...]}``: messages on these channels may have been lost."""
    return orjson.dumps({"type": "gap", "channels": sorted(channels)})
