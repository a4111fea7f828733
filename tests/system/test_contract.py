"""Issue 11, smaller contract breaks: JWT time claims that are not numbers, a client's publish
delivered exactly as written, what counts as JSON in a broker payload, ``?user=`` in
development mode, and one rule for a wrong-typed ``channel``.

Unit tests run hub.auth and hub.protocol directly; the end-to-end ones run a real ``hub
serve`` (and redis-server) with real WebSocket clients.
"""

from __future__ import annotations

import json
import re
import time
import timeit

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hub.auth import identify, verify_token
from hub.exceptions import AuthError, ProtocolError, TokenExpired
from hub.protocol import ERROR_CODES, data_span, parse_command, payload_to_json
from tests.helpers import ROOT, command, make_token, open_ws, recv_json, subscribe

SECRET = "contract-test-secret-that-is-long-enough-" + "s" * 24


def signed(**claims: object) -> str:
    """An HS256 token of ``claims`` (``sub`` alice unless given)."""
    return make_token(SECRET, claims.pop("sub", "alice"), ttl=None, **claims)


def docs_section(number: int) -> str:
    text = (ROOT / "docs" / "protocol.md").read_text()
    match = re.search(rf"^## {number}\. .*?(?=^## )", text, re.S | re.M)
    assert match is not None, number
    return match.group()


def assert_clean_log(hub) -> None:
    log = hub.log_text()
    assert hub.proc.poll() is None, log
    for bad in ("Traceback", "handler failed", "Error", "exception"):
        assert bad not in log, log


# -- 1. exp, nbf and iat are NumericDates (JSON numbers) -------------------------------------

FUTURE = int(time.time()) + 3600

NOT_NUMERIC_DATES = {
    "exp numeric string": {"exp": str(FUTURE)},
    "exp string with spaces": {"exp": f" {FUTURE} "},
    "exp word": {"exp": "soon"},
    "exp true": {"exp": True},
    "exp false": {"exp": False},
    "exp null": {"exp": None},
    "exp list": {"exp": [FUTURE]},
    "exp beyond a double": {"exp": 10**400},
    "exp NaN": {"exp": float("nan")},
    "nbf numeric string": {"exp": FUTURE, "nbf": "0"},
    "nbf true": {"exp": FUTURE, "nbf": True},
    "iat numeric string": {"exp": FUTURE, "iat": "0"},
    "iat false": {"exp": FUTURE, "iat": False},
}


@pytest.mark.parametrize("claims", NOT_NUMERIC_DATES.values(), ids=NOT_NUMERIC_DATES.keys())
def test_time_claims_that_are_not_numbers_are_invalid_not_expired(claims):
    with pytest.raises(AuthError) as info:
        verify_token(signed(**claims), SECRET)
    # Invalid (401, 4002, unauthorized), never "expired" (4001) nor a crash.
    assert type(info.value) is AuthError, info.value
    assert "token" in str(info.value)


def test_numeric_time_claims_are_honoured():
    assert verify_token(signed(exp=FUTURE), SECRET).expires_at == float(FUTURE)
    assert verify_token(signed(exp=FUTURE + 0.5), SECRET).expires_at == FUTURE + 0.5
    assert verify_token(signed(exp=float(FUTURE)), SECRET).expires_at == float(FUTURE)
    assert verify_token(signed(), SECRET).expires_at is None
    now = int(time.time())
    assert verify_token(signed(exp=FUTURE, nbf=now - 5, iat=now - 5), SECRET).user == "alice"
    assert verify_token(signed(exp=FUTURE, nbf=0.5, iat=1), SECRET).user == "alice"
    with pytest.raises(TokenExpired):
        verify_token(signed(exp=now - 5), SECRET)
    with pytest.raises(TokenExpired):
        verify_token(signed(exp=-(10**20)), SECRET)
    for name in ("nbf", "iat"):  # not yet valid
        with pytest.raises(AuthError) as info:
            verify_token(signed(exp=FUTURE, **{name: now + 600}), SECRET)
        assert type(info.value) is AuthError and name in str(info.value)


@pytest.fixture
def jwt_hub(hub_factory):
    return hub_factory("--jwt-secret", SECRET, "--auth-timeout", "5")


async def close_code(ws, timeout: float = 10.0) -> int | None:
    try:
        while True:
            await recv_json(ws, timeout)
    except ConnectionClosed:
        return ws.close_code


