"""hub.client against real ``hub serve`` processes and a real redis-server (docs/clients.md).

Every wait is bounded (asyncio.timeout); backoff figures are small so that reconnects are
quick, never asserted as durations.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from hub import Publisher
from hub.brokers.base import StreamPosition
from hub.channels import NamespaceOptions
from hub.client import (
    AuthenticationFailed,
    BadChannel,
    ClientClosed,
    ConnectionStopped,
    Forbidden,
    Gap,
    Message,
    NoHistory,
    Sender,
    Subscription,
    Unsubscribed,
    connect,
)
from tests.helpers import make_token

SECRET = "client-test-secret-of-at-least-32-bytes!"
CONFIG = """\
client_publish = ["chat:*", "tiny:*", "news"]

[namespaces.chat]
history_size = 1000
history_ttl = 600

[namespaces.tiny]
history_size = 3
history_ttl = 600
"""
NAMESPACES = {"chat": NamespaceOptions(history_size=1000, history_ttl=600),
              "tiny": NamespaceOptions(history_size=3, history_ttl=600)}
FAST = {"min_delay": 0.05, "max_delay": 0.5, "request_timeout": 10.0}


def config_file(tmp_path) -> str:
    path = tmp_path / "hub.toml"
    path.write_text(CONFIG)
    return str(path)


async def take(sub: Subscription, count: int, timeout: float = 15.0) -> list[Message]:
    """The next ``count`` messages of ``sub``."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        async for item in sub:
            assert isinstance(item, Message), item
            got.append(item)
            if len(got) == count:
                break
    return got


async def wait_connected(client, timeout: float = 15.0, *, other_than: str | None = None):
    async with asyncio.timeout(timeout):
        while not client.connected or (other_than and client.client_id == other_than):
            await asyncio.sleep(0.02)


async def test_subscribe_publish_iterate(tmp_path, redis_server, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with connect(hub.ws_url, **FAST) as client:
        news = await client.subscribe("news")
        assert await client.publish("news", {"text": "hi"}) is None
        [message] = await take(news, 1)
        assert (message.channel, message.data, message.offset) == ("news", {"text": "hi"}, None)
        chat = await client.subscribe("chat:room1")
        position = await client.publish("chat:room1", [1, "two"])
        assert isinstance(position, StreamPosition) and position.offset == 1
        [message] = await take(chat, 1)
        assert (message.data, message.offset) == ([1, "two"], 1)
        history = await client.history("chat:room1", limit=10)
        assert (history.offset, history.epoch) == (1, position.epoch)
        assert [(m.offset, m.data) for m in history.messages] == [(1, [1, "two"])]
        # last: the backlog first, then live, none twice
        await client.publish("chat:room1", "three")
        await client.unsubscribe("chat:room1")
        assert not chat.active
        chat = await client.subscribe("chat:room1", last=2)
        await client.publish("chat:room1", "four")
        assert [m.offset for m in await take(chat, 3)] == [1, 2, 3]
        await client.ping()


async def test_typed_errors(tmp_path, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path))
    async with connect(hub.ws_url + "?user=eve", **FAST) as client:
        with pytest.raises(Forbidden) as info:
            await client.subscribe("private:team-a")
        assert info.value.code == "forbidden" and info.value.message
        assert "private:team-a" not in client.subscriptions
        with pytest.raises(NoHistory):
            await client.history("news")
        with pytest.raises(NoHistory):
            await client.subscribe("news", last=5)
        with pytest.raises(Forbidden):
            await client.publish("elsewhere", 1)
        with pytest.raises(BadChannel):
            await client.subscribe("no spaces")
        with pytest.raises(TypeError):
            await client.publish("news", object())
        with pytest.raises(ValueError):
            await client.publish("news", float("nan"))
        await client.subscribe("news")
        with pytest.raises(ValueError):
            await client.subscribe("news")


async def test_hub_killed_and_restarted_every_message_once_in_order(tmp_path, redis_server,
                                                                    hub_factory):
    config = config_file(tmp_path)
    hub = hub_factory("--config", config, redis=redis_server)
    pub = Publisher(redis_server.url, namespaces=NAMESPACES)
    try:
        async with connect(hub.ws_url, **FAST) as client:
            sub = await client.subscribe("chat:k")
            for i in range(5):
                pub.publish("chat:k", {"n": i})
            first = await take(sub, 5)
            before = client.client_id
            hub.kill()  # SIGKILL: no close frame
            for i in range(5, 15):  # while no hub runs
                pub.publish("chat:k", {"n": i})
            hub_factory("--config", config, redis=redis_server, port=hub.port)
            await wait_connected(client)
            for i in range(15, 20):
                pub.publish("chat:k", {"n": i})
            rest = await take(sub, 15)
        messages = first + rest
        assert [m.offset for m in messages] == list(range(1, 21))
        assert [m.data["n"] for m in messages] == list(range(20))
        assert before is None  # no in-band auth here: no connection id
    finally:
        pub.close()


