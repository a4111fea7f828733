"""The wire format, without sockets (hub.protocol)."""

from __future__ import annotations

import json

import orjson
import pytest

from hub.channels import channel_matches
from hub.exceptions import ProtocolError
from hub.protocol import (
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    ack_frame,
    check_channel,
    error_frame,
    gap_frame,
    message_frame,
    parse_command,
    payload_to_json,
)


def code_of(frame) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_command(frame)
    return info.value.code


def test_parse_valid_commands():
    assert parse_command('{"op":"subscribe","channel":"news","id":1}') == Subscribe("news", 1)
    assert parse_command('{"op":"unsubscribe","channel":"a.b:c@d/e-f_g"}') == Unsubscribe(
        "a.b:c@d/e-f_g", None)
    cmd = parse_command('{"op":"publish","channel":"chat:1","data":{"x":[1,2]},"id":"q"}')
    assert cmd.op == "publish" and cmd.id == "q" and orjson.loads(cmd.data) == {"x": [1, 2]}
    assert parse_command('{"op":"publish","channel":"c","data":null}').data == b"null"
    assert parse_command('{"op":"ping"}') == Ping()
    assert parse_command('{"op":"refresh","token":"t","id":2}') == Refresh("t", 2)


@pytest.mark.parametrize("frame,code", [
    (b"{}", "bad_request"),
    ("", "bad_request"),
    ("{", "bad_request"),
    ("null", "bad_request"),
    ("[]", "bad_request"),
    ('{"op":null}', "bad_request"),
    ('{"op":"nope"}', "bad_request"),
    ('{"op":"ping","id":true}', "bad_request"),
    ('{"op":"ping","id":1.5}', "bad_request"),
    ('{"op":"ping","id":"' + "x" * 65 + '"}', "bad_request"),
    ('{"op":"subscribe"}', "bad_request"),
    ('{"op":"subscribe","channel":1}', "bad_request"),
    ('{"op":"subscribe","channel":"a b"}', "bad_channel"),
    ('{"op":"subscribe","channel":"USER:alice"}', "bad_channel"),
    ('{"op":"subscribe","channel":"Private:x"}', "bad_channel"),
    ('{"op":"publish","channel":"c"}', "bad_request"),
    ('{"op":"publish","channel":"c","data":1e999}', "bad_request"),
    ('{"op":"refresh"}', "bad_request"),
    ("[" * 5000 + "]" * 5000, "bad_request"),
])
def test_parse_errors(frame, code):
    assert code_of(frame) == code


def test_error_keeps_the_id_when_readable():
    with pytest.raises(ProtocolError) as info:
        parse_command('{"op":"subscribe","channel":"a b","id":7}')
    assert info.value.id == 7


def test_channel_names():
    assert check_channel("x" * 128) == "x" * 128
    for bad in ("", "x" * 129, "caf\u00e9", "a\x00", "ｕser:alice", "news\n"):
        with pytest.raises(ProtocolError):
            check_channel(bad)


def test_channel_patterns():
    assert channel_matches("chat:room1", ("chat:*",))
    assert channel_matches("lobby", ("chat:*", "lobby"))
    assert not channel_matches("lobby2", ("lobby",))
    assert channel_matches("anything", ("*",))
    assert not channel_matches("x", ())


def test_payload_to_json():
    assert payload_to_json(b'{"a":1}') == b'{"a":1}'
    assert json.loads(payload_to_json(b"plain text")) == "plain text"
    assert json.loads(payload_to_json(b"\xff\xfeok")) == "\ufffd\ufffdok"
    assert json.loads(payload_to_json(b"")) == ""


def test_frames():
    frame = message_frame(orjson.dumps("news"), b'{"a":1}')
    assert json.loads(frame) == {"type": "message", "channel": "news", "data": {"a": 1}}
    assert json.loads(ack_frame(None)) == {"type": "ack", "id": None}
    assert json.loads(error_frame("forbidden", "no", 3)) == {
        "type": "error", "id": 3, "code": "forbidden", "message": "no"}
    assert json.loads(gap_frame(["b", "a"])) == {"type": "gap", "channels": ["a", "b"]}


def test_presence_ops_frames_and_events():
    from hub.brokers.base import Publication
    from hub.presence.base import ClientInfo
    from hub.presences import event_frame, event_payload
    from hub.protocol import (
        Presence,
        PresenceStats,
        join_leave_frame,
        presence_frame,
        presence_stats_frame,
    )

    assert parse_command('{"op":"presence","channel":"chat:r","id":1}') == Presence("chat:r", 1)
    assert parse_command('{"op":"presence_stats","channel":"chat:r"}') == PresenceStats("chat:r")
    with pytest.raises(ProtocolError) as info:
        parse_command('{"op":"presence","id":2}')
    assert (info.value.code, info.value.id) == ("bad_request", 2)
    assert orjson.loads(presence_frame(1, "c", [("x", "alice"), ("y", None)])) == {
        "type": "presence", "id": 1, "channel": "c",
        "clients": [{"client": "x", "user": "alice"}, {"client": "y", "user": None}]}
    assert orjson.loads(presence_stats_frame(2, "c", 3, 2)) == {
        "type": "presence_stats", "id": 2, "channel": "c", "clients": 3, "users": 2}
    assert orjson.loads(join_leave_frame("leave", "c", "x", None)) == {
        "type": "leave", "channel": "c", "client": "x", "user": None}
    payload = event_payload("join", ClientInfo("x", "alice"))
    assert orjson.loads(event_frame(Publication("c", payload, presence=True)) or b"") == {
        "type": "join", "channel": "c", "client": "x", "user": "alice"}
    for bad in (b"nope", b"[]", b'{"event":"hello","client":"x"}', b'{"event":"join"}',
                b'{"event":"join","client":"x","user":5}'):
        assert event_frame(Publication("c", bad, presence=True)) is None