async def test_a_numeric_string_exp_is_refused_at_handshake_connect_and_refresh(jwt_hub):
    bad = signed(exp=str(FUTURE))
    for url, headers in ((jwt_hub.ws_url, {"Authorization": f"Bearer {bad}"}),
                         (f"{jwt_hub.ws_url}?token={bad}", {})):
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    async with open_ws(jwt_hub.ws_url) as ws:  # in-band
        await ws.send(json.dumps({"op": "connect", "token": bad, "id": 1}))
        assert await close_code(ws) == 4002
    good = signed(exp=FUTURE)
    async with open_ws(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {good}"}) as ws:
        for claims in ({"exp": str(FUTURE)}, {"exp": True}, {"exp": FUTURE, "nbf": "0"}):
            reply = await command(ws, op="refresh", token=signed(**claims), id=2)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unauthorized", 2)
        assert await command(ws, op="ping", id=3) == {"type": "pong", "id": 3}
    assert_clean_log(jwt_hub)


# -- 2. a client's publish is delivered as written --------------------------------------------

EXACT = '{"n":1000000000000000000000000000001,"z":-0}'


def publish_frame(data_text: str, *, before: str = "", after: str = ',"id":1') -> str:
    return '{"op":"publish","channel":"chat:x",' + before + '"data":' + data_text + after + "}"


def test_publish_data_is_the_clients_own_text():
    for data_text in (EXACT, "-0", "1.0", "1E+2", "100000000000000000000000000000001",
                      "-18446744073709551617", '"caf\\u00e9 \\/ \\ud83d\\ude00"', '"café"',
                      "[1.50, 2e-400, true,null]", '{"a" : [ {} , [] ]}', "0.1e1"):
        for frame in (publish_frame(data_text), publish_frame(data_text, after=""),
                      publish_frame(" \n" + data_text + "\t ")):
            cmd = parse_command(frame)
            assert cmd.data == data_text.encode(), frame
            assert json.loads(cmd.data) == json.loads(data_text)


def test_publish_data_with_repeated_or_escaped_keys_is_the_last_one_as_in_orjson():
    frame = ('{"data":[1,{"data":2}],"op":"publish","channel":"c","x":{"data":"}"},'
             '"d\\u0061ta":  100000000000000000000000000000001 ,"id":"]"}')
    assert orjson.loads(frame)["data"] == 1e32  # orjson also takes the last one
    assert parse_command(frame).data == b"100000000000000000000000000000001"
    frame = '{"op":"publish","channel":"c","data":-0,"data":{"k":"\\"data\\":1"},"id":1}'
    assert parse_command(frame).data == b'{"k":"\\"data\\":1"}'
    frame = '{"op":"publish","channel":"c","data":[[],{}],"data":[[[1]]],"data":[2] }'
    assert parse_command(frame).data == b"[2]"
    # A publish without data is still a bad_request.
    with pytest.raises(ProtocolError) as info:
        parse_command('{"op":"publish","channel":"c","dat":1}')
    assert info.value.code == "bad_request"
    with pytest.raises(ValueError):
        data_span('{"op":"publish","x":{"data":1}}')


@pytest.mark.parametrize("depth", [254, 255, 600, 1023])
def test_publish_data_nested_up_to_the_documented_limit_is_kept(depth):
    data_text = "[" * depth + "]" * depth
    assert parse_command(publish_frame(data_text)).data == data_text.encode()
    obj_text = '{"a":' * depth + "1" + "}" * depth
    assert parse_command(publish_frame(obj_text)).data == obj_text.encode()


def test_publish_frame_nested_past_1024_is_a_bad_request():
    with pytest.raises(ProtocolError) as info:
        parse_command(publish_frame("[" * 1024 + "]" * 1024))  # 1025 with the frame
    assert info.value.code == "bad_request"
    for data_text in ("1e400", "-1e400", "NaN", '"\\ud800"', "01", "[1,]"):
        with pytest.raises(ProtocolError) as info:
            parse_command(publish_frame(data_text))
        assert info.value.code == "bad_request", data_text


def refused(frame: str) -> str:
    """The error code parse_command gives ``frame``."""
    try:
        parse_command(frame)
    except ProtocolError as exc:
        return exc.code
    raise AssertionError("accepted")


def test_a_publish_has_at_most_64_fields_which_bounds_the_cost_of_finding_data():
    extra = ",".join(f'"x{i}":[{i}]' for i in range(60))
    ok = publish_frame(EXACT, before=extra + ",")  # 64 fields with op, channel, data, id
    assert parse_command(ok).data == EXACT.encode()
    for frame in (publish_frame(EXACT, before=extra + ',"y":1,'),
                  '{"op":"publish","channel":"c",' + ",".join(['"data":[]'] * 63) + "}"):
        with pytest.raises(ProtocolError) as info:
            parse_command(frame)
        assert (info.value.code, info.value.message) == (
            "bad_request", "a publish has at most 64 fields")
    # Figures for the report: the worst frames of --max-message-bytes (64 KiB).
    for name, frame in (
            ("6500 data keys", '{"op":"publish","channel":"c",'
             + ",".join(['"data":[]'] * 6500) + "}"),
            ("7200 [[]] fields", '{"op":"publish","channel":"c","data":1,'
             + ",".join(['"a":[[]]'] * 7200) + "}")):
        best = min(timeit.repeat(lambda f=frame: refused(f), number=5, repeat=3)) / 5
        print(f"\n{name}: {len(frame)} bytes refused in {best * 1e3:.2f} ms")


WS = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])
NUMBERS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(["-0", "-0.0", "1.0", "1e5", "1E+2", "5e-324", "1e-400", "0.1e1",
                     "1.7976931348623157e308", "18446744073709551616"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?",
                  fullmatch=True),
)
STRINGS = st.one_of(
    st.text(max_size=12).map(json.dumps),  # \uXXXX escapes
    st.text(max_size=12).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.sampled_from(['"\\/"', '"\\u00e9"', '"\\ud83d\\ude00"', '"]}\\"[{,:"', '"data"',
                     '"\\\\"', '""']),
)
SCALARS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "null"]))


