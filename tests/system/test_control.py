"""The control channel end to end (docs/control-format.md, docs/api.md): server-side
subscribe, unsubscribe and disconnect of a user on every process, ``/api/channels`` and
``/api/info`` from heartbeats, and the same commands from ``hub.Publisher``: real ``hub
serve`` processes on a real redis-server, real WebSocket clients."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from hub import AsyncPublisher, Publisher
from hub.control import NODE_TTL
from tests.helpers import (
    assert_alive,
    command,
    expect_message,
    no_message,
    open_ws,
    poll,
    recv_json,
    subscribe,
    wait_close,
)
from tests.system.test_api import api_hub, error, post

pytestmark = pytest.mark.asyncio


async def info_of(hub) -> dict:
    status, info = await post(hub, "/api/info", {})
    assert status == 200, info
    return info


async def wait_nodes(hub, count: int, timeout: float = 10.0) -> dict:
    async def enough():
        info = await info_of(hub)
        return info if len(info["nodes"]) == count else None
    return await poll(enough, timeout)


async def test_server_side_commands_reach_every_process(tmp_path, redis_server, hub_factory):
    a = api_hub(hub_factory, tmp_path, redis=redis_server)
    b = hub_factory("--config", str(tmp_path / "hub.toml"), redis=redis_server)
    async with open_ws(a.ws_url + "?user=alice") as alice_a, \
            open_ws(b.ws_url + "?user=alice") as alice_b, \
            open_ws(b.ws_url + "?user=bob") as bob:
        await wait_nodes(a, 2)
        # subscribe: every connection of alice, on both processes, is told, then gets live
        status, reply = await post(a, "/api/subscribe", {"user": "alice", "channel": "news"})
        assert status == 200 and reply == {"processes": 2}
        for ws in (alice_a, alice_b):
            assert await recv_json(ws) == {"type": "subscribed", "channel": "news"}
        assert (await post(a, "/api/publish", {"channel": "news", "data": 1}))[0] == 200
        for ws in (alice_a, alice_b):
            await expect_message(ws, "news", 1)
        await no_message(bob)
        # already subscribed: no second frame
        assert (await post(a, "/api/subscribe", {"user": "alice", "channel": "news"}))[0] == 200
        await no_message(alice_b)
        # a history channel: the frame carries the position live messages follow from
        await post(a, "/api/publish", {"channel": "chat:r", "data": "old"})
        await post(a, "/api/subscribe", {"user": "alice", "channel": "chat:r"})
        for ws in (alice_a, alice_b):
            frame = await recv_json(ws)
            assert frame["type"] == "subscribed" and frame["channel"] == "chat:r"
            assert frame["offset"] == 1 and isinstance(frame["epoch"], str)
        await post(a, "/api/publish", {"channel": "chat:r", "data": "new"})
        for ws in (alice_a, alice_b):
            assert await recv_json(ws) == {"type": "message", "channel": "chat:r",
                                           "data": "new", "offset": 2}
        # channels: subscribers summed over the processes, by pattern
        status, reply = await post(a, "/api/channels", {})
        assert status == 200 and reply["missing"] == [] and reply["truncated"] is False
        counts = {c["channel"]: c["subscribers"] for c in reply["channels"]}
        assert counts == {"news": 2, "chat:r": 2, "user:alice": 2, "user:bob": 1}
        status, reply = await post(a, "/api/channels", {"pattern": "user:*"})
        assert [c["channel"] for c in reply["channels"]] == ["user:alice", "user:bob"]
        # unsubscribe: told with reason server, then nothing more
        status, reply = await post(a, "/api/unsubscribe", {"user": "alice", "channel": "news"})
        assert status == 200 and reply == {"processes": 2}
        for ws in (alice_a, alice_b):
            assert await recv_json(ws) == {"type": "unsubscribed", "channel": "news",
                                           "reason": "server"}
        await post(a, "/api/publish", {"channel": "news", "data": 2})
        await no_message(alice_b)
        # the personal channel lasts the connection's life
        await post(a, "/api/unsubscribe", {"user": "alice", "channel": "user:alice"})
        await post(a, "/api/publish", {"channel": "user:alice", "data": 3})
        for ws in (alice_a, alice_b):
            await expect_message(ws, "user:alice", 3)
        # disconnect: every connection of alice with 4003; bob stays
        status, reply = await post(a, "/api/disconnect", {"user": "alice"})
        assert status == 200 and reply == {"processes": 2}
        for ws in (alice_a, alice_b):
            code, _ = await wait_close(ws, 5)
            assert code == 4003
        await assert_alive(bob)
        # a code and reason of the caller's
        async with open_ws(b.ws_url + "?user=alice") as again:
            await assert_alive(again)
            await post(a, "/api/disconnect", {"user": "alice", "code": 4100,
                                              "reason": "password changed"})
            code, _ = await wait_close(again, 5)
            assert code == 4100 and again.close_reason == "password changed"
        await assert_alive(bob)


@pytest.mark.parametrize("path,body", [
    ("/api/subscribe", {"user": "alice"}),
    ("/api/subscribe", {"user": "", "channel": "news"}),
    ("/api/subscribe", {"user": "alice", "channel": "$control"}),
    ("/api/unsubscribe", {"user": 5, "channel": "news"}),
    ("/api/disconnect", {}),
    ("/api/disconnect", {"user": "alice", "code": 1000}),
    ("/api/disconnect", {"user": "alice", "code": 5000}),
    ("/api/disconnect", {"user": "alice", "code": "4003"}),
    ("/api/disconnect", {"user": "alice", "code": None}),
    ("/api/disconnect", {"user": "alice", "reason": "x" * 124}),
    ("/api/disconnect", {"user": "alice", "extra": 1}),
    ("/api/channels", {"pattern": ""}),
    ("/api/channels", {"pattern": 7}),
])
async def test_bad_control_requests_are_400(tmp_path, hub_factory, path, body):
    hub = api_hub(hub_factory, tmp_path)  # the embedded broker
    async with open_ws(hub.ws_url + "?user=alice") as alice:
        status, reply = await post(hub, path, body)
        assert status == 400, (status, reply)
        assert reply in (error("bad_request"), error("bad_channel")), reply
        await assert_alive(alice)


async def test_embedded_broker_control(tmp_path, hub_factory):
    """One process, no Redis: the same commands, through the embedded broker."""
    hub = api_hub(hub_factory, tmp_path)
    async with open_ws(hub.ws_url + "?user=alice") as alice:
        assert (await post(hub, "/api/subscribe", {"user": "alice", "channel": "n"})) == (
            200, {"processes": 1})
        assert await recv_json(alice) == {"type": "subscribed", "channel": "n"}
        reply = (await post(hub, "/api/channels", {"pattern": "n"}))[1]
        assert reply["channels"] == [{"channel": "n", "subscribers": 1}]
        info = await info_of(hub)
        assert len(info["nodes"]) == 1 and info["connections"] == 1
        assert info["nodes"][0]["node"] == info["node"] and info["nodes"][0]["pid"] == hub.pid
        await post(hub, "/api/disconnect", {"user": "alice"})
        assert (await wait_close(alice, 5))[0] == 4003


async def test_info_lists_live_processes_from_heartbeats(tmp_path, redis_server, hub_factory):
    a = api_hub(hub_factory, tmp_path, redis=redis_server)
    b = hub_factory(redis=redis_server)
    c = hub_factory(redis=redis_server)
    async with open_ws(b.ws_url + "?user=x") as ws:
        await subscribe(ws, "news")
        info = await wait_nodes(a, 3)
        pids = {n["pid"]: n for n in info["nodes"]}
        assert set(pids) == {a.pid, b.pid, c.pid}
        assert info["nodes"][0]["pid"] == a.pid  # the answering process first

        async def counted():
            nodes = {n["pid"]: n for n in (await info_of(a))["nodes"]}
            return nodes[b.pid] if nodes[b.pid]["connections"] == 1 else None
        node_b = await poll(counted, 10)
        assert node_b["subscriptions"] == 2 and node_b["channels"] == 2  # news + user:x
        assert node_b["ready"] is True and node_b["age"] >= 0
    # an ordered shutdown says bye: gone at once
    c.terminate()
    c.wait(15)
    await wait_nodes(a, 2, timeout=3)
    # a SIGKILLed process is forgotten NODE_TTL seconds after its last heartbeat
    b.kill()
    info = await wait_nodes(a, 1, timeout=NODE_TTL + 5)
    assert info["nodes"][0]["pid"] == a.pid
    # /api/channels does not wait for the dead
    reply = (await post(a, "/api/channels", {}))[1]
    assert reply == {"channels": [], "missing": [], "truncated": False}


async def test_publisher_server_side_commands(tmp_path, redis_server, hub_factory):
    """hub.Publisher and hub.AsyncPublisher: disconnect, subscribe, unsubscribe, presence."""
    config = tmp_path / "p.toml"
    config.write_text(f'redis_url = ["{redis_server.url}"]\n'
                      "[namespaces.room]\npresence = true\n")
    a = hub_factory("--config", str(config))
    b = hub_factory("--config", str(config))
    async with open_ws(a.ws_url + "?user=alice") as alice, \
            open_ws(b.ws_url + "?user=bob") as bob:
        await subscribe(alice, "room:1")
        await subscribe(bob, "room:1")
        with Publisher.from_config(config) as pub:
            async def listed():
                clients = await asyncio.to_thread(pub.presence, "room:1")
                return clients if len(clients) == 2 else None
            clients = await poll(listed, 10)
            assert sorted(c.user for c in clients) == ["alice", "bob"]
            stats = pub.presence_stats("room:1")
            assert (stats.clients, stats.users) == (2, 2)
            assert await asyncio.to_thread(pub.subscribe, "bob", "news") == 2
            assert await recv_json(bob) == {"type": "subscribed", "channel": "news"}
            assert await asyncio.to_thread(pub.unsubscribe, "bob", "news") == 2
            assert (await recv_json(bob))["type"] == "unsubscribed"
            with pytest.raises(ValueError):
                pub.disconnect("alice", code=1000)
            with pytest.raises(ValueError):
                pub.subscribe("alice", "bad channel")
            with pytest.raises(ValueError):
                pub.presence("news")  # no presence there
        async with AsyncPublisher.from_config(config) as apub:
            assert len(await apub.presence("room:1")) == 2
            assert (await apub.presence_stats("room:1")).users == 2
            assert await apub.subscribe("alice", "n2") == 2
            assert await recv_json(alice) == {"type": "subscribed", "channel": "n2"}
            assert await apub.disconnect("alice", reason="bye") == 2
            code, _ = await wait_close(alice, 5)
            assert code == 4003 and alice.close_reason == "bye"
        with pytest.raises(ConnectionClosed):
            await command(alice, op="ping", id=1)
        await assert_alive(bob)
        await no_message(bob)


@pytest.mark.cluster
async def test_control_on_a_redis_cluster(tmp_path, cluster, hub_factory):
    """The control channel is a sharded channel in a Redis Cluster (SSUBSCRIBE/SPUBLISH in
    the slot of its name): the API's commands and heartbeats, and Publisher.disconnect with
    cluster=True, reach both processes."""
    from tests.helpers import free_port
    from tests.system.test_api import KEY

    api_port = free_port()
    args = ("--redis-cluster", "--redis-url", cluster.url, "--probe-interval", "0.5",
            "--probe-timeout", "1")
    a = hub_factory(*args, "--api-port", str(api_port), "--api-key", KEY)
    a.api = f"http://127.0.0.1:{api_port}"
    b = hub_factory(*args)
    async with open_ws(a.ws_url + "?user=alice") as alice_a, \
            open_ws(b.ws_url + "?user=alice") as alice_b:
        await wait_nodes(a, 2)
        assert await post(a, "/api/subscribe", {"user": "alice", "channel": "news"}) == (
            200, {"processes": 2})
        for ws in (alice_a, alice_b):
            assert await recv_json(ws) == {"type": "subscribed", "channel": "news"}
        counts = {c["channel"]: c["subscribers"]
                  for c in (await post(a, "/api/channels", {}))[1]["channels"]}
        assert counts == {"news": 2, "user:alice": 2}
        async with AsyncPublisher(cluster.url, cluster=True) as pub:
            assert await pub.disconnect("alice") == 2
        for ws in (alice_a, alice_b):
            assert (await wait_close(ws, 5))[0] == 4003
