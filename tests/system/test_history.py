"""History and recovery end to end: real ``hub serve`` processes, a real redis-server, real
WebSocket clients (docs/protocol.md, "History and recovery")."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from unittest.mock import ANY

import pytest

from tests.helpers import metric, open_ws, recv_json

CONFIG = """\
client_publish = ["chat:*", "tiny:*"]

[namespaces.chat]
history_size = 1000
history_ttl = 600

[namespaces.tiny]
history_size = 5
history_ttl = 600

[namespaces.user]
history_size = 100
history_ttl = 600
"""


#: The ``from`` of a client publish by the connection ``?user=b`` (its id is the hub's).
FROM_B = {"user": "b", "client": ANY}


def config_file(tmp_path) -> str:
    path = tmp_path / "hub.toml"
    path.write_text(CONFIG)
    return str(path)


def fcall(redis, channel: str, data: object, size: int = 1000, key: str | None = None):
    """``FCALL hub_publish`` through redis-cli, as a backend in any language would."""
    args = ["redis-cli", "-p", str(redis.port), "FCALL", "hub_publish", "1", f"hub:{channel}",
            json.dumps(data), str(size), "600", *([key] if key else [])]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=10).stdout
    offset, epoch = out.split()
    return int(offset), epoch


async def command(ws, **cmd):
    await ws.send(json.dumps(cmd))
    return await recv_json(ws)


async def messages(ws, count: int, timeout: float = 10.0) -> list[dict]:
    """The next ``count`` frames (any type), in order."""
    return [await recv_json(ws, timeout) for _ in range(count)]


@pytest.mark.parametrize("with_redis", [False, True], ids=["embedded", "redis"])
async def test_offsets_backlog_history_and_recovery(tmp_path, redis_factory, hub_factory,
                                                    with_redis):
    redis = redis_factory() if with_redis else None
    hub = hub_factory("--config", config_file(tmp_path), redis=redis)
    async with open_ws(hub.ws_url + "?user=a") as a, open_ws(hub.ws_url + "?user=b") as b:
        ack = await command(a, op="subscribe", channel="chat:1", id=1)
        assert ack["type"] == "ack" and ack["offset"] == 0 and ack["epoch"]
        assert "recovered" not in ack
        epoch = ack["epoch"]
        for i in range(3):
            reply = await command(b, op="publish", channel="chat:1", data={"n": i}, id=10 + i)
            assert reply == {"type": "ack", "id": 10 + i, "offset": i + 1, "epoch": epoch}
        got = await messages(a, 3)
        assert [(m["type"], m["offset"], m["data"]) for m in got] == [
            ("message", i + 1, {"n": i}) for i in range(3)]
        # backlog with the subscription: the ack, then the last 2, oldest first
        ack = await command(b, op="subscribe", channel="chat:1", id=2, last=2)
        assert (ack["offset"], ack["epoch"]) == (3, epoch)
        assert [m["offset"] for m in await messages(b, 2)] == [2, 3]
        history = await command(b, op="history", channel="chat:1", id=3, limit=2)
        assert history == {"type": "history", "id": 3, "channel": "chat:1", "offset": 3,
                           "epoch": epoch, "messages": [
                               {"offset": 2, "data": {"n": 1}, "from": FROM_B},
                               {"offset": 3, "data": {"n": 2}, "from": FROM_B}]}
        history = await command(b, op="history", channel="chat:1", id=4, limit=10,
                                since={"offset": 2, "epoch": epoch})
        assert [m["offset"] for m in history["messages"]] == [3]
    async with open_ws(hub.ws_url + "?user=c") as c:
        ack = await command(c, op="subscribe", channel="chat:1", id=1,
                            since={"offset": 1, "epoch": epoch})
        assert ack == {"type": "ack", "id": 1, "offset": 3, "epoch": epoch, "recovered": True}
        assert [m["offset"] for m in await messages(c, 2)] == [2, 3]
        # a wrong epoch: not recovered, nothing replayed; the ack says where to go on from
        ack = await command(c, op="subscribe", channel="chat:1", id=2,
                            since={"offset": 1, "epoch": "0" * 20})
        assert ack == {"type": "ack", "id": 2, "offset": 3, "epoch": epoch, "recovered": False}
        # since that fails, with last: the last backlog instead
        ack = await command(c, op="subscribe", channel="chat:1", id=3,
                            since={"offset": 1, "epoch": "0" * 20}, last=1)
        assert (ack["recovered"], ack["offset"]) == (False, 3)
        assert [m["offset"] for m in await messages(c, 1)] == [3]
        await c.send(json.dumps({"op": "ping", "id": 9}))
        assert (await recv_json(c))["type"] == "pong"  # nothing else was sent


async def test_no_history_errors(tmp_path, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), "--client-publish", "news")
    async with open_ws(hub.ws_url + "?user=a") as ws:
        for cmd in ({"op": "history", "channel": "news", "id": 1},
                    {"op": "subscribe", "channel": "news", "id": 2, "last": 3},
                    {"op": "subscribe", "channel": "news", "id": 3,
                     "since": {"offset": 1, "epoch": "e"}},
                    {"op": "publish", "channel": "news", "id": 4, "data": 1,
                     "idempotency_key": "k"}):
            reply = await command(ws, **cmd)
            assert reply["type"] == "error" and reply["code"] == "no_history", reply
            assert reply["id"] == cmd["id"]
        for bad in ({"op": "subscribe", "channel": "chat:1", "id": 5, "last": 0},
                    {"op": "subscribe", "channel": "chat:1", "id": 6, "last": 1001},
                    {"op": "subscribe", "channel": "chat:1", "id": 7, "since": {"offset": -1,
                                                                                "epoch": "e"}},
                    {"op": "subscribe", "channel": "chat:1", "id": 8, "since": "x"},
                    {"op": "history", "channel": "chat:1", "id": 9, "limit": "all"},
                    {"op": "publish", "channel": "chat:1", "id": 10, "data": 1,
                     "idempotency_key": 5}):
            reply = await command(ws, **bad)
            assert reply["code"] == "bad_request", (bad, reply)
        reply = await command(ws, op="history", channel="user:someone", id=11)
        assert reply["code"] == "forbidden"


async def test_backend_fcall_plain_publish_and_idempotency(tmp_path, redis_server,
                                                           hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with open_ws(hub.ws_url + "?user=a") as ws:
        ack = await command(ws, op="subscribe", channel="chat:room", id=1)
        assert fcall(redis_server, "chat:room", {"text": "hi"}) == (1, ack["epoch"])
        assert await recv_json(ws) == {"type": "message", "channel": "chat:room",
                                       "data": {"text": "hi"}, "offset": 1}
        # a plain PUBLISH to a history channel: delivered live, no offset, counted
        redis_server.client().publish("hub:chat:room", b'{"plain":true}')
        assert await recv_json(ws) == {"type": "message", "channel": "chat:room",
                                       "data": {"plain": True}}
        assert metric(hub, "hub_unrecorded_publishes_total") == 1
        # the same idempotency key twice: one delivery, the same position
        first = fcall(redis_server, "chat:room", {"once": 1}, key="order-7")
        again = fcall(redis_server, "chat:room", {"once": 2}, key="order-7")
        assert first == again == (2, ack["epoch"])
        got = await recv_json(ws)
        assert (got["offset"], got["data"]) == (2, {"once": 1})
        reply = await command(ws, op="publish", channel="chat:room", data={"c": 1}, id=5,
                              idempotency_key="order-7")
        assert (reply["type"], reply["offset"]) == ("ack", 2)  # a client retry, no delivery
        await ws.send(json.dumps({"op": "ping", "id": 6}))
        assert (await recv_json(ws))["type"] == "pong"


async def test_trimmed_history_is_not_recovered_and_says_what_is_held(tmp_path, redis_server,
                                                                      hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    epoch = ""
    for i in range(20):
        _, epoch = fcall(redis_server, "tiny:x", {"i": i}, size=5)
    async with open_ws(hub.ws_url + "?user=a") as ws:
        ack = await command(ws, op="subscribe", channel="tiny:x", id=1,
                            since={"offset": 2, "epoch": epoch})
        assert ack == {"type": "ack", "id": 1, "offset": 20, "epoch": epoch,
                       "recovered": False}
        # what the history still holds after offset 2: 16..20, so 3..15 are known lost
        assert [m["offset"] for m in await messages(ws, 5)] == [16, 17, 18, 19, 20]
    assert metric(hub, "hub_recoveries_total", {"result": "failed"}) == 1


async def test_new_epoch_after_the_history_is_lost(tmp_path, redis_server, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    _, old = fcall(redis_server, "chat:e", 1)
    redis_server.client().flushall()
    async with open_ws(hub.ws_url + "?user=a") as ws:
        ack = await command(ws, op="subscribe", channel="chat:e", id=1,
                            since={"offset": 1, "epoch": old})
        assert ack["recovered"] is False and ack["epoch"] != old and ack["offset"] == 0
        assert fcall(redis_server, "chat:e", 2) == (1, ack["epoch"])
        assert (await recv_json(ws))["offset"] == 1


async def test_personal_channel_history_is_an_inbox(tmp_path, redis_server, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    for i in range(3):  # pushed while alice is away
        fcall(redis_server, "user:alice", {"mail": i}, size=100)
    async with open_ws(hub.ws_url + "?user=alice") as ws:
        inbox = await command(ws, op="history", channel="user:alice", id=1, limit=10)
        assert [m["data"] for m in inbox["messages"]] == [{"mail": i} for i in range(3)]
        # the implicit subscription does not swallow a subscribe with since
        ack = await command(ws, op="subscribe", channel="user:alice", id=2,
                            since={"offset": 1, "epoch": inbox["epoch"]})
        assert ack["recovered"] is True and ack["offset"] == 3
        assert [m["offset"] for m in await messages(ws, 2)] == [2, 3]
        fcall(redis_server, "user:alice", {"mail": 3}, size=100)
        assert (await recv_json(ws))["offset"] == 4


async def test_the_hub_repairs_a_dropped_pubsub_link_from_history(tmp_path, redis_server,
                                                                  hub_factory):
    """CLIENT KILL TYPE pubsub while messages flow: connected clients of a history channel
    see every offset once, in order, and no gap frame; a channel without history gets its
    gap frame as before."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with open_ws(hub.ws_url + "?user=a") as ws:
        await command(ws, op="subscribe", channel="chat:flow", id=1)
        await command(ws, op="subscribe", channel="news", id=2)
        client = redis_server.client()
        total = 300
        for i in range(total):
            client.fcall("hub_publish", 1, "hub:chat:flow", json.dumps(i), 1000, 600)
            if i in (100, 200):
                client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        offsets, gaps = [], []
        deadline = time.monotonic() + 30
        while len(offsets) < total and time.monotonic() < deadline:
            frame = await recv_json(ws, 30)
            if frame["type"] == "message":
                offsets.append(frame["offset"])
            elif frame["type"] == "gap":
                gaps.append(frame["channels"])
        assert offsets == list(range(1, total + 1))
        assert all(channels == ["news"] for channels in gaps), gaps
        assert (metric(hub, "hub_history_repairs_total") or 0) >= 1
        print(f"\nrepairs {metric(hub, 'hub_history_repairs_total')}, refilled "
              f"{metric(hub, 'hub_history_refilled_total')}, gaps on news {len(gaps)}")


