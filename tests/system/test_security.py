"""Bad input and attackers: hostile JSON, Origin checks, JWT handshakes and refresh, and the
personal and private channel checks against look-alike names.

Every hostile frame must get its documented error code (the id echoed when it could be read),
leave the connection open and answering, and never hurt the process or other clients.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers import (
    assert_alive,
    handshake_status,
    make_token,
    open_ws,
    recv_json,
    send_recv,
    wait_close,
)

SECRET = "security-test-secret-long-enough-for-hs512-" + "k" * 24  # 67 bytes
OTHER_SECRET = "another-secret-that-is-also-32-bytes-long"


def b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def subscribe_reply(ws, channel: str, cid: object = 1) -> dict:
    return await send_recv(ws, {"op": "subscribe", "channel": channel, "id": cid})


async def user_of(ws) -> str | None:
    """Which user the hub thinks ``ws`` is: probe the personal channels we use."""
    for user in ("alice", "bob", "mallory"):
        if await subscribe_reply(ws, f"user:{user}") == {"type": "ack", "id": 1}:
            return user
    return None


def assert_clean_log(hub) -> None:
    assert hub.proc.poll() is None, hub.log_text()
    log = hub.log_text()
    for bad in ("Traceback", "handler failed", "RecursionError", "handshake failed"):
        assert bad not in log, log


# -- hostile JSON ------------------------------------------------------------------------

DEEP = 100_000
HOSTILE: list[tuple[str, str | bytes, str, object]] = [
    # (what, frame, expected reply code or "pong"/"ack", expected id)
    ("deep array", "[" * DEEP + "]" * DEEP, "bad_request", None),
    ("unclosed deep", "[" * DEEP, "bad_request", None),
    ("nesting every parser accepts", '{"op":"publish","id":3,"channel":"pub.x","data":'
     + "[" * 50 + "]" * 50 + "}", "ack", 3),
    ("1e999999 as data", '{"op":"publish","id":4,"channel":"pub.x","data":1e999999}',
     "bad_request", None),
    ("-1e999999 as id", '{"op":"ping","id":-1e999999}', "bad_request", None),
    ("2**70 as data", '{"op":"publish","id":5,"channel":"pub.x","data":' + str(2**70) + "}",
     "ack", 5),
    ("2**70 as id", '{"op":"ping","id":' + str(2**70) + "}", "bad_request", None),
    ("2**64 as id", '{"op":"ping","id":' + str(2**64) + "}", "bad_request", None),
    ("u64 max id", '{"op":"ping","id":' + str(2**64 - 1) + "}", "pong", 2**64 - 1),
    ("i64 min id", '{"op":"ping","id":' + str(-2**63) + "}", "pong", -2**63),
    ("1e-999999 id", '{"op":"ping","id":1e-999999}', "bad_request", None),
    ("long channel", '{"op":"subscribe","id":6,"channel":"' + "c" * 200_000 + '"}',
     "bad_channel", 6),
    ("long op", '{"op":"' + "o" * 200_000 + '","id":7}', "bad_request", 7),
    ("long id", '{"op":"ping","id":"' + "i" * 200_000 + '"}', "bad_request", None),
    ("id of 65 chars", '{"op":"ping","id":"' + "i" * 65 + '"}', "bad_request", None),
    ("id of 64 chars", '{"op":"ping","id":"' + "i" * 64 + '"}', "pong", "i" * 64),
    ("long data string", '{"op":"publish","id":8,"channel":"pub.x","data":"'
     + "d" * 200_000 + '"}', "ack", 8),
    ("long refresh token", '{"op":"refresh","id":9,"token":"' + "t" * 200_000 + '"}',
     "bad_request", 9),  # authentication is off in this hub
    ("many keys", "{" + ",".join(f'"k{i}":{i}' for i in range(20_000)) + ',"op":"ping","id":10}',
     "pong", 10),
    # not an object
    ("array", '[{"op":"ping","id":1}]', "bad_request", None),
    ("string", '"ping"', "bad_request", None),
    ("number", "1", "bad_request", None),
    ("null", "null", "bad_request", None),
    ("true", "true", "bad_request", None),
    # not JSON
    ("empty", "", "bad_request", None),
    ("blank", " \n\t", "bad_request", None),
    ("truncated", '{"op":"ping","id":1', "bad_request", None),
    ("trailing comma", '{"op":"ping","id":1,}', "bad_request", None),
    ("single quotes", "{'op':'ping','id':1}", "bad_request", None),
    ("NaN", '{"op":"ping","id":NaN}', "bad_request", None),
    ("two documents", '{"op":"ping","id":1}{"op":"ping","id":2}', "bad_request", None),
    ("lone surrogate", '{"op":"ping","id":"\\ud800"}', "bad_request", None),
    ("NUL byte", '{"op":"ping","id":1}\x00', "bad_request", None),
    ("BOM", '\ufeff{"op":"ping","id":1}', "bad_request", None),
    # binary frames
    ("binary JSON", b'{"op":"ping","id":1}', "bad_request", None),
    ("binary junk", b"\x00\xff\xfe", "bad_request", None),
    ("empty binary", b"", "bad_request", None),
    # op
    ("unknown op", '{"op":"dance","id":11}', "bad_request", 11),
    ("op in capitals", '{"op":"PING","id":11}', "bad_request", 11),
    ("op with a space", '{"op":"ping ","id":11}', "bad_request", 11),
    ("empty op", '{"op":"","id":11}', "bad_request", 11),
    ("missing op", '{"id":11}', "bad_request", 11),
    ("empty object", "{}", "bad_request", None),
    ("op number", '{"op":1,"id":11}', "bad_request", 11),
    ("op null", '{"op":null,"id":11}', "bad_request", 11),
    ("op list", '{"op":["ping"],"id":11}', "bad_request", 11),
    ("op object", '{"op":{"op":"ping"},"id":11}', "bad_request", 11),
    # fields
    ("subscribe without channel", '{"op":"subscribe","id":12}', "bad_request", 12),
    ("subscribe channel null", '{"op":"subscribe","id":12,"channel":null}', "bad_request", 12),
    ("subscribe channel number", '{"op":"subscribe","id":12,"channel":5}', "bad_request", 12),
    ("subscribe channel list", '{"op":"subscribe","id":12,"channel":["a"]}', "bad_request", 12),
    ("subscribe channel object", '{"op":"subscribe","id":12,"channel":{}}', "bad_request", 12),
    ("subscribe channel bool", '{"op":"subscribe","id":12,"channel":true}', "bad_request", 12),
    ("empty channel", '{"op":"subscribe","id":12,"channel":""}', "bad_channel", 12),
    ("129-char channel", '{"op":"subscribe","id":12,"channel":"' + "x" * 129 + '"}',
     "bad_channel", 12),
    ("128-char channel", '{"op":"subscribe","id":12,"channel":"' + "x" * 128 + '"}', "ack", 12),
    ("unsubscribe channel number", '{"op":"unsubscribe","id":13,"channel":5}', "bad_request", 13),
    ("unsubscribe not subscribed", '{"op":"unsubscribe","id":13,"channel":"never"}', "ack", 13),
    ("publish without data", '{"op":"publish","id":14,"channel":"pub.x"}', "bad_request", 14),
    ("publish null data", '{"op":"publish","id":14,"channel":"pub.x","data":null}', "ack", 14),
    ("publish not allowed", '{"op":"publish","id":14,"channel":"news","data":1}', "forbidden",
     14),
    ("publish bad channel", '{"op":"publish","id":14,"channel":"a b","data":1}', "bad_channel",
     14),
    ("refresh without token", '{"op":"refresh","id":15}', "bad_request", 15),
    ("refresh empty token", '{"op":"refresh","id":15,"token":""}', "bad_request", 15),
    ("refresh token number", '{"op":"refresh","id":15,"token":5}', "bad_request", 15),
    # ids of every type
    ("id null", '{"op":"ping","id":null}', "pong", None),
    ("no id", '{"op":"ping"}', "pong", None),
    ("id zero", '{"op":"ping","id":0}', "pong", 0),
    ("id negative", '{"op":"ping","id":-5}', "pong", -5),
    ("id empty string", '{"op":"ping","id":""}', "pong", ""),
    ("id unicode", '{"op":"ping","id":"\u00e9\u6f22\U0001F600\\u0000"}', "pong",
     "\u00e9\u6f22\U0001F600\u0000"),
    ("id float", '{"op":"ping","id":1.5}', "bad_request", None),
    ("id integral float", '{"op":"ping","id":1.0}', "bad_request", None),
    ("id true", '{"op":"ping","id":true}', "bad_request", None),
    ("id false", '{"op":"ping","id":false}', "bad_request", None),
    ("id list", '{"op":"ping","id":[1]}', "bad_request", None),
    ("id object", '{"op":"ping","id":{"a":1}}', "bad_request", None),
    ("bad id and bad op", '{"op":"dance","id":[1]}', "bad_request", None),
    ("bad id and bad channel", '{"op":"subscribe","id":{},"channel":"a b"}', "bad_request", None),
    ("string id with error", '{"op":"subscribe","id":"s-1","channel":"a b"}', "bad_channel",
     "s-1"),
    ("duplicate op key", '{"op":"dance","op":"ping","id":16}', "pong", 16),
]


async def test_hostile_frames_get_their_error_and_the_connection_stays_open(hub_factory):
    # --max-payload-bytes: one of the publishes below is a 200 KB string
    hub = hub_factory("--max-message-bytes", str(1 << 20), "--max-payload-bytes", "300000",
                      "--client-publish", "pub.*", "--rate-limit", "0")
    async with open_ws(hub.ws_url + "?user=alice") as ws, open_ws(hub.ws_url) as other:
        await send_recv(other, {"op": "subscribe", "channel": "pub.x", "id": 0})
        for n, (what, frame, expected, cid) in enumerate(HOSTILE):
            reply = await send_recv(ws, frame, timeout=10)
            if expected in ("pong", "ack"):
                assert reply == {"type": expected, "id": cid}, (what, reply)
            else:
                assert reply["type"] == "error", (what, reply)
                assert reply["code"] == expected, (what, reply)
                assert reply["id"] == cid, (what, reply)
                assert isinstance(reply["message"], str) and 0 < len(reply["message"]) < 300, (
                    what, reply)
            # No RecursionError, no stall: the very next command is answered.
            await assert_alive(ws, f"after-{n}")
        # The other client saw exactly the publishes that were acked, in order.
        got = [(await recv_json(other))["data"] for _ in range(4)]
        assert got[0] == json.loads("[" * 50 + "]" * 50)
        assert got[1] == float(2**70)
        assert got[2] == "d" * 200_000
        assert got[3] is None
        await assert_alive(other)
    assert_clean_log(hub)


async def test_hostile_frames_from_many_clients_at_once_leave_others_served(hub_factory):
    hub = hub_factory("--max-message-bytes", str(1 << 20), "--rate-limit", "0")
    frames = [frame for _, frame, _, _ in HOSTILE]

    async def attacker() -> None:
        async with open_ws(hub.ws_url) as ws:
            for frame in frames:
                await ws.send(frame)
            replies = [await recv_json(ws, 20) for _ in frames]
            assert len(replies) == len(frames)
            await assert_alive(ws)

    async with open_ws(hub.ws_url) as bystander:
        tasks = [asyncio.create_task(attacker()) for _ in range(5)]
        for i in range(20):
            await assert_alive(bystander, i)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await assert_alive(bystander)
    assert_clean_log(hub)


DEEP_CASES = [
    ("deep object", '{"a":' * DEEP + "1" + "}" * DEEP),
    ("deep mixed", '[{"":' * DEEP + "1" + "}]" * DEEP),
    ("deep in a field", '{"op":"ping","id":1,"x":' + "[" * DEEP + "]" * DEEP + "}"),
    ("deep data", '{"op":"publish","id":2,"channel":"pub.x","data":' + "[" * DEEP
     + "]" * DEEP + "}"),
]


async def test_nesting_deeper_than_1024_is_refused_and_the_process_survives(hub_factory):
    """protocol.parse_command promises bad_request for nesting past 1024 levels."""
    hub = hub_factory("--max-message-bytes", str(1 << 20), "--client-publish", "pub.*",
                      "--rate-limit", "0")
    async with open_ws(hub.ws_url) as bystander:
        for what, frame in DEEP_CASES:
            async with open_ws(hub.ws_url) as ws:
                reply = await send_recv(ws, frame, timeout=10)
                assert (reply["type"], reply["code"], reply["id"]) == (
                    "error", "bad_request", None), (what, reply)
                await assert_alive(ws)
            await assert_alive(bystander, what)
    assert_clean_log(hub)


# -- Origin ------------------------------------------------------------------------------

async def test_allowed_origin_refuses_other_origins_with_403(hub_factory):
    hub = hub_factory("--allowed-origin", "https://app.example",
                      "--allowed-origin", "https://admin.example")
    for origin in ("https://evil.example", "http://app.example", "https://app.example.evil",
                   "https://APP.example", "null", "https://app.example:443",
                   "https://evil.example/https://app.example"):
        assert await handshake_status(hub.ws_url, origin=origin) == 403, origin
    for origin in ("https://app.example", "https://admin.example", None):
        async with open_ws(hub.ws_url, origin=origin) as ws:
            await assert_alive(ws)
    assert hub.proc.poll() is None


async def test_without_allowed_origin_any_origin_is_accepted(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url, origin="https://anything.example") as ws:
        await assert_alive(ws)


# -- JWT handshake -----------------------------------------------------------------------

@pytest.fixture
def jwt_hub(hub_factory):
    return hub_factory("--jwt-secret", SECRET, "--auth-timeout", "0.5")


async def test_jwt_bearer_header_and_query_token_both_work(jwt_hub):
    async with open_ws(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {make_token(SECRET, 'alice')}"}) as ws:
        assert await user_of(ws) == "alice"
    async with open_ws(f"{jwt_hub.ws_url}?token={make_token(SECRET, 'bob')}") as ws:
        assert await user_of(ws) == "bob"
    async with open_ws(jwt_hub.ws_url, additional_headers={
            # the scheme is case-blind
            "Authorization": f"bearer {make_token(SECRET, 'alice')}"}) as ws:
        assert await user_of(ws) == "alice"


async def test_jwt_header_wins_over_query(jwt_hub):
    url = f"{jwt_hub.ws_url}?token={make_token(SECRET, 'bob')}"
    async with open_ws(url, additional_headers={
            "Authorization": f"Bearer {make_token(SECRET, 'alice')}"}) as ws:
        assert await user_of(ws) == "alice"
    # A bad header token is not rescued by a good query token.
    assert await handshake_status(url, additional_headers={
        "Authorization": f"Bearer {make_token(OTHER_SECRET, 'alice')}"}) == 401
    # A header with another scheme is no token: the query one is used.
    async with open_ws(url, additional_headers={"Authorization": "Basic YTpi"}) as ws:
        assert await user_of(ws) == "bob"


def rs256_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, key, algorithm="RS256")


def bad_tokens() -> dict[str, str]:
    good = make_token(SECRET, "alice")
    header, payload, signature = good.split(".")
    exp = int(time.time()) + 300
    return {
        "forged": make_token(OTHER_SECRET, "alice"),
        "expired": make_token(SECRET, "alice", ttl=-30),
        "alg none": jwt.encode({"sub": "alice", "exp": exp}, "", algorithm="none"),
        "alg None, hand-made": b64({"alg": "None", "typ": "JWT"}) + "."
        + b64({"sub": "alice", "exp": exp}) + ".",
        "alg none with a signature": b64({"alg": "none"}) + "." + b64({"sub": "alice"}) + "."
        + signature,
        "RS256": rs256_token(),
        "HS512 with the right secret": make_token(SECRET, "alice", algorithm="HS512"),
        "HS384 with the right secret": make_token(SECRET, "alice", algorithm="HS384"),
        "tampered sub": header + "." + b64({"sub": "bob", "exp": exp}) + "." + signature,
        "no signature": header + "." + payload + ".",
        "garbage": "not-a-jwt",
        "two parts": header + "." + payload,
        "sub missing": make_token(SECRET, None),
        "sub number": make_token(SECRET, 123),
        "sub list": make_token(SECRET, ["alice"]),
        "sub null": jwt.encode({"sub": None, "exp": exp}, SECRET, algorithm="HS256"),
        "sub with a space": make_token(SECRET, "alice bob"),
        "sub too long": make_token(SECRET, "a" * 124),
        "channels not a list": make_token(SECRET, "alice", channels="private:*"),
        "channels of numbers": make_token(SECRET, "alice", channels=[1, 2]),
        "exp not a number": jwt.encode({"sub": "alice", "exp": "soon"}, SECRET,
                                       algorithm="HS256"),
        "not yet valid": make_token(SECRET, "alice", nbf=int(time.time()) + 3600),
    }


async def test_jwt_bad_tokens_get_401_without_upgrade(jwt_hub):
    # No token at all is no longer a 401: the connection is pending in-band authentication
    # (tests/system/test_inband_auth.py); a header of another scheme is no token either.
    for headers in ({}, {"Authorization": "Basic YTpi"},
                    {"Authorization": "Token " + make_token(SECRET, "alice")}):
        async with open_ws(jwt_hub.ws_url, additional_headers=headers) as ws:
            code, _ = await wait_close(ws, timeout=15)  # sent nothing: authentication timeout
            assert code == 4005, headers
    for value in ("Bearer ", "Bearer"):
        assert await handshake_status(jwt_hub.ws_url, additional_headers={
            "Authorization": value}) == 401, value
    assert await handshake_status(jwt_hub.ws_url + "?token=") == 401
    assert await handshake_status(jwt_hub.ws_url + "?token=&user=alice") == 401
    for what, bad in bad_tokens().items():
        assert await handshake_status(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {bad}"}) == 401, what
        assert await handshake_status(f"{jwt_hub.ws_url}?token={bad}") == 401, what
    async with open_ws(f"{jwt_hub.ws_url}?token={make_token(SECRET, 'alice')}") as ws:
        await assert_alive(ws)
    assert_clean_log(jwt_hub)


async def test_jwt_empty_sub_gets_401(jwt_hub):
    assert await handshake_status(f"{jwt_hub.ws_url}?token={make_token(SECRET, '')}") == 401


def sized_token(length: int) -> str:
    """A valid token for alice of exactly ``length`` characters."""
    pad = 0
    tok = make_token(SECRET, "alice", pad="")
    while len(tok) < length:
        pad += max(1, (length - len(tok)) * 3 // 4)
        tok = make_token(SECRET, "alice", pad="p" * pad)
        while len(tok) > length:
            pad -= 1
            tok = make_token(SECRET, "alice", pad="p" * pad)
    assert len(tok) == length, (len(tok), length)
    return tok


async def test_jwt_longer_than_4096_characters_is_refused(jwt_hub):
    at_limit = sized_token(4096)
    async with open_ws(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {at_limit}"}) as ws:
        assert await user_of(ws) == "alice"
    for length in (4097, 6000):
        long = make_token(SECRET, "alice", pad="p" * length)
        assert len(long) > 4096
        assert await handshake_status(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {long}"}) == 401
        assert await handshake_status(f"{jwt_hub.ws_url}?token={long}") == 401
    async with open_ws(f"{jwt_hub.ws_url}?token={at_limit}") as ws:
        long_refresh = make_token(SECRET, "alice", pad="p" * 5000)
        reply = await send_recv(ws, {"op": "refresh", "token": long_refresh, "id": "r"})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unauthorized", "r")


async def test_repeated_authorization_header_gets_a_4xx_not_a_500(jwt_hub):
    status = await handshake_status(jwt_hub.ws_url, additional_headers=[
        ("Authorization", f"Bearer {make_token(SECRET, 'alice')}"),
        ("Authorization", f"Bearer {make_token(SECRET, 'bob')}")])
    assert 400 <= status < 500, status
    assert_clean_log(jwt_hub)


async def test_query_with_many_fields_gets_a_4xx_not_a_500(jwt_hub):
    many = "&".join(f"f{i}=x" for i in range(20))
    status = await handshake_status(f"{jwt_hub.ws_url}?{many}&token={make_token(SECRET, 'alice')}")
    assert 400 <= status < 500, status
    assert_clean_log(jwt_hub)


# -- JWT: the token never reaches the log --------------------------------------------------

async def test_tokens_never_appear_in_the_log_even_at_debug(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--log-level", "debug")
    used = {
        "query": make_token(SECRET, "alice", ttl=301),
        "header": make_token(SECRET, "bob", ttl=302),
        "refresh": make_token(SECRET, "alice", ttl=303),
        "refresh other user": make_token(SECRET, "bob", ttl=304),
        "expired": make_token(SECRET, "alice", ttl=-10),
        "forged": make_token(OTHER_SECRET, "alice"),
        "bad refresh": make_token(OTHER_SECRET, "alice", ttl=305),
    }
    async with open_ws(f"{hub.ws_url}?token={used['query']}") as ws:
        for key in ("refresh", "refresh other user", "bad refresh", "expired"):
            await send_recv(ws, {"op": "refresh", "token": used[key], "id": key})
        await assert_alive(ws)
    async with open_ws(hub.ws_url, additional_headers={
            "Authorization": f"Bearer {used['header']}"}) as ws:
        await assert_alive(ws)
    for key in ("expired", "forged"):
        assert await handshake_status(f"{hub.ws_url}?token={used[key]}") == 401
        assert await handshake_status(hub.ws_url, additional_headers={
            "Authorization": f"Bearer {used[key]}"}) == 401
    hub.terminate()
    hub.wait(15)
    log = hub.log_text()
    for key, tok in used.items():
        assert tok not in log, key
        for part in tok.split("."):  # not even its signature or payload
            assert part not in log, key


# -- JWT: private channels ------------------------------------------------------------------

async def test_channels_claim_grants_private_channels(jwt_hub):
    grant = make_token(SECRET, "mallory",
                       channels=["private:team-a", "private:proj-*", "user:alice", "news"])
    async with open_ws(f"{jwt_hub.ws_url}?token={grant}") as ws:
        for channel in ("private:team-a", "private:proj-1", "private:proj-x/y", "private:proj-"):
            assert await subscribe_reply(ws, channel) == {"type": "ack", "id": 1}, channel
        for channel in ("private:team-b", "private:team-a2", "private:team", "private:proj",
                        "private:proj_1", "private:", "private:x", "user:alice",
                        "private:TEAM-A"):
            reply = await subscribe_reply(ws, channel)
            assert (reply["type"], reply["code"]) == ("error", "forbidden"), (channel, reply)
        for channel in ("Private:team-a", "PRIVATE:team-a", "private:team-a ",
                        "private:team-a\u0000", "private:team\u2010a", "\uff50rivate:team-a"):
            reply = await subscribe_reply(ws, channel)
            assert (reply["type"], reply["code"]) == ("error", "bad_channel"), (channel, reply)
    # no claim, no grant
    async with open_ws(f"{jwt_hub.ws_url}?token={make_token(SECRET, 'bob')}") as ws:
        reply = await subscribe_reply(ws, "private:team-a")
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
    grant_all = make_token(SECRET, "eve", channels=["private:*", "*"])
    async with open_ws(f"{jwt_hub.ws_url}?token={grant_all}") as ws:
        assert await subscribe_reply(ws, "private:anything") == {"type": "ack", "id": 1}
        # The channels claim is about private: channels only; personal ones stay personal.
        reply = await subscribe_reply(ws, "user:alice")
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply


# -- JWT: expiry and refresh ----------------------------------------------------------------

async def test_token_expiring_while_connected_closes_with_4001(jwt_hub):
    exp = int(time.time()) + 3
    tok = make_token(SECRET, "alice", exp=exp)
    async with open_ws(f"{jwt_hub.ws_url}?token={tok}") as ws, \
            open_ws(f"{jwt_hub.ws_url}?token={make_token(SECRET, 'bob')}") as other:
        await assert_alive(ws)
        code, closed_at = await wait_close(ws, timeout=15)
        assert code == 4001
        assert closed_at >= exp - 0.5, "closed before the token expired"
        await assert_alive(other)


async def test_refresh_before_expiry_keeps_the_connection_open(jwt_hub):
    exp = int(time.time()) + 3
    first = make_token(SECRET, "alice", exp=exp)
    async with open_ws(f"{jwt_hub.ws_url}?token={first}") as ws:
        reply = await send_recv(ws, {"op": "refresh", "token": make_token(SECRET, "alice", ttl=60),
                                     "id": 1})
        assert reply == {"type": "ack", "id": 1}
        await asyncio.sleep(max(0.0, exp - time.time()) + 1.5)
        await assert_alive(ws)  # past the first token's exp and still open
        assert await user_of(ws) == "alice"
        # A refresh without exp is accepted as well (no expiry from then on).
        assert await send_recv(ws, {"op": "refresh", "token": make_token(SECRET, "alice", ttl=None),
                                    "id": 2}) == {"type": "ack", "id": 2}


async def test_failed_refreshes_answer_an_error_and_keep_the_old_expiry(jwt_hub):
    exp = int(time.time()) + 4
    first = make_token(SECRET, "alice", exp=exp)
    async with open_ws(f"{jwt_hub.ws_url}?token={first}") as ws:
        reply = await send_recv(ws, {"op": "refresh", "token": make_token(SECRET, "bob", ttl=600),
                                     "id": "o"})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "forbidden", "o"), reply
        for what, bad in bad_tokens().items():
            reply = await send_recv(ws, {"op": "refresh", "token": bad, "id": what})
            assert reply["type"] == "error" and reply["id"] == what, (what, reply)
            assert reply["code"] == "unauthorized", (what, reply)
        assert await user_of(ws) == "alice"
        # None of them moved the expiry: the connection still closes at the first exp.
        code, closed_at = await wait_close(ws, timeout=15)
        assert code == 4001
        assert closed_at >= exp - 0.5


async def test_refresh_with_fewer_channels_revokes_private_subscriptions(redis_server,
                                                                        hub_factory):
    """docs/protocol.md: on refresh the new token's exp and channels apply from now."""
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    wide = make_token(SECRET, "alice", channels=["private:team-a", "private:team-b"])
    async with open_ws(f"{hub.ws_url}?token={wide}") as ws:
        for channel in ("private:team-a", "private:team-b"):
            assert await subscribe_reply(ws, channel) == {"type": "ack", "id": 1}
        narrow = make_token(SECRET, "alice", channels=["private:team-b"])
        assert await send_recv(ws, {"op": "refresh", "token": narrow, "id": 2}) == {
            "type": "ack", "id": 2}
        # the connection is told (issue 13: a subscription never goes quiet without a word)
        assert await recv_json(ws) == {"type": "unsubscribed", "channel": "private:team-a",
                                       "reason": "revoked"}
        reply = await subscribe_reply(ws, "private:team-a", cid=3)
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
        redis = redis_server.client()
        redis.publish("hub:private:team-a", b'"revoked"')
        redis.publish("hub:private:team-b", b'"still granted"')
        assert await recv_json(ws) == {"type": "message", "channel": "private:team-b",
                                       "data": "still granted"}


