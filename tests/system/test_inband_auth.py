"""In-band authentication (``{"op":"connect"}`` as the first frame), its close codes, the log
line of every refused handshake, and the warning about ``--allowed-origin`` values no browser
can send. docs/protocol.md sections 2 to 4 are the contract.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from websockets.exceptions import ConnectionClosed

from hub.auth import MAX_TOKEN_BYTES
from tests.helpers import (
    assert_alive,
    handshake_status,
    make_token,
    open_ws,
    recv_json,
    send_recv,
    wait_close,
    wait_until,
)
from tests.system.test_security import OTHER_SECRET, SECRET, assert_clean_log, bad_tokens, user_of

AUTH_TIMEOUT = "0.5"


@pytest.fixture
def jwt_hub(hub_factory):
    return hub_factory("--jwt-secret", SECRET, "--auth-timeout", AUTH_TIMEOUT)


async def connect(ws, tok: object, cid: object = 1) -> dict:
    """Send a connect and return the next frame."""
    return await send_recv(ws, {"op": "connect", "token": tok, "id": cid})


async def closed_with(ws, timeout: float = 10) -> tuple[int | None, str]:
    """Wait for the hub's close frame: (code, reason)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, "")


# -- connect --------------------------------------------------------------------------------

async def test_connect_acks_with_the_user_client_and_exp(jwt_hub):
    exp = int(time.time()) + 300
    tok = make_token(SECRET, "alice", exp=exp, channels=["private:team-*"])
    async with open_ws(jwt_hub.ws_url) as ws:
        ack = await connect(ws, tok, cid="c-1")
        assert set(ack) == {"type", "id", "user", "client", "exp"}, ack
        assert (ack["type"], ack["id"], ack["user"], ack["exp"]) == ("ack", "c-1", "alice", exp)
        assert isinstance(ack["client"], str) and ack["client"]
        assert await user_of(ws) == "alice"
        # The token's channels claim applies.
        assert await send_recv(ws, {"op": "subscribe", "channel": "private:team-a",
                                    "id": 2}) == {"type": "ack", "id": 2}
        reply = await send_recv(ws, {"op": "subscribe", "channel": "private:other", "id": 3})
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
    async with open_ws(jwt_hub.ws_url) as first, open_ws(jwt_hub.ws_url) as second:
        a = await connect(first, make_token(SECRET, "bob", ttl=None))
        b = await connect(second, make_token(SECRET, "bob", ttl=None))
        assert a["exp"] is None and b["exp"] is None
        assert a["client"] != b["client"]  # one id per connection
    assert_clean_log(jwt_hub)