async def test_recovering_clients_lose_nothing_while_publishing_goes_on(
        tmp_path, redis_server, hub_factory):
    """Two hubs, a publisher at a steady rate, 40 clients that drop and resubscribe with
    since to a random hub: each ends with every offset from its first to the last, once,
    in order. Bounded: 400 messages, 30 s."""
    hubs = [hub_factory("--config", config_file(tmp_path), redis=redis_server)
            for _ in range(2)]
    total, clients = 400, 40
    rng = random.Random(7)
    done = asyncio.Event()

    async def publish():
        client = redis_server.client()
        for i in range(total):
            await asyncio.to_thread(client.fcall, "hub_publish", 1, "hub:chat:race",
                                    json.dumps(i), 1000, 600)
            await asyncio.sleep(0.005)
        done.set()

    async def run_client(n: int) -> list[int]:
        seen: list[int] = []
        position = None
        while True:
            hub = rng.choice(hubs)
            async with open_ws(hub.ws_url + f"?user=c{n}") as ws:
                cmd = {"op": "subscribe", "channel": "chat:race", "id": 1}
                if position is not None:
                    cmd["since"] = position
                ack = await command(ws, **cmd)
                assert ack["type"] == "ack", ack
                if position is not None:
                    assert ack["recovered"] is True, ack
                epoch = ack["epoch"]
                stop_after = rng.randint(5, 60)
                while True:
                    if seen and seen[-1] == total:
                        return seen
                    frame = await recv_json(ws, 20)
                    assert frame["type"] == "message", frame
                    seen.append(frame["offset"])
                    position = {"offset": frame["offset"], "epoch": epoch}
                    stop_after -= 1
                    if stop_after == 0 and not done.is_set():
                        break  # drop the connection, come back with since

    publisher = asyncio.create_task(publish())
    results = await asyncio.wait_for(asyncio.gather(*(run_client(n) for n in range(clients))),
                                     60)
    await publisher
    for seen in results:
        assert seen == list(range(seen[0], total + 1)), seen[:20]
    recoveries = sum(metric(h, "hub_recoveries_total", {"result": "succeeded"}) or 0
                     for h in hubs)
    print(f"\n{clients} clients, {total} messages, {recoveries:g} recoveries, all complete")
    assert recoveries > 0


