"""Sharding over several independent Redis instances (``--redis-url`` repeated).

End-to-end tests against three real redis-servers and two ``hub serve`` processes given the
same three URLs in the same order, and :func:`hub.sharding.shard_index` in other processes (its
pure-function tests are in tests/unit/test_shard_index.py).
Timings are never asserted; every wait has a bound far above what a healthy hub needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

import pytest

from hub import AsyncPublisher, Publisher
from hub.sharding import shard_index
from tests.helpers import (
    ROOT,
    command,
    expect_message,
    expect_messages,
    metric,
    no_message,
    open_ws,
    recv_json,
    subscribe,
    wait_for_status,
)

PROBE = ("--probe-interval", "0.5", "--probe-timeout", "1")
CHANNELS = [f"chat:{i}" for i in range(30)]


# -- shard_index in other processes ---------------------------------------------------------

def test_shard_index_same_in_other_processes():
    """No dependence on Python's per-process string hash (PYTHONHASHSEED)."""
    names = [f"room:{i}" for i in range(200)]
    code = ("import json, sys; from hub.sharding import shard_index; "
            "print(json.dumps([shard_index(c, 5) for c in json.loads(sys.argv[1])]))")
    mine = [shard_index(c, 5) for c in names]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], env=env,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert json.loads(out) == mine


# -- end to end: three redis-servers, two hubs -------------------------------------------------

@pytest.fixture
def shards(redis_factory):
    return [redis_factory() for _ in range(3)]


def url_args(servers) -> list[str]:
    args = []
    for server in servers:
        args += ["--redis-url", server.url]
    return args


def by_shard(channels, count: int = 3) -> dict[int, list[str]]:
    placed: dict[int, list[str]] = {i: [] for i in range(count)}
    for channel in channels:
        placed[shard_index(channel, count)].append(channel)
    assert all(placed.values()), placed  # every shard carries some of them
    return placed


async def test_channels_live_on_their_shard_and_cross_processes(shards, hub_factory):
    h1 = hub_factory(*url_args(shards), "--client-publish", "chat:*")
    h2 = hub_factory(*url_args(shards), "--client-publish", "chat:*")
    by_shard(CHANNELS)
    async with open_ws(h1.ws_url) as a, open_ws(h2.ws_url) as b, open_ws(h2.ws_url) as p:
        for i, channel in enumerate(CHANNELS):
            await subscribe(a, channel, id=i)
            await subscribe(b, channel, id=i)
        for channel in CHANNELS:
            home = shard_index(channel, 3)
            for index, server in enumerate(shards):  # one subscription per hub process
                assert server.numsub("hub:" + channel) == (2 if index == home else 0), channel
        for i, channel in enumerate(CHANNELS):
            reply = await command(p, op="publish", channel=channel, data={"n": i}, id=100 + i)
            assert reply == {"type": "ack", "id": 100 + i}
        for ws in (a, b):
            await expect_messages(ws, [(c, {"n": i}) for i, c in enumerate(CHANNELS)])


async def test_personal_channels_on_their_shard(shards, hub_factory):
    h1 = hub_factory(*url_args(shards))
    h2 = hub_factory(*url_args(shards))
    users = [f"u{i}" for i in range(9)]
    by_shard([f"user:{u}" for u in users])
    urls = [s.url for s in shards]
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(open_ws((h1 if i % 2 else h2).ws_url
                                                         + f"?user={user}"))
                 for i, user in enumerate(users)]
        for user in users:
            home = shards[shard_index(f"user:{user}", 3)]
            assert home.numsub(f"hub:user:{user}") == 1
        with Publisher(urls) as publisher:
            for user in users:
                assert publisher.publish_to_user(user, {"to": user}) == 1
        for user, ws in zip(users, conns, strict=True):
            await expect_message(ws, f"user:{user}", {"to": user})
            await no_message(ws, 0.2)  # nobody else's mail


async def test_publishers_and_cli_with_the_url_list(shards, hub_factory):
    h1 = hub_factory(*url_args(shards))
    h2 = hub_factory(*url_args(shards))
    placed = by_shard(CHANNELS)
    picked = [channels[0] for channels in placed.values()]
    urls = [s.url for s in shards]
    async with open_ws(h1.ws_url) as a, open_ws(h2.ws_url) as b:
        for i, channel in enumerate(picked):
            await subscribe(a, channel, id=i)
        await subscribe(b, picked[0], id=9)
        with Publisher(urls) as publisher:
            counts = [publisher.publish(c, {"via": "sync"}) for c in picked]
        assert counts == [2, 1, 1]
        async with AsyncPublisher(urls) as apublisher:
            counts = [await apublisher.publish(c, {"via": "async"}) for c in picked]
        assert counts == [2, 1, 1]
        for channel in picked:
            cmd = [sys.executable, "-m", "hub", "publish", channel, '{"via": "cli"}',
                   *url_args(shards)]
            env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
            env["PYTHONPATH"] = str(ROOT)
            done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                           text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == ("2" if channel == picked[0] else "1")
        vias = ("sync", "async", "cli")
        await expect_messages(a, [(c, {"via": via}) for via in vias for c in picked])
        await expect_messages(b, [(picked[0], {"via": via}) for via in vias])


async def test_one_shard_down_affects_only_its_channels(shards, hub_factory):
    h1 = hub_factory(*url_args(shards), *PROBE)
    h2 = hub_factory(*url_args(shards), *PROBE)
    placed = by_shard(CHANNELS)
    victim = shards[1]
    hit = placed[1][:3]
    spared = placed[0][:3] + placed[2][:3]
    urls = [s.url for s in shards]
    async with open_ws(h1.ws_url) as a, open_ws(h1.ws_url) as b, open_ws(h2.ws_url) as c:
        for i, channel in enumerate(hit):
            await subscribe(a, channel, id=i)
        for i, channel in enumerate(spared):
            await subscribe(b, channel, id=i)
            await subscribe(c, channel, id=i)
        async with AsyncPublisher(urls) as publisher:
            victim.kill()
            for hub in (h1, h2):
                await wait_for_status(hub, "/readyz", 503, 15)
            for n in range(3):  # the other shards keep working while one is down
                for channel in spared:
                    assert await publisher.publish(channel, {"n": n}) == 2
            for ws in (b, c):
                await expect_messages(ws, [(ch, {"n": n}) for n in range(3) for ch in spared])

            victim.restart()
            for hub in (h1, h2):
                await wait_for_status(hub, "/readyz", 200, 20)
            frame = await recv_json(a, 20)
            assert frame == {"type": "gap", "channels": sorted(hit)}, frame
            for channel in hit:
                assert await publisher.publish(channel, {"after": True}) == 1
            await expect_messages(a, [(channel, {"after": True}) for channel in hit])
            for channel in spared:
                assert await publisher.publish(channel, {"n": 3}) == 2
            for ws in (b, c):  # no gap frame, nothing lost, nothing twice
                await expect_messages(ws, [(channel, {"n": 3}) for channel in spared])
                await no_message(ws, 0.3)


async def test_reconnect_metric_counts_only_reconnects(shards, hub_factory):
    hub = hub_factory(*url_args(shards), *PROBE)
    assert metric(hub, "hub_broker_reconnects_total") == 0
    shards[0].restart()
    await wait_for_status(hub, "/readyz", 503, 15)
    await wait_for_status(hub, "/readyz", 200, 20)
    assert metric(hub, "hub_broker_reconnects_total") == 1