def _array(items: list[tuple[str, str, str]]) -> str:
    return "[" + ",".join(a + v + b for a, v, b in items) + "]"


def _object(members: list[tuple[str, str, str, str]]) -> str:
    return "{" + ",".join(f"{a}{k}{b}:{a}{v}" for a, k, b, v in members) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(st.tuples(WS, children, WS), max_size=4).map(_array),
        st.lists(st.tuples(WS, st.one_of(STRINGS, st.just('"data"')), WS, children),
                 max_size=4).map(_object)),
    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES, decoy=st.none() | VALUES, extra=st.none() | VALUES,
       key=st.sampled_from(['"data"', '"d\\u0061ta"', '"\\u0064ata"']),
       order=st.permutations(range(4)), ws=st.lists(WS, min_size=6, max_size=6))
def test_publish_data_property(value, decoy, extra, key, order, ws):
    """For any JSON value, the parsed ``data`` is the exact text of the last ``data`` key."""
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        assume(False)  # 1e400 and the like: the whole frame is refused (tested above)
    members = [f'"op"{ws[0]}:"publish"', f'"channel":{ws[1]}"chat:x"', '"id":7']
    if extra is not None:
        members.append(f'"extra":{extra}')
    others = [members[i] for i in order if i < len(members)]
    cut = len(others) // 2
    data = [f"{ws[2]}{key}{ws[3]}:{ws[4]}{value}{ws[5]}"]
    if decoy is not None:  # an earlier data key: orjson keeps the last one
        data.insert(0, f'"data":{decoy}')
    frame = ws[5] + "{" + ",".join(others[:cut] + data + others[cut:]) + "}" + ws[0]
    try:
        expected = orjson.loads(frame)["data"]
    except orjson.JSONDecodeError:
        assume(False)
    cmd = parse_command(frame)
    assert cmd.data == value.encode()
    assert json.loads(cmd.data) == json.loads(value)
    assert orjson.loads(cmd.data) == expected


def test_publish_parse_time_of_a_1_kib_frame():
    """A figure for the report, not an assertion: parse time of a typical ~1 KiB publish."""
    data = {"user": "alice", "text": "hello world " * 20, "ok": True,
            "items": [{"id": i, "v": i * 1.5, "tag": f"t{i}"} for i in range(20)]}
    for layout, frame_obj in (
            ("data last", {"op": "publish", "channel": "chat:1", "id": 42, "data": data}),
            ("id last", {"op": "publish", "channel": "chat:1", "data": data, "id": 42})):
        frame = json.dumps(frame_obj)
        n = 2000
        new = min(timeit.repeat(lambda f=frame: parse_command(f), number=n, repeat=3)) / n
        old = min(timeit.repeat(lambda f=frame: orjson.dumps(orjson.loads(f)["data"]),
                                number=n, repeat=3)) / n
        print(f"\n{layout}: {len(frame.encode())} bytes: parse_command {new * 1e6:.1f} us "
              f"(orjson.loads + dumps of data, the old way: {old * 1e6:.1f} us)")
    assert parse_command(frame).data == json.dumps(data).encode()


async def test_a_clients_big_integer_and_negative_zero_reach_subscribers_as_written(
        hub_factory, redis_server):
    hub = hub_factory("--client-publish", "chat:*", redis=redis_server)
    deep = "[" * 1023 + "]" * 1023
    async with open_ws(hub.ws_url) as sub, open_ws(hub.ws_url) as pub:
        await subscribe(sub, "chat:x")
        for n, data_text in enumerate((EXACT, " " + EXACT + " ", deep, "[1.0,1E+2]")):
            await pub.send(publish_frame(data_text, after=f',"id":{n}'))
            assert await recv_json(pub) == {"type": "ack", "id": n}
            raw = await sub.recv()
            head = '{"type":"message","channel":"chat:x","data":' + data_text.strip()
            assert raw.startswith(head + ',"from":{"user":null,"client":"'), raw[:200]
            assert raw.endswith('"}}') and raw.count('"from"') == 1, raw[-200:]
    assert_clean_log(hub)