async def test_redis_back_with_fewer_messages_starts_a_new_epoch(tmp_path, redis_server,
                                                                 hub_factory):
    """Redis comes back in the same epoch but without its last messages (what appendfsync
    everysec or a lagging replica can do): the hub does not reuse offsets silently; it
    retires the epoch, tells its clients with a gap frame, and the next message arrives in
    the new epoch."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    client = redis_server.client()
    async with open_ws(hub.ws_url + "?user=a") as ws:
        ack = await command(ws, op="subscribe", channel="chat:lost", id=1)
        old = ack["epoch"]
        for i in range(5):
            fcall(redis_server, "chat:lost", i)
        assert [m["offset"] for m in await messages(ws, 5)] == [1, 2, 3, 4, 5]
        # the state of an older snapshot: offset 3, messages 4 and 5 gone, same epoch
        client.hset("{hub:chat:lost}:m", "o", 3)
        client.xtrim("{hub:chat:lost}:s", minid="6-0")
        client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        gap = await recv_json(ws, 15)
        assert gap["type"] == "gap" and gap["channels"] == ["chat:lost"], gap
        assert gap["epoch"] != old and gap["from"] == 4
        offset, epoch = fcall(redis_server, "chat:lost", "after")
        assert (offset, epoch) == (1, gap["epoch"])
        got = await recv_json(ws)
        assert (got["offset"], got["data"]) == (1, "after")


CHAOS_CONFIG = """\
[namespaces.chat]
history_size = 5000
history_ttl = 600
"""


async def test_chaos_recovering_clients_lose_nothing(tmp_path, redis_factory, hub_factory):
    """Three hubs on one Redis with AOF (appendfsync always), a publisher numbering messages
    through FCALL hub_publish (retrying with an idempotency key, so each number is published
    once), 100 clients on a history channel that drop at random and resubscribe with since to
    a random hub, while: CLIENT KILL TYPE pubsub, one hub SIGKILLed and restarted, Redis
    frozen (SIGSTOP) past the liveness probe's bound, Redis SIGKILLed and restarted. At the
    end every client holds every offset from its first to the last exactly once, in order,
    and no client saw a gap frame. Bounded: 1200 messages, about 25 s of chaos."""
    redis = redis_factory(("--appendonly", "yes", "--appendfsync", "always"))
    path = tmp_path / "chaos.toml"
    path.write_text(CHAOS_CONFIG)
    args = ("--config", str(path), "--probe-interval", "0.5", "--probe-timeout", "1")
    hubs = [hub_factory(*args, redis=redis) for _ in range(3)]
    total, n_clients = 1200, 100
    rng = random.Random(11)
    alive = set(range(3))
    published = asyncio.Event()
    stats = {"recoveries": 0, "reconnects": 0, "unavailable": 0, "gaps": 0}

    def publish_all() -> None:
        import redis as redis_py
        i = 0
        while i < total:
            try:
                client = redis.client(timeout=2)
                while i < total:
                    client.fcall("hub_publish", 1, "hub:chat:chaos", json.dumps(i + 1), 5000,
                                 600, f"m{i + 1}")
                    i += 1
                    time.sleep(0.015)
            except (redis_py.RedisError, OSError):
                time.sleep(0.2)  # Redis down or frozen: retry the same number, same key

    async def run_client(n: int) -> list[int]:
        seen: list[int] = []
        position = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hub = hubs[rng.choice(sorted(alive))]
            try:
                async with open_ws(hub.ws_url + f"?user=c{n}", open_timeout=5) as ws:
                    cmd = {"op": "subscribe", "channel": "chat:chaos", "id": 1}
                    if position is not None:
                        cmd["since"] = position
                    await ws.send(json.dumps(cmd))
                    ack = await recv_json(ws)
                    while ack["type"] == "gap":  # of the personal channel (no history)
                        assert "chat:chaos" not in ack["channels"], ack
                        ack = await recv_json(ws)
                    if ack["type"] == "error":
                        assert ack["code"] == "unavailable", ack
                        stats["unavailable"] += 1
                        await asyncio.sleep(0.3)
                        continue
                    if position is not None:
                        assert ack["recovered"] is True, (n, position, ack)
                        stats["recoveries"] += 1
                    epoch = ack["epoch"]
                    budget = rng.randint(20, 400)
                    while True:
                        if seen and seen[-1] == total:
                            return seen
                        frame = await recv_json(ws, 30)
                        if frame["type"] == "gap":
                            if "chat:chaos" in frame["channels"]:
                                stats["gaps"] += 1
                            continue
                        assert frame["type"] == "message", frame
                        seen.append(frame["offset"])
                        position = {"offset": frame["offset"], "epoch": epoch}
                        budget -= 1
                        if budget == 0 and not published.is_set():
                            break
            except (OSError, TimeoutError, ConnectionError) as exc:
                if isinstance(exc, TimeoutError) and published.is_set():
                    raise
                stats["reconnects"] += 1
                await asyncio.sleep(0.2)
            except Exception as exc:  # the hub went away under the client
                if type(exc).__name__.startswith(("ConnectionClosed", "InvalidStatus",
                                                  "InvalidMessage")):
                    stats["reconnects"] += 1
                    await asyncio.sleep(0.2)
                    continue
                raise
        raise AssertionError(f"client {n} did not finish: {seen[-3:]}")

    async def chaos() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3)
        await loop.run_in_executor(None, lambda: redis.client().execute_command(
            "CLIENT", "KILL", "TYPE", "pubsub"))
        await asyncio.sleep(3)
        alive.discard(0)
        hubs[0].kill()
        await asyncio.sleep(2)
        hubs[0] = hub_factory(*args, redis=redis, port=hubs[0].port, wait_ready=False)
        await loop.run_in_executor(None, hubs[0].wait_ready)
        alive.add(0)
        await asyncio.sleep(2)
        redis.pause()
        await asyncio.sleep(3)  # past probe-interval + probe-timeout (1.5 s)
        redis.resume()
        await asyncio.sleep(4)
        await loop.run_in_executor(None, redis.kill)
        await loop.run_in_executor(None, redis.restart)

    started = time.monotonic()
    publisher = asyncio.get_running_loop().run_in_executor(None, publish_all)
    chaos_task = asyncio.create_task(chaos())
    clients = asyncio.gather(*(run_client(n) for n in range(n_clients)))
    await publisher
    published.set()
    await chaos_task
    results = await asyncio.wait_for(clients, 120)
    for n, seen in enumerate(results):
        assert seen == list(range(seen[0], total + 1)), (n, seen[:5], len(seen))
    repairs = sum(metric(h, "hub_history_repairs_total") or 0 for h in hubs)
    refilled = sum(metric(h, "hub_history_refilled_total") or 0 for h in hubs)
    print(f"\nchaos: {n_clients} clients, {total} messages in {time.monotonic() - started:.1f}"
          f" s; {stats['recoveries']} recoveries, {stats['reconnects']} reconnects, "
          f"{stats['unavailable']} unavailable, {stats['gaps']} gap frames; repairs "
          f"{repairs:g}, refilled {refilled:g} (surviving hubs' counters)")
    assert stats["gaps"] == 0


async def test_last_backlog_while_publishing_hard(tmp_path, redis_server, hub_factory):
    """50 clients subscribe with last=10 while a publisher publishes as fast as it can: each
    gets its ack, then contiguous offsets (the backlog ending at the ack's offset, then
    live), no gap and no duplicate between backlog and live."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    total = 600
    stop = asyncio.Event()

    def publish() -> None:
        client = redis_server.client()
        for i in range(total):
            client.fcall("hub_publish", 1, "hub:chat:hot", json.dumps(i), 1000, 600)

    async def run_client() -> tuple[dict, list[int]]:
        async with open_ws(hub.ws_url + "?user=x") as ws:
            ack = await command(ws, op="subscribe", channel="chat:hot", id=1, last=10)
            seen: list[int] = []
            while not seen or seen[-1] < total:
                frame = await recv_json(ws, 20)
                assert frame["type"] == "message", frame
                seen.append(frame["offset"])
            return ack, seen

    publisher = asyncio.get_running_loop().run_in_executor(None, publish)
    await asyncio.sleep(0.05)
    results = await asyncio.wait_for(asyncio.gather(*(run_client() for _ in range(50))), 60)
    await publisher
    stop.set()
    for ack, seen in results:
        assert seen == list(range(seen[0], total + 1)), seen[:12]
        assert seen[0] == max(1, ack["offset"] - 9), (ack, seen[:3])


