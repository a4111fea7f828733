"""Limits: message size, invalid UTF-8, subscriptions, connections and the command rate.

Each limit must give the offending client a clear error or close code and leave every other
client, and the process, untouched. Real ``hub serve`` processes, real clients, loopback only.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import (
    assert_alive,
    make_token,
    open_ws,
    recv_json,
    send_recv,
    wait_close,
    wait_until,
)


def assert_process_healthy(hub) -> None:
    assert hub.proc.poll() is None, hub.log_text()
    assert hub.http_get("/healthz")[0] == 200
    log = hub.log_text()
    assert "Traceback" not in log and "handler failed" not in log, log


# -- message size and encoding -------------------------------------------------------------

async def test_frame_over_max_message_bytes_closes_1009_and_others_keep_working(hub_factory):
    hub = hub_factory("--max-message-bytes", "1024")
    async with open_ws(hub.ws_url) as big, open_ws(hub.ws_url) as other:
        # A frame of exactly the limit is fine.
        at_limit = '{"op":"ping","id":"x","pad":"' + "p" * 1000 + '"}'
        at_limit = at_limit.replace("p" * 1000, "p" * (1000 + 1024 - len(at_limit)))
        assert len(at_limit.encode()) == 1024
        assert await send_recv(big, at_limit) == {"type": "pong", "id": "x"}

        await big.send('{"op":"ping","id":1,"pad":"' + "p" * 1024 + '"}')
        assert (await wait_close(big, 10.0))[0] == 1009
        await assert_alive(other)

    # A message that only goes over the limit once its fragments are joined, too.
    async with open_ws(hub.ws_url) as frag, open_ws(hub.ws_url) as other:
        await frag.send(iter(['{"op":"ping","pad":"', "q" * 600, "q" * 600, '"}']))
        assert (await wait_close(frag, 10.0))[0] == 1009
        await assert_alive(other)
    assert_process_healthy(hub)


async def test_invalid_utf8_in_a_text_frame_closes_1007(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url) as bad, open_ws(hub.ws_url) as other:
        await assert_alive(bad)
        # A text frame whose payload is not UTF-8 (RFC 6455 section 8.1): the client library
        # would refuse to build it from str, so hand raw bytes to its protocol layer.
        bad.protocol.send_text(b'{"op":"ping","id":"\xff\xfe"}')
        bad.send_data()
        assert (await wait_close(bad, 10.0))[0] == 1007
        await assert_alive(other)
    assert_process_healthy(hub)


# -- subscriptions per connection ----------------------------------------------------------

async def test_max_subscriptions_refuses_the_next_and_keeps_the_earlier(redis_server,
                                                                       hub_factory):
    hub = hub_factory("--max-subscriptions", "3", redis=redis_server)
    redis = redis_server.client()
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        for i in range(3):
            assert await send_recv(ws, {"op": "subscribe", "channel": f"c{i}", "id": i}) == {
                "type": "ack", "id": i}
        reply = await send_recv(ws, {"op": "subscribe", "channel": "c3", "id": "over"})
        assert reply["type"] == "error" and reply["code"] == "limit_exceeded", reply
        assert reply["id"] == "over" and reply["message"]
        # Subscribing again to a channel it already has is not a new subscription.
        assert await send_recv(ws, {"op": "subscribe", "channel": "c1", "id": 9}) == {
            "type": "ack", "id": 9}
        assert redis_server.numsub("hub:c3") == 0

        # The earlier subscriptions and the personal channel (which does not count) deliver.
        for name in ("c0", "c1", "c2", "c3", "user:alice"):
            redis.publish(f"hub:{name}", json.dumps({"to": name}))
        got = [await recv_json(ws) for _ in range(4)]
        assert got == [{"type": "message", "channel": n, "data": {"to": n}}
                       for n in ("c0", "c1", "c2", "user:alice")]
        await assert_alive(ws)  # and nothing from c3 came before the pong

        # Leaving one frees a slot.
        assert await send_recv(ws, {"op": "unsubscribe", "channel": "c0", "id": 10}) == {
            "type": "ack", "id": 10}
        assert await send_recv(ws, {"op": "subscribe", "channel": "c3", "id": 11}) == {
            "type": "ack", "id": 11}
        redis.publish("hub:c3", "3")
        assert await recv_json(ws) == {"type": "message", "channel": "c3", "data": 3}


async def test_default_max_subscriptions_is_128_per_connection(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url + "?user=bob") as ws, open_ws(hub.ws_url) as other:
        for i in range(128):
            await ws.send(json.dumps({"op": "subscribe", "channel": f"ch.{i}", "id": i}))
        for i in range(128):
            assert await recv_json(ws) == {"type": "ack", "id": i}
        reply = await send_recv(ws, {"op": "subscribe", "channel": "ch.128", "id": 128})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "limit_exceeded", 128)
        # The limit is per connection.
        assert await send_recv(other, {"op": "subscribe", "channel": "ch.128", "id": 1}) == {
            "type": "ack", "id": 1}
        await assert_alive(ws)


# -- connections per process -------------------------------------------------------------

async def test_max_connections_answers_503_until_one_closes(hub_factory):
    hub = hub_factory("--max-connections", "2")
    async with open_ws(hub.ws_url) as first:
        async with open_ws(hub.ws_url) as second:
            for _ in range(3):  # refused handshakes must not use up slots themselves
                with pytest.raises(InvalidStatus) as info:
                    async with open_ws(hub.ws_url):
                        pass
                assert info.value.response.status_code == 503
            assert hub.http_get("/healthz")[0] == 200  # plain HTTP is not a connection
            await assert_alive(first)
            await assert_alive(second)

        # `second` closed: a new handshake is accepted once the hub has seen it go.
        async def try_connect() -> bool:
            try:
                async with open_ws(hub.ws_url) as third:
                    await assert_alive(third)
                return True
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                return False

        for _ in range(100):
            if await try_connect():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no connection accepted after one of two closed")
        await assert_alive(first)
    assert_process_healthy(hub)


async def test_refused_handshakes_do_not_leak_connection_slots(hub_factory):
    secret = "s" * 40
    hub = hub_factory("--max-connections", "1", "--jwt-secret", secret,
                      "--allowed-origin", "https://app.example")
    for _ in range(5):
        with pytest.raises(InvalidStatus) as info:  # a bad token (no token is not refused)
            async with open_ws(hub.ws_url + "?token=not-a-jwt"):
                pass
        assert info.value.response.status_code == 401
    token = make_token(secret, "u1", ttl=None)
    for _ in range(5):
        with pytest.raises(InvalidStatus) as info:  # a good token from a foreign origin
            async with open_ws(f"{hub.ws_url}?token={token}", origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403

    async def accepted() -> bool:
        try:
            async with open_ws(f"{hub.ws_url}?token={token}") as ws:
                await assert_alive(ws)
            return True
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            return False

    ok = False
    for _ in range(60):  # each refused connection is forgotten when its TCP link goes
        if await accepted():
            ok = True
            break
        await asyncio.sleep(0.05)
    assert ok, "the only slot stayed taken after refused handshakes"


# -- command rate ------------------------------------------------------------------------

async def test_excess_commands_get_rate_limited_and_the_connection_recovers(hub_factory):
    hub = hub_factory("--rate-limit", "5")  # 5 commands/s, a burst of 10
    async with open_ws(hub.ws_url) as ws:
        # 16 commands at once: the burst of 10 passes, some of the rest are dropped with an
        # error (at most 6 strikes, well below the flood threshold of the burst size).
        for i in range(16):
            await ws.send(json.dumps({"op": "ping", "id": i}))
        replies = [await recv_json(ws) for _ in range(16)]
        assert replies[:10] == [{"type": "pong", "id": i} for i in range(10)]
        limited = [r for r in replies if r["type"] == "error"]
        assert limited, replies
        for reply in limited:
            assert reply["code"] == "rate_limited" and reply["message"], reply
        for reply in replies[10:]:
            assert reply["type"] == "pong" or reply["code"] == "rate_limited", reply
        # The bucket refills: after a pause the connection is served again.
        await asyncio.sleep(1.0)
        await assert_alive(ws)


async def flood_until_closed(ws, timeout: float = 20.0) -> int | None:
    """Send pings as fast as possible until the hub closes ``ws``; return its close code."""

    async def spam() -> None:
        try:
            for i in range(2000):
                await ws.send(json.dumps({"op": "ping", "id": i}))
        except ConnectionClosed:
            pass

    sender = asyncio.create_task(spam())
    try:
        return (await wait_close(ws, timeout))[0]
    finally:
        await asyncio.wait_for(sender, 10)


async def test_sustained_flood_is_closed_and_spares_other_clients(hub_factory):
    hub = hub_factory("--rate-limit", "5")
    async with open_ws(hub.ws_url) as flood, open_ws(hub.ws_url) as calm:
        assert await send_recv(flood, {"op": "subscribe", "channel": "news", "id": 0}) == {
            "type": "ack", "id": 0}
        await flood_until_closed(flood)  # raises TimeoutError if the hub never closes it
        await assert_alive(calm)
        # The calm client still has the rest of its own burst of 10 (one went on the ping).
        for i in range(9):
            await calm.send(json.dumps({"op": "ping", "id": i}))
        assert [await recv_json(calm) for _ in range(9)] == [
            {"type": "pong", "id": i} for i in range(9)]

    # A new connection is served normally too.
    async with open_ws(hub.ws_url) as later:
        await assert_alive(later)
    assert "closing flooding connection" in hub.log_text()
    assert_process_healthy(hub)


async def test_sustained_flood_close_code_is_4029(hub_factory):
    hub = hub_factory("--rate-limit", "5")
    async with open_ws(hub.ws_url) as flood:
        assert await flood_until_closed(flood) == 4029


async def test_rate_limit_zero_disables_the_limiter(hub_factory):
    hub = hub_factory("--rate-limit", "0")
    async with open_ws(hub.ws_url) as ws:
        for i in range(500):
            await ws.send(json.dumps({"op": "ping", "id": i}))
        replies = [await recv_json(ws) for _ in range(500)]
        assert replies == [{"type": "pong", "id": i} for i in range(500)]


async def test_healthz_answers_while_the_process_is_at_its_limits(hub_factory):
    """Limits guard the WebSocket endpoint; the probes keep answering."""
    hub = hub_factory("--max-connections", "1")
    async with open_ws(hub.ws_url) as ws:
        await assert_alive(ws)
        wait_until(lambda: hub.http_get("/healthz")[0] == 200, 5, what="/healthz")
        assert hub.http_get("/readyz")[0] == 200
        assert hub.http_get("/metrics")[0] == 200


async def test_client_publish_over_max_payload_bytes_is_refused_not_dropped(hub_factory):
    """A client's publish whose data would be delivered to nobody (over --max-payload-bytes,
    possible when --max-message-bytes is larger) gets limit_exceeded instead of an ack."""
    hub = hub_factory("--max-message-bytes", "200000", "--client-publish", "big")
    async with open_ws(hub.ws_url + "?user=a") as ws, open_ws(hub.ws_url) as other:
        await send_recv(other, {"op": "subscribe", "channel": "big", "id": 0})
        reply = await send_recv(ws, {"op": "publish", "channel": "big", "id": 7,
                                     "data": "x" * 100_000})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "limit_exceeded", 7)
        reply = await send_recv(ws, {"op": "publish", "channel": "big", "id": 8,
                                     "data": "x" * 60_000})
        assert reply == {"type": "ack", "id": 8}
        assert (await recv_json(other))["data"] == "x" * 60_000
