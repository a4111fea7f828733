"""The wire format, without sockets (hub.protocol)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.brokers.base import Publication
from hub.channels import channel_matches
from hub.exceptions import ProtocolError
from hub.protocol import (
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    ack_frame,
    check_channel,
    decode_envelope,
    encode_envelope,
    error_frame,
    gap_frame,
    history_frame,
    history_items,
    message_frame,
    parse_command,
    payload_to_json,
    unpack_payload,
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


# -- the envelope of a client publish (docs/protocol.md section 6) -------------------------

def test_envelope_round_trip():
    data = b'{"text":"hi","n":1000000000000000000000000000001,"x":1.0,"z":-0}'
    payload = encode_envelope("alice", "c-1", data)
    assert payload == b'\x00{"user":"alice","client":"c-1"}\x00' + data
    assert decode_envelope(payload) == (data, b'{"user":"alice","client":"c-1"}')
    assert unpack_payload(payload) == (data, b'{"user":"alice","client":"c-1"}')
    anonymous = encode_envelope(None, "c-2", b'"\\u0000"')  # an escaped NUL in data
    assert unpack_payload(anonymous) == (b'"\\u0000"', b'{"user":null,"client":"c-2"}')
    # the sender as any spelling of the same object: re-encoded compactly
    spelled = b'\x00 { "client" : "c" , "user" : "b" } \x00[1]'
    assert decode_envelope(spelled) == (b"[1]", b'{"user":"b","client":"c"}')


def test_backend_payloads_are_never_envelopes():
    for payload in (b'{"from":{"user":"x","client":"y"},"data":1}', b'"\\u0000"', b"",
                    b"plain", b"[0]", b"\xff"):
        assert decode_envelope(payload) is None
        assert unpack_payload(payload) == (payload_to_json(payload), None)


@pytest.mark.parametrize("payload", [
    b"\x00",                                            # nothing after the mark
    b"\x00{}",                                          # no second mark
    b'\x00{"user":"a","client":"c"}',                   # no second mark
    b'\x00{"user":"a","client":"c"}\x00',               # no data
    b'\x00{"user":"a","client":"c"}\x00{',              # data not JSON
    b'\x00{"user":"a","client":"c"}\x00NaN',
    b'\x00{"user":"a","client":"c"}\x001e400',
    b"\x00not json\x001",
    b'\x00["a","c"]\x001',                              # the sender not an object
    b'\x00{"user":"a"}\x001',                           # no client
    b'\x00{"client":"c"}\x001',                         # no user
    b'\x00{"user":"a","client":5}\x001',
    b'\x00{"user":5,"client":"c"}\x001',
    b'\x00{"user":"a","client":"c","admin":true}\x001',  # another field
    b'\x00{"user":"' + b"a" * 600 + b'","client":"c"}\x001',  # over MAX_FROM_BYTES
])
def test_malformed_envelopes_are_ordinary_payloads(payload):
    assert decode_envelope(payload) is None
    data, sender = unpack_payload(payload)
    assert sender is None
    assert orjson.loads(data) == payload.decode("utf-8", "replace")  # delivered as a string


def test_envelope_sender_is_bounded():
    from hub.protocol import MAX_FROM_BYTES

    with pytest.raises(ValueError):
        encode_envelope("a" * MAX_FROM_BYTES, "c", b"1")


def test_frames_with_sender():
    sender = b'{"user":"alice","client":"c-1"}'
    frame = message_frame(b'"chat:1"', b'{"a":1}', 42, sender)
    assert frame == (b'{"type":"message","channel":"chat:1","data":{"a":1},"offset":42,'
                     b'"from":{"user":"alice","client":"c-1"}}')
    assert orjson.loads(message_frame(b'"news"', b"1", None, sender)) == {
        "type": "message", "channel": "news", "data": 1,
        "from": {"user": "alice", "client": "c-1"}}
    assert message_frame(b'"news"', b"1", 7) == (
        b'{"type":"message","channel":"news","data":1,"offset":7}')
    items = history_items([Publication("chat:1", encode_envelope(None, "c", b"1.0"), 1, "e"),
                           Publication("chat:1", b"plain", 2, "e")])
    assert items == [(1, b"1.0", b'{"user":null,"client":"c"}'), (2, b'"plain"', None)]
    assert history_frame(3, "chat:1", 2, "e", items) == (
        b'{"type":"history","id":3,"channel":"chat:1","offset":2,"epoch":"e","messages":['
        b'{"offset":1,"data":1.0,"from":{"user":null,"client":"c"}},'
        b'{"offset":2,"data":"plain"}]}')


_users = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_.:@/-]{1,123}", fullmatch=True))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(user=_users, client=st.uuids().map(str), value=_json)
def test_envelope_property(user, client, value):
    """Whatever a client writes in data, the envelope gives back exactly its text and the
    hub's sender; and no JSON text a backend publishes is ever taken for an envelope."""
    data = json.dumps(value).encode()  # big integers and all: Python's json writes them
    assert unpack_payload(encode_envelope(user, client, data)) == (
        data, orjson.dumps({"user": user, "client": client}))
    assert unpack_payload(data) == (data, None)