async def test_history_on_three_shards(tmp_path, redis_factory, hub_factory):
    """Three Redis shards: each channel's history on its shard (hub.Publisher picks it as
    the hub does); delivery with offsets and recovery work on every shard."""
    from hub import Publisher

    shards = [redis_factory() for _ in range(3)]
    urls = [s.url for s in shards]
    path = tmp_path / "sharded.toml"
    path.write_text(f"redis_url = {json.dumps(urls)}\n" + CONFIG)
    hub = hub_factory("--config", str(path))
    channels = [f"chat:s{i}" for i in range(6)]
    with Publisher.from_config(str(path)) as publisher:
        async with open_ws(hub.ws_url + "?user=a") as ws:
            epochs = {}
            for i, channel in enumerate(channels):
                ack = await command(ws, op="subscribe", channel=channel, id=i)
                epochs[channel] = ack["epoch"]
            for channel in channels:
                for n in range(3):
                    position = publisher.publish(channel, {"n": n})
                    assert (position.offset, position.epoch) == (n + 1, epochs[channel])
            got = [await recv_json(ws) for _ in range(3 * len(channels))]
            for channel in channels:
                assert [m["offset"] for m in got if m["channel"] == channel] == [1, 2, 3]
        async with open_ws(hub.ws_url + "?user=b") as ws:
            for i, channel in enumerate(channels):
                ack = await command(ws, op="subscribe", channel=channel, id=i,
                                    since={"offset": 1, "epoch": epochs[channel]})
                assert ack["recovered"] is True, ack
                assert [m["offset"] for m in await messages(ws, 2)] == [2, 3]
    held = [sum(1 for k in s.client().keys("{hub:chat:*}:s")) for s in shards]
    assert sum(held) == len(channels) and sum(1 for h in held if h) >= 2, held