async def test_the_personal_channel_is_live_when_the_ack_arrives(redis_server, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    redis = redis_server.client()
    for n in range(5):
        async with open_ws(hub.ws_url) as ws:
            assert (await connect(ws, make_token(SECRET, "alice")))["type"] == "ack"
            # Right after the ack, with no subscribe: Redis already has the subscription.
            assert redis.publish("hub:user:alice", json.dumps({"n": n})) == 1
            assert await recv_json(ws) == {"type": "message", "channel": "user:alice",
                                           "data": {"n": n}}
        wait_until(lambda: redis_server.numsub("hub:user:alice") == 0, 10,
                   what="the personal channel released after close")


async def test_client_publish_to_the_personal_channel_reaches_an_in_band_connection(
        redis_server, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--client-publish", "user:*", redis=redis_server)
    async with open_ws(hub.ws_url) as alice, open_ws(
            f"{hub.ws_url}?token={make_token(SECRET, 'bob')}") as bob:
        assert (await connect(alice, make_token(SECRET, "alice")))["type"] == "ack"
        assert await send_recv(bob, {"op": "publish", "channel": "user:alice", "data": "hi",
                                     "id": 1}) == {"type": "ack", "id": 1}
        got = await recv_json(alice)
        assert got == {"type": "message", "channel": "user:alice", "data": "hi",
                       "from": {"user": "bob", "client": got["from"]["client"]}}
        assert isinstance(got["from"]["client"], str)


async def test_an_invalid_connect_token_closes_with_4002(jwt_hub):
    cases: dict[str, object] = dict(bad_tokens())
    del cases["expired"]  # 4001, below
    cases.update({
        "too long": make_token(SECRET, "alice", pad="p" * (MAX_TOKEN_BYTES + 10)),
        "not a string": 12345,
        "a list": [make_token(SECRET, "alice")],
        "null": None,
        "empty": "",
    })
    for what, bad in cases.items():
        async with open_ws(jwt_hub.ws_url) as ws:
            await ws.send(json.dumps({"op": "connect", "token": bad, "id": 1}))
            code, reason = await closed_with(ws)
            assert code == 4002, (what, code, reason)
            assert reason == "invalid token", (what, reason)
    async with open_ws(jwt_hub.ws_url) as ws:  # a connect without a token field
        await ws.send('{"op":"connect","id":1}')
        assert (await closed_with(ws))[0] == 4002
    assert_clean_log(jwt_hub)


async def test_an_expired_connect_token_closes_with_4001(jwt_hub):
    async with open_ws(jwt_hub.ws_url) as ws:
        await ws.send(json.dumps({"op": "connect", "token": make_token(SECRET, "alice", ttl=-30),
                                  "id": 1}))
        assert await closed_with(ws) == (4001, "token expired")


async def test_no_connect_within_auth_timeout_closes_with_4005(jwt_hub):
    async with open_ws(jwt_hub.ws_url) as ws:
        code, reason = await closed_with(ws, timeout=15)
        assert (code, reason) == (4005, "authentication timeout")
    async with open_ws(jwt_hub.ws_url) as ws:  # the hub is fine and the next one may connect
        assert (await connect(ws, make_token(SECRET, "alice")))["type"] == "ack"


async def test_a_connect_after_a_pause_within_the_timeout_is_accepted(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--auth-timeout", "5")
    async with open_ws(hub.ws_url) as ws:
        await asyncio.sleep(1.0)  # well past the 0.5 s the other tests use
        assert (await connect(ws, make_token(SECRET, "alice")))["user"] == "alice"


FIRST_FRAMES_THAT_ARE_NOT_CONNECT = [
    '{"op":"ping","id":1}',
    '{"op":"subscribe","channel":"news","id":1}',
    '{"op":"subscribe","channel":"user:alice","id":1}',
    '{"op":"publish","channel":"news","data":1,"id":1}',
    '{"op":"refresh","token":"x","id":1}',
    '{"op":"connect","token":"x","id":true}',
    '{"token":"x"}',
    "{",
    "not json",
    "[]",
    b'{"op":"connect","token":"x"}',
]


async def test_a_first_frame_other_than_connect_closes_with_4006(jwt_hub):
    for frame in FIRST_FRAMES_THAT_ARE_NOT_CONNECT:
        async with open_ws(jwt_hub.ws_url) as ws:
            await ws.send(frame)
            code, reason = await closed_with(ws)
            assert (code, reason) == (4006, "authentication required"), frame
    assert_clean_log(jwt_hub)


async def test_connect_on_an_authenticated_connection_is_a_bad_request(jwt_hub, hub_factory):
    async with open_ws(jwt_hub.ws_url) as ws:
        assert (await connect(ws, make_token(SECRET, "alice")))["type"] == "ack"
        reply = await connect(ws, make_token(SECRET, "bob"), cid=2)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_request", 2)
        assert reply["message"] == "already authenticated"
        await assert_alive(ws)
        assert await user_of(ws) == "alice"  # the second connect changed nothing
    async with open_ws(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {make_token(SECRET, 'alice')}"}) as ws:
        reply = await connect(ws, make_token(SECRET, "alice"))
        assert (reply["code"], reply["message"]) == ("bad_request", "already authenticated")
        await assert_alive(ws)
    dev = hub_factory()
    async with open_ws(dev.ws_url + "?user=alice") as ws:
        reply = await connect(ws, make_token(SECRET, "alice"))
        assert (reply["code"], reply["message"]) == ("bad_request", "authentication is off")
        await assert_alive(ws)


async def test_the_exp_of_a_connect_token_closes_with_4001(jwt_hub):
    exp = int(time.time()) + 3
    tok = make_token(SECRET, "alice", exp=exp)
    async with open_ws(jwt_hub.ws_url) as ws:
        assert (await connect(ws, tok))["exp"] == exp
        code, closed_at = await wait_close(ws, timeout=15)
        assert code == 4001
        assert closed_at >= exp - 0.5, "closed before the token expired"
    async with open_ws(jwt_hub.ws_url) as ws:  # refresh works as for a header token
        assert (await connect(ws, make_token(SECRET, "bob", exp=int(time.time()) + 2)))[
            "type"] == "ack"
        assert await send_recv(ws, {"op": "refresh", "token": make_token(SECRET, "bob"),
                                    "id": 2}) == {"type": "ack", "id": 2}
        await asyncio.sleep(3)
        await assert_alive(ws)


async def test_a_pending_connection_counts_against_max_connections(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--max-connections", "1", "--auth-timeout", "5")
    async with open_ws(hub.ws_url) as pending:
        assert await handshake_status(hub.ws_url) == 503
        assert (await connect(pending, make_token(SECRET, "alice")))["type"] == "ack"
        assert await handshake_status(f"{hub.ws_url}?token={make_token(SECRET, 'bob')}") == 503
    # Once it is gone the slot is free again.
    for _ in range(50):
        try:
            async with open_ws(hub.ws_url) as ws:
                assert (await connect(ws, make_token(SECRET, "bob")))["user"] == "bob"
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the slot of the closed connection was never freed")


async def test_header_and_query_tokens_work_as_before(jwt_hub):
    async with open_ws(jwt_hub.ws_url, additional_headers={
            "Authorization": f"Bearer {make_token(SECRET, 'alice')}"}) as ws:
        assert await user_of(ws) == "alice"  # no connect needed
    async with open_ws(f"{jwt_hub.ws_url}?token={make_token(SECRET, 'bob')}") as ws:
        await asyncio.sleep(1.0)  # past --auth-timeout: no 4005 for a query token
        assert await user_of(ws) == "bob"
    forged = make_token(OTHER_SECRET, "alice")
    assert await handshake_status(jwt_hub.ws_url, additional_headers={
        "Authorization": f"Bearer {forged}"}) == 401
    assert await handshake_status(f"{jwt_hub.ws_url}?token={forged}") == 401
    expired = make_token(SECRET, "a", ttl=-5)
    assert await handshake_status(f"{jwt_hub.ws_url}?token={expired}") == 401


async def test_broker_down_at_connect_answers_unavailable_then_1011(redis_server, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    redis_server.kill()
    async with open_ws(hub.ws_url) as ws:
        await ws.send(json.dumps({"op": "connect", "token": make_token(SECRET, "alice"), "id": 7}))
        reply = await recv_json(ws, 20)  # the subscribe confirmation waits up to 5 s
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", 7), reply
        assert (await closed_with(ws))[0] == 1011
    # The same user by header token: 503 at the handshake, logged once.
    assert await handshake_status(hub.ws_url, additional_headers={
        "Authorization": f"Bearer {make_token(SECRET, 'alice')}"}) == 503
    wait_until(lambda: "handshake refused (503)" in hub.log_text(), 10, what="the 503 line")
    assert hub.log_text().count("handshake refused (503)") == 1
    assert hub.proc.poll() is None


async def test_shutdown_closes_pending_connections_with_1001(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--auth-timeout", "30")
    async with open_ws(hub.ws_url) as ws:
        await asyncio.sleep(0.2)
        hub.terminate()
        assert (await closed_with(ws, timeout=15))[0] == 1001
    assert hub.wait(15) == 0


async def test_in_band_tokens_never_reach_the_log(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--auth-timeout", AUTH_TIMEOUT,
                      "--log-level", "debug")
    used = [make_token(SECRET, "alice", ttl=401), make_token(OTHER_SECRET, "alice"),
            make_token(SECRET, "x", ttl=-9), make_token(SECRET, "alice", pad="p" * 5000)]
    for tok in used:
        async with open_ws(hub.ws_url) as ws:
            await ws.send(json.dumps({"op": "connect", "token": tok, "id": 1}))
            try:
                await recv_json(ws)
                await assert_alive(ws)
            except ConnectionClosed:
                pass
    hub.terminate()
    hub.wait(15)
    log = hub.log_text()
    for tok in used:
        for part in tok.split("."):
            assert part not in log
    assert "authentication failed (4002)" in log and "authentication failed (4001)" in log
    assert "authenticated user=alice" in log


# -- refused handshakes are logged, once each, without the token ----------------------------

async def test_every_refused_handshake_is_logged_once_without_the_token(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--allowed-origin", "https://app.example",
                      "--max-connections", "1")
    forged = make_token(OTHER_SECRET, "alice")
    good = make_token(SECRET, "alice")
    # 401 by query and by header, 403 for a foreign Origin (carrying a good token), 404.
    assert await handshake_status(f"{hub.ws_url}?token={forged}&x=querymark") == 401
    assert await handshake_status(hub.ws_url, additional_headers={
        "Authorization": f"Bearer {forged}"}) == 401
    assert await handshake_status(f"{hub.ws_url}?token={good}",
                                  origin="https://evil.example") == 403
    assert await handshake_status(f"ws://127.0.0.1:{hub.port}/nope?token={good}") == 404
    assert await handshake_status(hub.ws_url, additional_headers=[
        ("Origin", "https://app.example"), ("Origin", "https://evil.example")]) == 400
    async with open_ws(f"{hub.ws_url}?token={good}", origin="https://app.example") as ws:
        assert await handshake_status(f"{hub.ws_url}?token={good}") == 503
        await assert_alive(ws)
    # A plain GET of /ws (no Upgrade): websockets answers 426, logged by the hub too.
    assert hub.http_get(f"/ws?token={good}")[0] == 426

    def counts() -> dict[int, int]:
        found = re.findall(r"handshake refused \((\d+)\)", hub.log_text())
        return {status: found.count(str(status)) for status in (400, 401, 403, 404, 426, 503)}

    expected = {400: 1, 401: 2, 403: 1, 404: 1, 426: 1, 503: 1}
    wait_until(lambda: counts() == expected, 10, what=f"one line per refusal {expected}")
    log = hub.log_text()
    for line in log.splitlines():
        if "handshake refused" in line:
            assert "remote=127.0.0.1" in line, line
            assert "?" not in line.partition("path=")[2].split(":")[0], line
    for tok in (forged, good):
        for part in tok.split("."):
            assert part not in log
    assert "querymark" not in log and "token=" not in log
    assert re.search(r" WARNING hub\.server\[\d+\] handshake refused \(403\) .*evil\.example",
                     log), log
    assert re.search(r" INFO hub\.server\[\d+\] handshake refused \(401\) ", log), log
    assert_clean_log(hub)


async def test_the_remote_address_behind_a_trusted_proxy_is_logged(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--trusted-proxy", "127.0.0.1")
    headers = {"X-Forwarded-For": "203.0.113.9"}
    assert await handshake_status(f"{hub.ws_url}?token=bad", additional_headers=headers) == 401
    async with open_ws(hub.ws_url, additional_headers=headers) as ws:
        assert (await connect(ws, make_token(SECRET, "alice")))["type"] == "ack"
    wait_until(lambda: "close user=alice" in hub.log_text(), 10, what="the close line")
    log = hub.log_text()
    assert re.search(r"handshake refused \(401\) remote=203\.0\.113\.9 ", log), log
    assert "authenticated user=alice remote=203.0.113.9" in log, log
    assert "close user=alice remote=203.0.113.9" in log, log


# -- the Origin warning at start --------------------------------------------------------------

async def test_unmatchable_allowed_origins_are_warned_about_at_start(hub_factory):
    hub = hub_factory("--allowed-origin", "https://app.example/",
                      "--allowed-origin", "app.example",
                      "--allowed-origin", "https://ok.example",
                      "--allowed-origin", "https://app.example/")
    log = hub.log_text()
    warnings = [line for line in log.splitlines() if "can never match" in line]
    assert len(warnings) == 2, log  # once per bad value, the repeated one included
    assert "'https://app.example/'" in warnings[0] and "trailing slash" in warnings[0]
    assert "'app.example'" in warnings[1] and "no scheme" in warnings[1]
    assert all("WARNING" in line for line in warnings), warnings
    assert "ok.example" not in "\n".join(warnings)
    # The good value still works; the bad ones never match what a browser sends.
    async with open_ws(hub.ws_url, origin="https://ok.example") as ws:
        await assert_alive(ws)
    assert await handshake_status(hub.ws_url, origin="https://app.example") == 403
    quiet = hub_factory("--allowed-origin", "https://ok.example")
    assert "can never match" not in quiet.log_text()