async def test_failover_to_a_second_hub(tmp_path, redis_server, hub_factory):
    config = config_file(tmp_path)
    first = hub_factory("--config", config, redis=redis_server)
    second = hub_factory("--config", config, redis=redis_server)
    pub = Publisher(redis_server.url, namespaces=NAMESPACES)
    try:
        async with connect([first.ws_url, second.ws_url], **FAST) as client:
            sub = await client.subscribe("chat:f")
            pub.publish("chat:f", 0)
            assert [m.data for m in await take(sub, 1)] == [0]
            first.kill()
            pub.publish("chat:f", 1)  # while the client moves to the second hub
            await wait_connected(client)
            pub.publish("chat:f", 2)
            assert [m.data for m in await take(sub, 2)] == [1, 2]
            assert await client.publish("news", "via the second") is None
    finally:
        pub.close()


async def test_history_lost_while_away_raises_gap(tmp_path, redis_server, hub_factory):
    config = config_file(tmp_path)
    hub = hub_factory("--config", config, redis=redis_server)
    pub = Publisher(redis_server.url, namespaces=NAMESPACES)
    try:
        async with connect(hub.ws_url, **FAST) as client:
            sub = await client.subscribe("tiny:g")
            pub.publish("tiny:g", 1)
            assert [m.offset for m in await take(sub, 1)] == [1]
            hub.kill()
            for i in range(2, 9):  # the history keeps 3: offsets 2..5 are lost
                pub.publish("tiny:g", i)
            hub_factory("--config", config, redis=redis_server, port=hub.port)
            with pytest.raises(Gap) as info:
                async with asyncio.timeout(15):
                    await sub.__anext__()
            gap = info.value
            assert (gap.channel, gap.reason, gap.from_) == ("tiny:g", "not_recovered", 2)
            # iterating again goes on with what the history still holds, then live
            pub.publish("tiny:g", 9)
            assert [m.offset for m in await take(sub, 4)] == [6, 7, 8, 9]
    finally:
        pub.close()