# -- 3. what counts as JSON in a broker payload ----------------------------------------------

@pytest.mark.parametrize("payload", [
    b'{"a":1}', b"  [1, 2]\n", b"100000000000000000000000000000001", b"-0", b"1.0", b"null",
    b'"\\ud83d\\ude00"', "\"caf\u00e9\"".encode(), b"1e308", b"1e-400",
    b"[" * 1024 + b"]" * 1024, b'{"a":1,"a":2}',
])
def test_payloads_that_orjson_accepts_are_delivered_unchanged(payload):
    assert payload_to_json(payload) == payload


@pytest.mark.parametrize("payload", [
    b"1e400", b"-1e400", b"\xef\xbb\xbf{}", b'"\\ud800"', b'"\\udc00x"',
    b"[" * 1025 + b"]" * 1025, b"NaN", b"{'a':1}", b"[1,]", b"", b"\xff", b"\xed\xa0\x80",
])
def test_payloads_that_orjson_refuses_arrive_as_a_json_string(payload):
    out = payload_to_json(payload)
    assert json.loads(out) == payload.decode("utf-8", "replace")


def test_docs_say_what_counts_as_json_in_a_payload():
    section = docs_section(6)
    for needle in ("RFC 8259", "1e400", "byte order mark", "\\ud800", "1024",
                   "64 bits"):
        assert needle in section, needle


# -- 4. ?user= in development mode -----------------------------------------------------------

@pytest.mark.parametrize("query", ["?user=", "?user", "?user=&user=alice", "?user=alice&user=",
                                   "?user=alice&user=bob", "?user=alice&user=alice",
                                   "?user=a%20b", "?x=1&user="])
def test_identify_refuses_an_empty_malformed_or_repeated_user(query):
    with pytest.raises(AuthError):
        identify("/ws" + query, None, None)


def test_identify_without_a_secret():
    assert identify("/ws", None, None).user is None
    assert identify("/ws?x=&token=t", None, None).user is None
    assert identify("/ws?user=alice", None, None).user == "alice"
    assert identify("/ws?user=alice&x=1", None, None).user == "alice"


async def test_user_parameter_empty_or_repeated_gets_400(hub_factory):
    hub = hub_factory()
    for query in ("?user=", "?user", "?user=&user=alice", "?user=alice&user=alice"):
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(hub.ws_url + query):
                pass
        assert info.value.response.status_code == 400, query
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        reply = await command(ws, op="subscribe", channel="user:alice", id=1)
        assert reply == {"type": "ack", "id": 1}
    assert hub.log_text().count("handshake refused (400)") == 4
    assert_clean_log(hub)


# -- 5. a wrong-typed channel is a bad_request ------------------------------------------------

@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
@pytest.mark.parametrize("channel", [5, 1.5, True, None, [], ["news"], {}])
def test_a_missing_or_wrong_typed_channel_is_a_bad_request(op, channel):
    cmd: dict = {"op": op, "id": 9, "data": 1, "channel": channel}
    with pytest.raises(ProtocolError) as info:
        parse_command(json.dumps(cmd))
    assert (info.value.code, info.value.id) == ("bad_request", 9)


@pytest.mark.parametrize("channel", ["", "a b", "x" * 129, "User:alice", "caf\u00e9"])
def test_a_string_that_is_no_channel_name_is_a_bad_channel(channel):
    with pytest.raises(ProtocolError) as info:
        parse_command(json.dumps({"op": "subscribe", "channel": channel, "id": 9}))
    assert (info.value.code, info.value.id) == ("bad_channel", 9)


def test_docs_and_codes_say_one_rule_for_wrong_typed_fields():
    assert "not a string" not in ERROR_CODES["bad_channel"]
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `(\w+)` \| (.*) \|$", docs_section(3), re.M)}
    assert "wrong-typed" in rows["bad_request"] and "channel" in rows["bad_request"]
    assert "not a string" not in rows["bad_channel"]
    assert "string" in rows["bad_channel"]


async def test_subscribe_to_a_number_answers_bad_request(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url) as ws:
        reply = await command(ws, op="subscribe", channel=5, id=3)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_request", 3)
        reply = await command(ws, op="subscribe", channel="", id=4)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_channel", 4)
    assert_clean_log(hub)
