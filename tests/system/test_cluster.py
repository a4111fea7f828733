"""Redis Cluster mode (``--redis-cluster``): sharded pub/sub on a real three-master cluster.

The ``cluster`` fixture (tests/conftest.py, :class:`tests.helpers.Cluster`) starts three
``redis-server --cluster-enabled yes`` on free loopback ports (client and bus port both chosen
free), joins them with ``redis-cli --cluster create`` and waits for ``cluster_state:ok``; every
node is killed at teardown. Timings are never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import pytest
from redis.crc import key_slot

import tests.conftest
from hub import AsyncPublisher, Publisher
from tests.helpers import (
    ROOT,
    Cluster,
    command,
    expect_message,
    expect_messages,
    metric,
    no_message,
    open_ws,
    recv_json,
    subscribe,
    wait_until_async,
)

pytestmark = pytest.mark.cluster

PROBE = ("--probe-interval", "0.5", "--probe-timeout", "1")
#: The fixture lives in tests/conftest.py; the name stays here for the modules that import it
#: from this one (tests/system/test_publisher_history.py).
cluster = tests.conftest.cluster


def spread(cluster: Cluster, names: list[str]) -> dict[int, list[str]]:
    """``names`` grouped by the port of their master; every master gets some."""
    placed: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    for name in names:
        placed[cluster.owner(name)].append(name)
    assert all(placed.values()), placed
    return placed


def cluster_hub(hub_factory, cluster: Cluster, *args: str):
    return hub_factory("--redis-cluster", "--redis-url", cluster.url, *PROBE, *args)


async def test_delivery_across_masters(cluster, hub_factory):
    h1 = cluster_hub(hub_factory, cluster)
    h2 = cluster_hub(hub_factory, cluster)
    channels = [f"room:{i}" for i in range(12)]
    spread(cluster, channels)
    async with open_ws(h1.ws_url) as a, open_ws(h2.ws_url) as b:
        for i, channel in enumerate(channels):
            await subscribe(a, channel, id=i)
            await subscribe(b, channel, id=i)
        for channel in channels:  # each hub holds one SSUBSCRIBE, on the channel's master
            assert cluster.shardnumsub(cluster.owner(channel), channel) == 2
        for i, channel in enumerate(channels[:6]):
            assert cluster.spublish(channel, f'{{"cli": {i}}}') == 2
        with Publisher(cluster.url, cluster=True) as publisher:
            for i, channel in enumerate(channels[6:]):
                assert publisher.publish(channel, {"lib": i}) == 2
        cmd = [sys.executable, "-m", "hub", "publish", channels[0], '"hub cli"',
               "--redis-cluster", "--redis-url", cluster.url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env["PYTHONPATH"] = str(ROOT)
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                       text=True, timeout=30, check=False)
        assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr
        for ws in (a, b):
            await expect_messages(ws, [(c, {"cli": i}) for i, c in enumerate(channels[:6])]
                                  + [(c, {"lib": i}) for i, c in enumerate(channels[6:])]
                                  + [(channels[0], "hub cli")])


async def test_personal_channels_and_client_publish(cluster, hub_factory):
    h1 = cluster_hub(hub_factory, cluster, "--client-publish", "chat:*")
    h2 = cluster_hub(hub_factory, cluster, "--client-publish", "chat:*")
    users = [f"u{i}" for i in range(9)]
    spread(cluster, [f"user:{u}" for u in users])
    chats = [f"chat:{i}" for i in range(9)]
    spread(cluster, chats)
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(open_ws((h1, h2)[i % 2].ws_url
                                                         + f"?user={user}"))
                 for i, user in enumerate(users)]
        sender = await stack.enter_async_context(open_ws(h2.ws_url))
        async with AsyncPublisher(cluster.url, cluster=True) as publisher:
            for user in users:
                assert await publisher.publish_to_user(user, {"to": user}) == 1
        for user, ws in zip(users, conns, strict=True):
            await expect_message(ws, f"user:{user}", {"to": user})

        receiver = conns[0]  # on h1
        for i, chat in enumerate(chats):
            await subscribe(receiver, chat, id=i)
        for i, chat in enumerate(chats):  # a client of h2 publishes, h1's client receives
            reply = await command(sender, op="publish", channel=chat, data=[i], id=50 + i)
            assert reply == {"type": "ack", "id": 50 + i}
        await expect_messages(receiver, [(chat, [i]) for i, chat in enumerate(chats)])
        reply = await command(sender, op="publish", channel="news", data=1, id=99)
        assert reply["type"] == "error" and reply["code"] == "forbidden", reply
        for ws in conns:
            await no_message(ws, 0.1)


async def test_master_restart_affects_only_its_channels(cluster, hub_factory):
    h1 = cluster_hub(hub_factory, cluster)
    h2 = cluster_hub(hub_factory, cluster, "--client-publish", "room:*")
    placed = spread(cluster, [f"room:{i}" for i in range(15)])
    first, second, victim = cluster.masters()  # not the seed: the hubs ask the others
    hit = placed[victim][:3]
    spared = placed[first][:2] + placed[second][:2]
    async with open_ws(h1.ws_url) as a, open_ws(h1.ws_url) as b, open_ws(h2.ws_url) as c:
        for i, channel in enumerate(hit):
            await subscribe(a, channel, id=i)
        for i, channel in enumerate(spared):
            await subscribe(b, channel, id=i)
            await subscribe(c, channel, id=i)

        cluster.kill(victim)
        for hub in (h1, h2):
            await wait_until_async(lambda hub=hub: hub.http_get("/readyz", 0.5)[0] == 503, 15,
                                   what="/readyz 503 while a master is down")
        for n in range(3):  # the other masters keep working
            for channel in spared:
                assert cluster.spublish(channel, str(n)) == 2
        for ws in (b, c):
            await expect_messages(ws, [(channel, n) for n in range(3) for channel in spared])
        async with open_ws(h2.ws_url) as d:  # neither SSUBSCRIBE nor SPUBLISH can be done
            reply = await command(d, op="subscribe", channel=hit[0], id=7)
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            reply = await command(d, op="publish", channel=hit[0], data=0, id=8)
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply

        cluster.restart(victim)  # same port, same nodes.conf: it serves its slots again
        for hub in (h1, h2):
            await wait_until_async(lambda hub=hub: hub.http_get("/readyz", 0.5)[0] == 200, 30,
                                   what="/readyz 200 after the master is back")
        frame = await recv_json(a, 20)
        assert frame == {"type": "gap", "channels": sorted(hit)}, frame
        for channel in hit:
            assert cluster.spublish(channel, '"after"') == 1
            await expect_message(a, channel, "after")
        for channel in spared:
            assert cluster.spublish(channel, "3") == 2
        for ws in (b, c):  # no gap frame, nothing lost, nothing twice
            await expect_messages(ws, [(channel, 3) for channel in spared])
            await no_message(ws, 0.3)
    for hub in (h1, h2):
        assert metric(hub, "hub_broker_reconnects_total") == 1
        assert metric(hub, "hub_broker_connected") == 1


async def test_slot_migration(cluster, hub_factory):
    h1 = cluster_hub(hub_factory, cluster)
    h2 = cluster_hub(hub_factory, cluster)
    channel = "news"
    src = cluster.owner(channel)
    dst = next(port for port in cluster.masters() if port != src)
    bystander = next(f"room:{i}" for i in range(100)
                     if cluster.owner(f"room:{i}") not in (src,))
    async with open_ws(h1.ws_url) as a, open_ws(h2.ws_url) as b:
        for ws in (a, b):
            await subscribe(ws, channel, id=1)
            await subscribe(ws, bystander, id=2)
        with Publisher(cluster.url, cluster=True) as publisher:  # its slot map goes stale
            assert publisher.publish(channel, "before") == 2

            cluster.move_slot(key_slot(f"hub:{channel}".encode()), src, dst)
            await wait_until_async(lambda: cluster.shardnumsub(dst, channel) == 2, 20,
                                   what="both hubs subscribed on the new owner")
            for ws in (a, b):
                await expect_message(ws, channel, "before")
                frame = await recv_json(ws, 10)
                assert frame == {"type": "gap", "channels": [channel]}, frame

            assert publisher.publish(channel, "after") == 2  # follows MOVED
            assert publisher.publish(bystander, "still") == 2
        for ws in (a, b):
            await expect_messages(ws, [(channel, "after"), (bystander, "still")])
            await no_message(ws, 0.3)


async def test_replica_takes_over_a_dead_master(replicated_cluster, hub_factory):
    cluster = replicated_cluster
    h1 = cluster_hub(hub_factory, cluster)
    h2 = cluster_hub(hub_factory, cluster)
    first, _, victim = cluster.masters()
    placed = spread(cluster, [f"room:{i}" for i in range(15)])
    hit = placed[victim][:3]
    spared = placed[first][:2]
    async with open_ws(h1.ws_url) as a, open_ws(h2.ws_url) as b, open_ws(h2.ws_url) as c:
        for ws in (a, b):
            for i, channel in enumerate(hit):
                await subscribe(ws, channel, id=i)
        for i, channel in enumerate(spared):
            await subscribe(c, channel, id=i)

        cluster.kill(victim)  # never restarted: its replica is promoted
        await wait_until_async(lambda: victim not in cluster.masters(), 30,
                               what="a replica promoted")
        for hub in (h1, h2):
            await wait_until_async(lambda hub=hub: hub.http_get("/readyz", 0.5)[0] == 200, 30,
                                   what="/readyz 200 with the new master")
        for ws in (a, b):
            frame = await recv_json(ws, 20)
            assert frame == {"type": "gap", "channels": sorted(hit)}, frame
        for channel in hit:
            assert cluster.spublish(channel, '"promoted"') == 2
        for ws in (a, b):
            await expect_messages(ws, [(channel, "promoted") for channel in hit])
        for channel in spared:
            assert cluster.spublish(channel, '"spared"') == 1
            await expect_message(c, channel, "spared")
        await no_message(c, 0.3)


async def test_history_channels_on_a_cluster(cluster, hub_factory, tmp_path):
    """History on a Redis Cluster: channels on every master, client publishes into history
    (FCALL routed by the declared key, SPUBLISH of the history message in its slot),
    deliveries with offsets on both hubs, and recovery with since."""
    import json as json_

    config = tmp_path / "hub.toml"
    config.write_text('client_publish = ["chat:*"]\n\n[namespaces.chat]\n'
                      'history_size = 100\nhistory_ttl = 600\n')
    h1 = cluster_hub(hub_factory, cluster, "--config", str(config))
    h2 = cluster_hub(hub_factory, cluster, "--config", str(config))
    chats = [f"chat:c{i}" for i in range(6)]
    spread(cluster, chats)
    async with open_ws(h1.ws_url + "?user=a") as a, open_ws(h2.ws_url + "?user=b") as b:
        epochs = {}
        for i, channel in enumerate(chats):
            for ws in (a, b):
                await ws.send(json_.dumps({"op": "subscribe", "channel": channel, "id": i}))
                ack = await recv_json(ws)
                assert ack["type"] == "ack" and ack["offset"] == 0, ack
                epochs[channel] = ack["epoch"]
        for channel in chats:
            for n in range(2):
                await a.send(json_.dumps({"op": "publish", "channel": channel, "id": n,
                                          "data": n}))
        replies = [await recv_json(a) for _ in range(4 * len(chats))]
        acks = [r for r in replies if r["type"] == "ack"]
        assert sorted(r["offset"] for r in acks) == sorted([1, 2] * len(chats)), acks
        got = [m for m in replies if m["type"] == "message"]
        got += [await recv_json(b) for _ in range(2 * len(chats))]
        for channel in chats:
            mine = [m["offset"] for m in got if m["channel"] == channel]
            assert sorted(mine) == [1, 1, 2, 2], (channel, mine)
    async with open_ws(h2.ws_url + "?user=c") as c:
        for i, channel in enumerate(chats):
            await c.send(json_.dumps({"op": "subscribe", "channel": channel, "id": i,
                                      "since": {"offset": 1, "epoch": epochs[channel]}}))
            ack = await recv_json(c)
            assert ack["recovered"] is True and ack["offset"] == 2, ack
            assert (await recv_json(c))["offset"] == 2