async def test_expired_token_4001_reconnects_with_get_token(tmp_path, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--client-publish", "news")
    calls = []

    async def get_token() -> str:
        calls.append(time.time())
        if len(calls) == 1:  # the refresh: refused, so the hub closes with 4001 at exp
            return make_token(SECRET, "ann", ttl=-10)
        return make_token(SECRET, "ann", ttl=300)

    token = make_token(SECRET, "ann", ttl=2)
    async with connect(hub.ws_url, token=token, get_token=get_token, **FAST) as client:
        assert client.user == "ann" and client.client_id
        first = client.client_id
        sub = await client.subscribe("news")
        await wait_connected(client, other_than=first)
        assert len(calls) == 2
        await client.publish("news", "after 4001")
        assert [m.data for m in await take(sub, 1)] == ["after 4001"]


async def test_token_refreshed_before_exp(tmp_path, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--client-publish", "news")
    calls = []

    async def get_token() -> str:
        calls.append(time.time())
        return make_token(SECRET, "bob", ttl=300)

    async with connect(hub.ws_url, token=make_token(SECRET, "bob", ttl=3),
                       get_token=get_token, **FAST) as client:
        first = client.client_id
        sub = await client.subscribe("news")
        async with asyncio.timeout(10):
            while not calls:
                await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # past the first token's exp
        assert client.client_id == first and client.connected  # no reconnect
        await client.publish("news", 1)
        assert [m.data for m in await take(sub, 1)] == [1]
        assert len(calls) == 1 and client.exp is not None and client.exp > time.time() + 200


async def test_handshake_401_stops_with_the_status(tmp_path, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET)
    client = connect(hub.ws_url, additional_headers={"Authorization": "Bearer forged"}, **FAST)
    with pytest.raises(AuthenticationFailed) as info:
        async with asyncio.timeout(10):
            await client.start()
    assert (info.value.status, info.value.close_code) == (401, None)
    with pytest.raises(AuthenticationFailed):
        await client.publish("news", 1)
    with pytest.raises(AuthenticationFailed):
        await client.wait_closed()
    await client.close()


async def test_invalid_in_band_token_stops_with_4002(tmp_path, hub_factory):
    hub = hub_factory("--jwt-secret", SECRET)
    with pytest.raises(AuthenticationFailed) as info:
        async with asyncio.timeout(10), connect(hub.ws_url, token="not.a.jwt", **FAST):
            pass
    assert info.value.close_code == 4002


async def test_close_ends_every_task(tmp_path, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path))
    before = asyncio.all_tasks()
    client = await connect(hub.ws_url, **FAST)
    sub = await client.subscribe("chat:c")

    got: list[object] = []

    async def consume():
        async for message in sub:
            got.append(message)
        return "ended"

    consumer = asyncio.create_task(consume())
    await client.publish("chat:c", 1)
    async with asyncio.timeout(10):
        while not got:
            await asyncio.sleep(0.01)
    await client.close()
    async with asyncio.timeout(5):
        assert await consumer == "ended"  # the iterator stopped, no error
    assert not sub.active
    await client.close()  # idempotent
    await client.wait_closed()
    assert asyncio.all_tasks() - before == {asyncio.current_task()} - before
    with pytest.raises(ClientClosed):
        await client.publish("chat:c", 2)


async def test_server_frames_of_this_session_with_a_scripted_hub():
    """subscribed, from, unsubscribed (server) and close 4003, whose server side lands in
    parallel work: a scripted WebSocket server on loopback speaks them."""
    from websockets.asyncio.server import serve

    conns: list = []
    commands: list[dict] = []

    async def handler(ws):
        conns.append(ws)
        async for text in ws:
            cmd = json.loads(text)
            commands.append(cmd)
            if cmd["op"] in ("subscribe", "unsubscribe"):
                await ws.send(json.dumps({"type": "ack", "id": cmd["id"]}))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            pushed = client.server_subscriptions()
            await conns[0].send(json.dumps({"type": "subscribed", "channel": "news"}))
            async with asyncio.timeout(10):
                sub = await anext(pushed)
            assert sub.channel == "news" and sub.server and "news" in client.subscriptions
            sender = {"user": None, "client": "c-1"}
            await conns[0].send(json.dumps({"type": "message", "channel": "news", "data": 1,
                                            "from": sender}))
            [message] = await take(sub, 1)
            assert message.from_ == Sender(None, "c-1")
            # a reconnect resubscribes it as the client's own
            await conns[0].close(1012)
            async with asyncio.timeout(10):
                while len(conns) < 2 or not client.connected:
                    await asyncio.sleep(0.02)
            assert [c["channel"] for c in commands if c["op"] == "subscribe"] == ["news"]
            await conns[1].send(json.dumps({"type": "unsubscribed", "channel": "news",
                                            "reason": "server"}))
            with pytest.raises(Unsubscribed) as info:
                async with asyncio.timeout(10):
                    await sub.__anext__()
            assert info.value.reason == "server" and "news" not in client.subscriptions
            await conns[1].close(4003, "disconnected by the server")
            with pytest.raises(ConnectionStopped) as stopped:
                async with asyncio.timeout(10):
                    await client.wait_closed()
            assert stopped.value.close_code == 4003
            assert len(conns) == 2  # it did not reconnect


async def test_real_hub_server_side_subscribe_from_and_disconnect(tmp_path, redis_server,
                                                                   hub_factory):
    """The frames of the control channel and of client publishes, from a real hub: a
    server-side subscription shows up on server_subscriptions() with its messages, a
    delivery of a client publish carries its sender, /api/disconnect stops the client with
    4003."""
    from tests.helpers import free_port
    from tests.system.test_api import KEY, post

    api_port = free_port()
    hub = hub_factory("--config", config_file(tmp_path), "--api-port", str(api_port),
                      "--api-key", KEY, redis=redis_server)
    hub.api = f"http://127.0.0.1:{api_port}"
    async with connect(hub.ws_url + "?user=alice", **FAST) as alice, \
            connect(hub.ws_url + "?user=bob", **FAST) as bob:
        servers = alice.server_subscriptions()
        assert (await post(hub, "/api/subscribe", {"user": "alice", "channel": "chat:srv"}))[0] \
            == 200
        async with asyncio.timeout(10):
            sub = await anext(servers)
        assert sub.channel == "chat:srv"
        await bob.publish("chat:srv", {"text": "hi"})
        [message] = await take(sub, 1)
        assert message.data == {"text": "hi"} and message.offset == 1
        assert message.from_ is not None and message.from_.user == "bob"
        assert (await post(hub, "/api/disconnect", {"user": "alice"}))[0] == 200
        with pytest.raises(ConnectionStopped) as stopped:
            async with asyncio.timeout(10):
                await alice.wait_closed()
        assert stopped.value.close_code == 4003
        assert bob.connected
