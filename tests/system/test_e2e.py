"""End to end: real `hub serve` processes, a real redis-server, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from unittest.mock import ANY

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hub import AsyncPublisher, Publisher
from tests.helpers import (
    command,
    make_token,
    message,
    no_message,
    open_ws,
    recv_json,
    subscribe,
    wait_until_async,
)

SECRET = "test-secret-that-is-at-least-32-bytes-long!"


def redis_cli(redis, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(redis.port), *args], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()


async def test_cross_process_channel_and_personal_messages(redis_server, hub_factory):
    h1 = hub_factory(redis=redis_server)
    h2 = hub_factory(redis=redis_server)
    async with open_ws(h1.ws_url + "?user=alice") as a, \
            open_ws(h2.ws_url + "?user=bob") as b, open_ws(h2.ws_url) as c:
        for ws in (a, b, c):
            await subscribe(ws, "news")
        # PUBSUB NUMSUB counts hub processes, not clients.
        assert redis_server.numsub("hub:news") == 2
        assert redis_server.numsub("hub:user:alice") == 1

        assert redis_cli(redis_server, "PUBLISH", "hub:news", '{"title":"hi"}') == "2"
        for ws in (a, b, c):
            assert await recv_json(ws) == message("news", {"title": "hi"})

        # Any payload that is not JSON arrives as a JSON string; nothing is dropped.
        redis_cli(redis_server, "PUBLISH", "hub:news", "plain text")
        for ws in (a, b, c):
            assert await recv_json(ws) == message("news", "plain text")

        with Publisher(redis_server.url) as pub:
            assert pub.publish("news", [1, 2, 3]) == 2
            for ws in (a, b, c):
                assert await recv_json(ws) == message("news", [1, 2, 3])
            assert pub.publish_to_user("alice", {"to": "alice"}) == 1
        assert await recv_json(a) == message("user:alice", {"to": "alice"})

        async with AsyncPublisher(redis_server.url) as apub:
            assert await apub.publish_to_user("bob", "hello bob") == 1
        assert await recv_json(b) == message("user:bob", "hello bob")

        redis_cli(redis_server, "PUBLISH", "hub:user:alice", '{"via":"redis-cli"}')
        assert await recv_json(a) == message("user:alice", {"via": "redis-cli"})
        for ws in (b, c):
            await no_message(ws)


async def test_personal_channel_on_every_connection_without_duplicates(redis_server,
                                                                       hub_factory):
    h1 = hub_factory(redis=redis_server)
    h2 = hub_factory(redis=redis_server)
    async with open_ws(h1.ws_url + "?user=alice") as a1, open_ws(h2.ws_url + "?user=alice") as a2:
        # An explicit subscribe to one's own personal channel is acked and adds nothing.
        await subscribe(a1, "user:alice")
        # Leaving it is acked too, but the personal channel stays.
        assert await command(a2, op="unsubscribe", channel="user:alice", id=7) == {
            "type": "ack", "id": 7}
        with Publisher(redis_server.url) as pub:
            assert pub.publish_to_user("alice", 1) == 2
            assert pub.publish_to_user("alice", 2) == 2
        for ws in (a1, a2):
            assert await recv_json(ws) == message("user:alice", 1)
            assert await recv_json(ws) == message("user:alice", 2)
            await no_message(ws)


async def test_unsubscribe_stops_delivery_and_releases_redis_channel(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    async with open_ws(hub.ws_url) as a, open_ws(hub.ws_url) as b:
        await subscribe(a, "news")
        await subscribe(b, "news")
        assert await command(a, op="unsubscribe", channel="news", id=2) == {"type": "ack",
                                                                            "id": 2}
        redis_cli(redis_server, "PUBLISH", "hub:news", "1")
        assert await recv_json(b) == message("news", 1)
        await no_message(a)
        assert redis_server.numsub("hub:news") == 1
    # The last local subscriber left: the hub lets go of the Redis channel.
    await wait_until_async(lambda: redis_server.numsub("hub:news") == 0, 5,
                           what="the hub to let go of its Redis subscription")


async def test_client_publish_across_processes(redis_server, hub_factory):
    h1 = hub_factory("--client-publish", "chat:*", "--client-publish", "lobby",
                     redis=redis_server)
    h2 = hub_factory("--client-publish", "chat:*", redis=redis_server)
    async with open_ws(h1.ws_url + "?user=alice") as a, open_ws(h2.ws_url + "?user=bob") as b:
        await subscribe(a, "chat:room1")
        await subscribe(b, "chat:room1")
        await a.send(json.dumps({"op": "publish", "channel": "chat:room1",
                                 "data": {"text": "hi"}, "id": 3}))
        frames = [await recv_json(a), await recv_json(a)]
        # The publisher, subscribed itself, receives its own message (and its ack), with
        # who sent it (docs/protocol.md section 4).
        sent = {**message("chat:room1", {"text": "hi"}), "from": {"user": "alice",
                                                                  "client": ANY}}
        assert {"type": "ack", "id": 3} in frames
        assert sent in frames
        assert await recv_json(b) == sent
        # Exact names and prefixes; anything else is forbidden.
        assert (await command(a, op="publish", channel="lobby", data=1, id=4))["type"] == "ack"
        reply = await command(b, op="publish", channel="lobby", data=1, id=5)
        assert reply["code"] == "forbidden" and reply["id"] == 5
        reply = await command(a, op="publish", channel="news", data=1, id=6)
        assert reply["code"] == "forbidden"


async def test_client_publish_is_forbidden_by_default(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    async with open_ws(hub.ws_url) as a:
        reply = await command(a, op="publish", channel="chat:x", data=1, id=1)
        assert reply == {"type": "error", "id": 1, "code": "forbidden",
                         "message": reply["message"]}


@pytest.mark.parametrize("frame,code,cid", [
    ("not json", "bad_request", None),
    ("[1,2]", "bad_request", None),
    ('"subscribe"', "bad_request", None),
    ('{"id": 9}', "bad_request", 9),
    ('{"op": 5, "id": 9}', "bad_request", 9),
    ('{"op": "dance", "id": 9}', "bad_request", 9),
    ('{"op": "subscribe", "id": 9}', "bad_request", 9),
    ('{"op": "subscribe", "channel": 12, "id": 9}', "bad_request", 9),
    ('{"op": "subscribe", "channel": "", "id": 9}', "bad_channel", 9),
    ('{"op": "subscribe", "channel": "has space", "id": 9}', "bad_channel", 9),
    ('{"op": "subscribe", "channel": "' + "x" * 129 + '", "id": 9}', "bad_channel", 9),
    ('{"op": "subscribe", "channel": "User:alice", "id": 9}', "bad_channel", 9),
    ('{"op": "publish", "channel": "chat:x", "id": 9}', "bad_request", 9),
    ('{"op": "subscribe", "channel": "user:bob", "id": 9}', "forbidden", 9),
    ('{"op": "subscribe", "channel": "private:x", "id": 9}', "forbidden", 9),
    ('{"op": "subscribe", "channel": "news", "id": [1]}', "bad_request", None),
    (b'{"op": "ping"}', "bad_request", None),
])
async def test_error_codes_never_close_the_connection(redis_server, hub_factory, frame, code,
                                                      cid):
    hub = hub_factory(redis=redis_server)
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        await ws.send(frame)
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == code and reply["id"] == cid, reply
        assert isinstance(reply["message"], str) and reply["message"]
        assert await command(ws, op="ping", id="still-open") == {"type": "pong",
                                                                "id": "still-open"}


async def test_jwt_handshake(redis_server, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, redis=redis_server)
    bad = [
        {"additional_headers": {"Authorization": "Bearer " + make_token("x" * 40)}},
        {"additional_headers": {"Authorization": "Bearer " + make_token(
            SECRET, exp=int(time.time()) - 10)}},
        {"query": "?token=not-a-jwt"},
    ]
    for case in bad:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(hub.ws_url + case.get("query", ""),
                               additional_headers=case.get("additional_headers")):
                pass
        assert info.value.response.status_code == 401, case
    # No token (and ?user=, which means nothing here) is pending in-band authentication:
    # a first frame other than connect closes it with 4006 (tests/system/test_inband_auth.py).
    for query in ("", "?user=alice"):
        async with open_ws(hub.ws_url + query) as ws:
            await ws.send(json.dumps({"op": "subscribe", "channel": "user:alice", "id": 1}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4006, query

    good = make_token(SECRET, "alice", channels=["private:alice-*"])
    async with open_ws(hub.ws_url + "?token=" + good) as by_query, \
            open_ws(hub.ws_url, additional_headers={"Authorization": f"Bearer {good}"}) as by_hdr:
        await subscribe(by_query, "private:alice-notes")
        reply = await command(by_hdr, op="subscribe", channel="private:bob", id=2)
        assert reply["code"] == "forbidden"
        with Publisher(redis_server.url) as pub:
            pub.publish_to_user("alice", "x")
        assert await recv_json(by_query) == message("user:alice", "x")
        assert await recv_json(by_hdr) == message("user:alice", "x")

    # The header wins over the query parameter.
    async with open_ws(hub.ws_url + "?token=" + make_token(SECRET, "mallory"),
                       additional_headers={"Authorization": "Bearer "
                                           + make_token(SECRET, "bob")}) as ws:
        await subscribe(ws, "user:bob")
        assert (await command(ws, op="subscribe", channel="user:mallory", id=3))["code"] == \
            "forbidden"
    assert good not in hub.log_text()


async def test_http_paths(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    assert hub.http_get("/healthz") == (200, b"OK\n")
    assert hub.http_get("/readyz")[0] == 200
    assert hub.http_get("/")[0] == 404
    assert hub.http_get("/nope")[0] == 404
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")
        status, body = hub.http_get("/metrics")
        assert status == 200
        text = body.decode()
        assert "hub_connections 1.0" in text
        assert "hub_channels 1.0" in text
        assert "hub_broker_connected 1.0" in text


async def test_readyz_follows_the_broker_and_hub_connects_at_start(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    # Connected at start, before any client: the probe channel is subscribed already.
    assert hub.http_get("/readyz")[0] == 200
    redis_server.kill()
    await wait_until_async(lambda: hub.http_get("/readyz")[0] == 503, 10, what="/readyz 503")
    assert hub.http_get("/healthz")[0] == 200


async def test_sigterm_closes_clients_with_1001_and_exits_0(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    clients = [await open_ws(hub.ws_url) for _ in range(5)]
    for ws in clients:
        await subscribe(ws, "news")
    hub.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1001
    assert hub.wait(15) == 0


async def test_embedded_broker_without_redis(hub_factory):
    hub = hub_factory("--client-publish", "room")
    assert hub.http_get("/readyz")[0] == 200
    async with open_ws(hub.ws_url + "?user=a") as a, open_ws(hub.ws_url + "?user=b") as b:
        await subscribe(a, "room")
        await subscribe(b, "room")
        sent = {**message("room", {"n": 1}), "from": {"user": "a", "client": ANY}}
        assert await command(a, op="publish", channel="room", data={"n": 1}, id=2) in (
            {"type": "ack", "id": 2}, sent)
        assert sent in [await recv_json(b)]
    assert "authentication is OFF" in hub.log_text()


async def test_hub_publish_command(redis_server, hub_factory):
    hub = hub_factory(redis=redis_server)
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")
        out = subprocess.run([sys.executable, "-m", "hub", "publish", "news", '{"a": 1}',
                              "--redis-url", redis_server.url], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
        assert await recv_json(ws) == message("news", {"a": 1})
    bad = subprocess.run([sys.executable, "-m", "hub", "publish", "news", "{not json",
                          "--redis-url", redis_server.url], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_config_errors_exit_2():
    out = subprocess.run([sys.executable, "-m", "hub", "serve", "--workers", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--workers above 1 needs --redis-url" in out.stderr
    out = subprocess.run([sys.executable, "-m", "hub", "serve", "--max-buffer-bytes", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--max-buffer-bytes" in out.stderr


async def test_many_clients_receive_every_message_once_in_order(redis_server, hub_factory):
    hubs = [hub_factory(redis=redis_server), hub_factory(redis=redis_server)]
    clients = []
    for i in range(100):
        ws = await open_ws(hubs[i % 2].ws_url)
        await subscribe(ws, "stream")
        clients.append(ws)
    count = 400
    async with AsyncPublisher(redis_server.url) as pub:
        for n in range(count):
            assert await pub.publish("stream", {"n": n}) == 2

    async def drain(ws):
        got = []
        while len(got) < count:
            got.append((await recv_json(ws, timeout=20))["data"]["n"])
        await no_message(ws, 0.2)
        return got

    results = await asyncio.gather(*(drain(ws) for ws in clients))
    for got in results:
        assert got == list(range(count))
    for ws in clients:
        await ws.close()


async def test_fan_out_mixes_compressed_and_plain_connections(redis_server, hub_factory):
    """One wire frame is shared by the plain connections; a connection that negotiated
    permessage-deflate gets its own compressed frame (hub.connection.fan_out); the others go on
    after one closes. Every frame is parsed by the websockets client."""
    hub = hub_factory("--compression", "deflate", "--max-payload-bytes", "100000",
                      redis=redis_server)  # the 70000-byte message is over the default 65536
    async with open_ws(hub.ws_url) as plain1, open_ws(hub.ws_url) as plain2, \
            open_ws(hub.ws_url, compression="deflate") as packed:
        assert packed.protocol.extensions and not plain1.protocol.extensions
        for ws in (plain1, plain2, packed):
            await subscribe(ws, "mix")
        big = {"text": "x" * 70000}  # 64-bit length field (RFC 6455 section 5.2)
        with Publisher(redis_server.url) as pub:
            for data in ({"n": 1}, "y" * 200, big):  # 7-, 16- and 64-bit payload lengths
                assert pub.publish("mix", data) == 1
                for ws in (plain1, plain2, packed):
                    assert await recv_json(ws) == message("mix", data)
            await plain2.close()
            assert pub.publish("mix", {"n": 2}) == 1
            for ws in (plain1, packed):
                assert await recv_json(ws) == message("mix", {"n": 2})
