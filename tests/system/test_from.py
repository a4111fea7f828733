"""Who published a message: the ``from`` of client publishes, end to end (docs/protocol.md
sections 3, 4 and 6). Two real ``hub serve`` processes on one real redis-server: a client
publish on one arrives on the other with the publisher's user and connection id, whatever its
data says; backend publishes (Redis PUBLISH, FCALL hub_publish, the HTTP API) carry none; on a
history channel the ``history`` op, a recovery and ``/api/history`` carry it too."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.helpers import command, free_port, make_token, open_ws, recv_json, send_recv

SECRET = "s" * 40
KEY = "k1-0123456789abcdef0123456789abcdef"
CONFIG = """\
[namespaces.chat]
history_size = 100
history_ttl = 600
"""
PUBLISH = ("--client-publish", "chat:*", "--client-publish", "room:*")


def two_hubs(tmp_path, hub_factory, redis, *args: str):
    """Two hubs on ``redis`` (``chat:`` keeps history); the first serves the HTTP API at
    ``hub.api``."""
    config = tmp_path / "hub.toml"
    config.write_text(CONFIG)
    port = free_port()
    first = hub_factory("--config", str(config), *PUBLISH, *args, "--api-port", str(port),
                        "--api-key", KEY, redis=redis)
    first.api = f"http://127.0.0.1:{port}"
    second = hub_factory("--config", str(config), *PUBLISH, *args, redis=redis)
    return first, second


async def connect(ws, user: str) -> str:
    """In-band authentication as ``user``; the connection id of the ack."""
    ack = await command(ws, op="connect", token=make_token(SECRET, user), id="c")
    assert ack["type"] == "ack" and ack["user"] == user, ack
    assert isinstance(ack["client"], str) and ack["client"]
    return ack["client"]


async def api(hub, path: str, raw: bytes) -> dict:
    async with aiohttp.ClientSession() as session, session.post(
            hub.api + path, data=raw, headers={"Authorization": f"Bearer {KEY}"},
            timeout=aiohttp.ClientTimeout(total=15)) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        return await resp.json()


async def raw_frame(ws, timeout: float = 5.0) -> str:
    """The next frame as its text (to see the exact bytes of ``data``)."""
    frame = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(frame, str)
    return frame


async def test_client_publish_carries_its_sender_across_processes(tmp_path, redis_server,
                                                                  hub_factory):
    first, second = two_hubs(tmp_path, hub_factory, redis_server, "--jwt-secret", SECRET)
    async with open_ws(first.ws_url) as alice, open_ws(second.ws_url) as bob:
        alice_id = await connect(alice, "alice")
        bob_id = await connect(bob, "bob")
        assert alice_id != bob_id
        assert (await command(bob, op="subscribe", channel="room:1", id=1))["type"] == "ack"
        alice_from = {"user": "alice", "client": alice_id}

        # the data is the client's own text; the sender is the hub's word
        data = '{"text": "hi", "n": 1000000000000000000000000000001, "x": 1.0, "z": -0}'
        await alice.send('{"op":"publish","channel":"room:1","id":2,"data": ' + data + " }")
        assert await recv_json(alice) == {"type": "ack", "id": 2}
        frame = await raw_frame(bob)
        assert '"data":' + data + "," in frame, frame
        assert json.loads(frame)["from"] == alice_from

        # spoofing: a "from" or a user in data, a "from" field beside it, change nothing
        spoofs = [{"op": "publish", "channel": "room:1", "id": 3,
                   "data": {"from": {"user": "bob", "client": bob_id}, "user": "bob"}},
                  {"op": "publish", "channel": "room:1", "id": 4, "data": "x",
                   "from": {"user": "bob", "client": bob_id}, "user": "bob"},
                  {"op": "publish", "channel": "room:1", "id": 5,
                   "data": '\u0000{"user":"bob","client":"' + bob_id + '"}\u00001'}]
        for spoof in spoofs:
            assert (await command(alice, **spoof))["type"] == "ack"
            got = await recv_json(bob)
            assert got == {"type": "message", "channel": "room:1", "data": spoof["data"],
                           "from": alice_from}, got

        # backend publishes carry no from: Redis PUBLISH (a NUL-led payload included), the API
        client = redis_server.client()
        try:
            client.publish("hub:room:1", b'{"text":"sys"}')
            assert await recv_json(bob) == {"type": "message", "channel": "room:1",
                                            "data": {"text": "sys"}}
            forged = b'\x00{"user":"bob","client":"x"}'  # no second mark: an ordinary payload
            client.publish("hub:room:1", forged)
            assert await recv_json(bob) == {"type": "message", "channel": "room:1",
                                            "data": forged.decode()}
        finally:
            client.close()
        body = b'{"channel":"room:1","data":1000000000000000000000000000001}'
        assert await api(first, "/api/publish", body) == {}
        frame = await raw_frame(bob)
        assert frame == ('{"type":"message","channel":"room:1",'
                         '"data":1000000000000000000000000000001}'), frame
        body = b'{"channels":["room:1","room:2"],"data":[1.0, -0,"\\u00e9"]}'
        assert (await api(first, "/api/broadcast", body))["results"][0] == {"channel": "room:1"}
        frame = await raw_frame(bob)
        assert frame == '{"type":"message","channel":"room:1","data":[1.0, -0,"\\u00e9"]}'


async def test_anonymous_publisher_has_a_null_user(tmp_path, redis_server, hub_factory):
    first, second = two_hubs(tmp_path, hub_factory, redis_server)
    async with open_ws(first.ws_url) as anon, open_ws(first.ws_url + "?user=carol") as carol, \
            open_ws(second.ws_url) as reader:
        assert (await command(reader, op="subscribe", channel="room:9", id=1))["type"] == "ack"
        senders = []
        for ws in (anon, anon, carol):
            assert (await command(ws, op="publish", channel="room:9", data=1, id=2))["type"] \
                == "ack"
            got = await recv_json(reader)
            assert got["data"] == 1 and set(got["from"]) == {"user", "client"}
            senders.append(got["from"])
        assert senders[0]["user"] is None and senders[0] == senders[1]  # the same connection
        assert senders[2]["user"] == "carol" and senders[2]["client"] != senders[0]["client"]


async def test_history_replies_and_recovery_carry_the_sender(tmp_path, redis_server,
                                                             hub_factory):
    first, second = two_hubs(tmp_path, hub_factory, redis_server, "--jwt-secret", SECRET)
    async with open_ws(first.ws_url) as alice, open_ws(second.ws_url) as bob:
        alice_id = await connect(alice, "alice")
        await connect(bob, "bob")
        ack = await command(bob, op="subscribe", channel="chat:1", id=1)
        epoch = ack["epoch"]
        sender = {"user": "alice", "client": alice_id}
        for i in (1, 2):
            reply = await command(alice, op="publish", channel="chat:1", id=i,
                                  data={"n": i, "from": "mallory"})
            assert reply == {"type": "ack", "id": i, "offset": i, "epoch": epoch}
            assert await recv_json(bob) == {"type": "message", "channel": "chat:1",
                                            "data": {"n": i, "from": "mallory"}, "offset": i,
                                            "from": sender}
        client = redis_server.client()
        try:  # a backend's publish into the history: no from
            assert client.fcall("hub_publish", 1, "hub:chat:1", b'{"n":3}', 100, 600)[0] == 3
        finally:
            client.close()
        assert await recv_json(bob) == {"type": "message", "channel": "chat:1",
                                        "data": {"n": 3}, "offset": 3}
        expected = [{"offset": 1, "data": {"n": 1, "from": "mallory"}, "from": sender},
                    {"offset": 2, "data": {"n": 2, "from": "mallory"}, "from": sender},
                    {"offset": 3, "data": {"n": 3}}]

        history = await send_recv(bob, {"op": "history", "channel": "chat:1", "id": 5})
        assert history == {"type": "history", "id": 5, "channel": "chat:1", "offset": 3,
                           "epoch": epoch, "messages": expected}

        async with open_ws(second.ws_url) as carol:
            await connect(carol, "carol")
            ack = await command(carol, op="subscribe", channel="chat:1", id=6,
                                since={"offset": 0, "epoch": epoch})
            assert (ack["offset"], ack["recovered"]) == (3, True)
            replay = [await recv_json(carol) for _ in expected]
            assert replay == [{"type": "message", "channel": "chat:1", **m} for m in expected]
            backlog_ack = await command(carol, op="subscribe", channel="chat:1", id=7, last=2)
            assert backlog_ack["offset"] == 3
            assert [await recv_json(carol) for _ in range(2)] == [
                {"type": "message", "channel": "chat:1", **m} for m in expected[1:]]

        reply = await api(first, "/api/history", b'{"channel":"chat:1"}')
        assert reply == {"offset": 3, "epoch": epoch, "messages": expected}