async def test_a_live_offset_the_history_does_not_hold_retires_the_epoch(tmp_path, redis_server,
                                                                        hub_factory):
    """A history message arrives whose offset the history never got (Redis delivered it,
    then lost it in a crash): the hub does not wait for it forever; it retires the epoch and
    says so."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with open_ws(hub.ws_url + "?user=a") as ws:
        ack = await command(ws, op="subscribe", channel="chat:ghost", id=1)
        epoch = ack["epoch"]
        fcall(redis_server, "chat:ghost", "one")
        assert (await recv_json(ws))["offset"] == 1
        redis_server.client().publish("{hub:chat:ghost}:h", f"5:{epoch}:\"ghost\"")
        gap = await recv_json(ws, 10)
        assert gap["type"] == "gap" and gap["from"] == 2 and gap["epoch"] != epoch, gap
        assert fcall(redis_server, "chat:ghost", "two") == (1, gap["epoch"])
        got = await recv_json(ws)
        assert (got["offset"], got["data"]) == (1, "two")


async def test_redis_sigkill_under_load_with_appendfsync_everysec(tmp_path, redis_factory,
                                                                   hub_factory):
    """appendfsync everysec and a SIGKILL of Redis while messages flow: whatever Redis lost
    is never delivered twice or silently: each (epoch, offset) arrives at most once, offsets
    rise within an epoch, and a change of epoch comes with a gap frame."""
    redis = redis_factory(("--appendonly", "yes", "--appendfsync", "everysec"))
    hub = hub_factory("--config", config_file(tmp_path), "--probe-interval", "0.5",
                      "--probe-timeout", "1", redis=redis)
    frames: list[dict] = []

    def publish(count: int) -> None:
        import redis as redis_py
        client = redis.client(timeout=2)
        for i in range(count):
            try:
                client.fcall("hub_publish", 1, "hub:chat:fsync", json.dumps(i), 1000, 600)
            except (redis_py.RedisError, OSError):
                return

    async with open_ws(hub.ws_url + "?user=a") as ws:
        await command(ws, op="subscribe", channel="chat:fsync", id=1)
        loop = asyncio.get_running_loop()
        flood = loop.run_in_executor(None, publish, 20000)
        await asyncio.sleep(0.5)
        await loop.run_in_executor(None, redis.kill)  # SIGKILL mid-flood
        await flood
        await loop.run_in_executor(None, redis.restart)
        await asyncio.sleep(2)
        await loop.run_in_executor(None, publish, 50)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                frames.append(await recv_json(ws, 3))
            except TimeoutError:
                break
    seen: set[tuple[str, int]] = set()
    epoch = None
    for frame in frames:
        if frame["type"] == "gap":
            epoch = frame.get("epoch") or epoch
            continue
        assert frame["type"] == "message", frame
        key = (frame.get("epoch") or epoch or "", frame["offset"])
        assert key not in seen, key
        seen.add(key)
    messages_ = [f for f in frames if f["type"] == "message"]
    offsets = [f["offset"] for f in messages_]
    gaps = [f for f in frames if f["type"] == "gap"]
    drops = [i for i in range(1, len(offsets)) if offsets[i] <= offsets[i - 1]]
    # an offset going down means a new epoch: it must come after a gap frame
    for i in drops:
        assert any(frames.index(g) < frames.index(messages_[i]) for g in gaps), (i, offsets[i])
    print(f"\neverysec + SIGKILL: {len(offsets)} delivered, {len(gaps)} gap frames, "
          f"{len(drops)} epoch restarts")


async def test_the_implicit_personal_subscription_delivers_history_messages(tmp_path,
                                                                            redis_server,
                                                                            hub_factory):
    """With [namespaces.user] history, a connection that never subscribes explicitly still
    gets its personal channel's messages live, with their offsets."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with open_ws(hub.ws_url + "?user=bob") as ws:
        # at once: the personal channel's position may still be being read
        offset, _ = fcall(redis_server, "user:bob", {"hello": 1}, size=100)
        got = await recv_json(ws)
        assert (got["channel"], got["offset"], got["data"]) == ("user:bob", offset,
                                                               {"hello": 1})