async def test_refresh_when_authentication_is_off_is_a_bad_request(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        reply = await send_recv(ws, {"op": "refresh", "token": make_token(SECRET, "alice"),
                                     "id": 1})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_request", 1)
        await assert_alive(ws)


# -- personal and private channels against look-alike names ---------------------------------

LOOKALIKES = {
    # name: expected error code
    "User:alice": "bad_channel",
    "USER:alice": "bad_channel",
    "uSeR:alice": "bad_channel",
    "user:alice ": "bad_channel",
    " user:alice": "bad_channel",
    "user: alice": "bad_channel",
    "user:alice\t": "bad_channel",
    "user:alice\n": "bad_channel",
    "user:%61lice": "bad_channel",
    "user%3Aalice": "bad_channel",
    "user:alice\u0000": "bad_channel",
    "user:alice\u200b": "bad_channel",  # zero-width space
    "\uff55ser:alice": "bad_channel",  # full-width u
    "user\uff1aalice": "bad_channel",  # full-width colon
    "user:\u0430lice": "bad_channel",  # Cyrillic a
    "user:al\u0131ce": "bad_channel",  # dotless i
    "user:alic\u0065\u0301": "bad_channel",  # combining accent
    "user:\uff41lice": "bad_channel",  # full-width a
    "user:alice": "forbidden",
    "user:ALICE": "forbidden",
    "user:Alice": "forbidden",
    "user:alice/": "forbidden",
    "user:alice.": "forbidden",
    "user:alice:x": "forbidden",
    "user:": "forbidden",
    "Private:x": "bad_channel",
    "PRIVATE:x": "bad_channel",
    "private :x": "bad_channel",
    "\uff50rivate:x": "bad_channel",
    "private:x": "forbidden",
}


async def test_lookalike_channel_names_never_reach_someone_elses_messages(redis_server,
                                                                          hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    redis = redis_server.client()
    alice_token = make_token(SECRET, "alice", channels=["private:x"])
    async with open_ws(f"{hub.ws_url}?token={alice_token}") as alice, \
            open_ws(f"{hub.ws_url}?token={make_token(SECRET, 'mallory')}") as mallory:
        assert await subscribe_reply(alice, "private:x") == {"type": "ack", "id": 1}
        for n, (name, code) in enumerate(LOOKALIKES.items()):
            reply = await subscribe_reply(mallory, name, cid=n)
            assert reply["type"] == "error", (name, reply)
            assert (reply["code"], reply["id"]) == (code, n), (name, reply)
            # unsubscribing a look-alike must not touch anyone either
            await send_recv(mallory, {"op": "unsubscribe", "channel": name, "id": "u"})

        # Publish to alice's channels and to the Redis channel of every look-alike.
        for name in LOOKALIKES:
            if name not in ("user:alice", "private:x"):  # alice's own, published below
                redis.publish(("hub:" + name).encode(), b'"leak"')
        redis.publish("hub:user:alice", b'"for alice"')
        redis.publish("hub:private:x", b'"for team x"')
        assert await recv_json(alice) == {"type": "message", "channel": "user:alice",
                                          "data": "for alice"}
        assert await recv_json(alice) == {"type": "message", "channel": "private:x",
                                          "data": "for team x"}
        # Alice has both; a subscriber's copy is written in the same step, so anything meant
        # for mallory would come before this pong.
        await assert_alive(mallory, "nothing-before-me")
        await assert_alive(alice)
    assert redis_server.numsub("hub:User:alice") == 0
    assert_clean_log(hub)


async def test_anonymous_clients_cannot_take_personal_channels(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)  # authentication off: ?user= is the development id
    async with open_ws(hub.ws_url + "?user=alice") as alice, open_ws(hub.ws_url) as anon:
        for name in ("user:alice", "user:", "private:x"):
            reply = await subscribe_reply(anon, name)
            assert (reply["type"], reply["code"]) == ("error", "forbidden"), (name, reply)
        for user in ("alice%20", "%61lice%00", "ALICE%20", "a/../b%20c", "%C3%A4"):
            status = await handshake_status(f"{hub.ws_url}?user={user}")
            assert status == 400, (user, status)
        redis_server.client().publish("hub:user:alice", b"1")
        assert await recv_json(alice) == {"type": "message", "channel": "user:alice", "data": 1}
        await assert_alive(anon)
