"""The HTTP API's request parsing (hub.api.commands), sans-I/O, and the --api-* options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.api.commands import (
    MAX_BATCH_COMMANDS,
    MAX_BROADCAST_CHANNELS,
    Batch,
    Broadcast,
    History,
    Info,
    Publish,
    parse_body,
    parse_command,
)
from hub.api.errors import ApiError
from hub.brokers.base import StreamPosition
from hub.config import Config
from hub.exceptions import ConfigError


def parse(method, obj, limit=65536):
    return parse_command(method, obj, max_payload_bytes=limit)


def code_of(method, obj, limit=65536) -> str:
    with pytest.raises(ApiError) as info:
        parse(method, obj, limit)
    return info.value.code


def test_valid_commands():
    assert parse("publish", {"channel": "news", "data": {"a": [1, "é"]}}) == \
        Publish("news", b'{"a":[1,"\xc3\xa9"]}')
    assert parse("publish", {"channel": "chat:1", "data": None, "idempotency_key": "k"}) == \
        Publish("chat:1", b"null", "k")
    assert parse("broadcast", {"channels": ["a", "b"], "data": 1}) == Broadcast(("a", "b"), b"1")
    assert parse("history", {"channel": "chat:1"}) == History("chat:1", 100, None)
    assert parse("history", {"channel": "c", "limit": 5, "since": {"offset": 0, "epoch": "e"}}) \
        == History("c", 5, StreamPosition(0, "e"))
    assert parse("info", {}) == Info()
    batch = parse("batch", {"commands": [{"method": "info"},
                                         {"method": "publish", "params": {"channel": "a",
                                                                          "data": 2}}]})
    assert batch == Batch((Info(), Publish("a", b"2")))


def test_bodies():
    assert parse_body(b"") == {}
    assert parse_body(b" \n") == {}
    assert parse_body(b'{"a":1}') == {"a": 1}
    for body in (b"{", b"[]", b"1", b'"x"', b"null", b"\xff", b"[" * 2000, b'{"a":NaN}'):
        with pytest.raises(ApiError) as info:
            parse_body(body)
        assert info.value.code == "bad_request" and info.value.status == 400


@pytest.mark.parametrize(("method", "obj", "code"), [
    ("publish", {}, "bad_request"),
    ("publish", {"channel": "a"}, "bad_request"),
    ("publish", {"data": 1}, "bad_request"),
    ("publish", {"channel": 1, "data": 1}, "bad_request"),
    ("publish", {"channel": "bad channel", "data": 1}, "bad_channel"),
    ("publish", {"channel": "User:alice", "data": 1}, "bad_channel"),
    ("publish", {"channel": "a", "data": 1, "extra": 1}, "bad_request"),
    ("publish", {"channel": "a", "data": 1, "idempotency_key": ""}, "bad_request"),
    ("publish", {"channel": "a", "data": 1, "idempotency_key": "k" * 65}, "bad_request"),
    ("publish", {"channel": "a", "data": 1, "idempotency_key": 5}, "bad_request"),
    ("publish", {"channel": "a", "data": "x" * 100}, "too_large"),
    ("broadcast", {"channels": [], "data": 1}, "bad_request"),
    ("broadcast", {"channels": "a", "data": 1}, "bad_request"),
    ("broadcast", {"channels": ["a", "a"], "data": 1}, "bad_request"),
    ("broadcast", {"channels": ["a", "b c"], "data": 1}, "bad_channel"),
    ("broadcast", {"channels": [f"c{i}" for i in range(MAX_BROADCAST_CHANNELS + 1)],
                   "data": 1}, "bad_request"),
    ("history", {"channel": "a", "limit": 0}, "bad_request"),
    ("history", {"channel": "a", "limit": 1001}, "bad_request"),
    ("history", {"channel": "a", "limit": True}, "bad_request"),
    ("history", {"channel": "a", "since": {"offset": -1, "epoch": "e"}}, "bad_request"),
    ("history", {"channel": "a", "since": {"offset": 1}}, "bad_request"),
    ("history", {"channel": "a", "since": [1, "e"]}, "bad_request"),
    ("history", {"channel": "a", "since": {"offset": 1, "epoch": "e", "x": 1}}, "bad_request"),
    ("info", {"x": 1}, "bad_request"),
    ("batch", {}, "bad_request"),
    ("batch", {"commands": []}, "bad_request"),
    ("batch", {"commands": [1]}, "bad_request"),
    ("batch", {"commands": [{"method": "nope"}]}, "bad_request"),
    ("batch", {"commands": [{"method": "batch", "params": {"commands": []}}]}, "bad_request"),
    ("batch", {"commands": [{"method": "publish", "params": []}]}, "bad_request"),
    ("batch", {"commands": [{"method": "info"}] * (MAX_BATCH_COMMANDS + 1)}, "bad_request"),
    ("batch", {"commands": [{"method": "publish", "params": {"channel": "?", "data": 1}}]},
     "bad_channel"),
    ("nope", {}, "bad_request"),
], ids=repr)
def test_refused(method, obj, code):
    assert code_of(method, obj, limit=64) == code


def test_batch_errors_name_the_command():
    with pytest.raises(ApiError) as info:
        parse("batch", {"commands": [{"method": "info"}, {"method": "x"}]})
    assert info.value.message.startswith("commands[1]: ")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                           | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                           max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["publish", "broadcast", "history", "info", "batch", "x"]),
       obj=st.dictionaries(st.sampled_from(["channel", "channels", "data", "limit", "since",
                                            "idempotency_key", "commands", "method",
                                            "params", "zzz"]), json_values))
def test_any_object_parses_or_raises_api_error(method, obj):
    try:
        parse(method, obj)
    except ApiError as exc:
        assert 400 <= exc.status < 500


def test_api_options():
    assert Config(api_port=0, api_key=("k" * 20,)).api_port == 0
    errors = {
        "--api-port needs --api-key": {"api_port": 8766},
        "--api-key is given without --api-port": {"api_key": ("k",)},
        "--api-port must be 0..65535": {"api_port": 70000, "api_key": ("k",)},
        "--api-port must differ": {"api_port": 8765, "api_key": ("k",)},
        "--api-key: a key is": {"api_port": 8766, "api_key": ("two words",)},
        "--api-max-body-bytes must be > 0": {"api_max_body_bytes": 0},
    }
    for start, values in errors.items():
        with pytest.raises(ConfigError) as info:
            Config(**values)
        assert str(info.value).startswith(start), info.value
    assert "k" * 20 not in repr(Config(api_port=0, api_key=("k" * 20,)))
