"""Presence end to end: real ``hub serve`` processes, a real redis-server, real WebSocket
clients (docs/protocol.md, "Presence"): the ``presence`` and ``presence_stats`` ops across
processes, join and leave frames for subscribe, unsubscribe, disconnect, an ordered shutdown
and a SIGKILL (the leaves of the dead process's clients within presence_ttl plus a sweep,
exactly once), the ``no_presence`` error, the embedded broker, three shards, a Redis Cluster
(channels on every master), and the ``hub_presence_*`` metrics of a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from tests.helpers import Cluster, metric, open_ws, poll

CONFIG = """\
[namespaces.chat]
presence = true
join_leave = true
presence_ttl = 3

[namespaces.big]
presence = true
join_leave = false
presence_ttl = 3
"""

#: presence_ttl (3) + the longest sweep wait (5 s + 20 %) + slack for the shared machine.
LEAVE_BOUND = 3 + 6 + 4


def config_file(tmp_path) -> str:
    path = tmp_path / "presence.toml"
    path.write_text(CONFIG)
    return str(path)


class Client:
    """A WebSocket client that reads every frame in the background: replies by id, the rest
    (join, leave, message) in :attr:`events`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.replies: dict[object, asyncio.Future[dict]] = {}
        self.next_id = 0
        self.task = asyncio.get_running_loop().create_task(self._read())
        self.client_id: str | None = None

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                data = json.loads(frame)
                waiter = self.replies.pop(data.get("id"), None) if "id" in data else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
                else:
                    self.events.append(data)

    async def call(self, **cmd: Any) -> dict:
        self.next_id += 1
        cmd["id"] = self.next_id
        waiter = self.replies[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps(cmd))
        return await asyncio.wait_for(waiter, 10)

    def joins_leaves(self, channel: str) -> list[tuple[str, str | None, str]]:
        return [(e["type"], e["user"], e["client"]) for e in self.events
                if e.get("type") in ("join", "leave") and e.get("channel") == channel]

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


@contextlib.asynccontextmanager
async def client(url: str):
    async with open_ws(url) as ws:
        c = Client(ws)
        try:
            yield c
        finally:
            c.task.cancel()


def users(reply: dict) -> list[str | None]:
    return sorted((c["user"] for c in reply["clients"]), key=lambda u: (u is None, u or ""))


async def test_presence_join_and_leave_across_two_processes(tmp_path, redis_server,
                                                            hub_factory):
    path = config_file(tmp_path)
    a = hub_factory("--config", path, redis=redis_server)
    b = hub_factory("--config", path, redis=redis_server)
    async with client(a.ws_url + "?user=alice") as alice, \
            client(b.ws_url + "?user=bob") as bob, client(b.ws_url) as anon:
        assert await alice.call(op="subscribe", channel="chat:room1") == {"type": "ack", "id": 1}
        me = await alice.call(op="presence", channel="chat:room1")
        assert me["type"] == "presence" and me["channel"] == "chat:room1" and me["id"] == 2
        [entry] = me["clients"]
        assert entry["user"] == "alice"
        alice_id = entry["client"]
        # alice's own join, after her ack
        await poll(lambda: _true(alice.joins_leaves("chat:room1")), 5)
        assert alice.joins_leaves("chat:room1") == [("join", "alice", alice_id)]

        await bob.call(op="subscribe", channel="chat:room1")
        await anon.call(op="subscribe", channel="chat:room1")
        for reader in (alice, bob):  # both processes see every client
            reply = await reader.call(op="presence", channel="chat:room1")
            assert users(reply) == ["alice", "bob", None]
            stats = await reader.call(op="presence_stats", channel="chat:room1")
            assert {k: stats[k] for k in ("type", "channel", "clients", "users")} == {
                "type": "presence_stats", "channel": "chat:room1", "clients": 3, "users": 2}
        ids = {c["user"]: c["client"] for c in reply["clients"]}
        await poll(lambda: _true(len(alice.joins_leaves("chat:room1")) == 3), 5)
        assert alice.joins_leaves("chat:room1") == [
            ("join", "alice", alice_id), ("join", "bob", ids["bob"]), ("join", None, ids[None])]

        # unsubscribe: a leave for bob on both processes, once
        assert (await bob.call(op="unsubscribe", channel="chat:room1"))["type"] == "ack"
        await poll(lambda: _true(("leave", "bob", ids["bob"])
                                       in alice.joins_leaves("chat:room1")), 5)
        assert users(await alice.call(op="presence", channel="chat:room1")) == ["alice", None]
        # subscribe again: a new join
        await bob.call(op="subscribe", channel="chat:room1")
        await poll(lambda: _true(alice.joins_leaves("chat:room1").count(
            ("join", "bob", ids["bob"])) == 2), 5)
        # the anonymous client on b sees alice's later leave
        await alice.close()
        await poll(lambda: _true(("leave", "alice", alice_id)
                                       in anon.joins_leaves("chat:room1")), 5)
        assert users(await bob.call(op="presence", channel="chat:room1")) == ["bob", None]
        await asyncio.sleep(0.5)
        assert anon.joins_leaves("chat:room1").count(("leave", "alice", alice_id)) == 1

        # errors: a namespace without presence; a channel the connection may not subscribe
        error = await bob.call(op="presence", channel="news")
        assert (error["type"], error["code"]) == ("error", "no_presence")
        error = await bob.call(op="presence_stats", channel="other:x")
        assert error["code"] == "no_presence"
        error = await bob.call(op="presence", channel="user:alice")
        assert error["code"] == "forbidden"


async def _true(value: object) -> object:
    return value


async def test_presence_without_join_leave_and_a_forged_publish(tmp_path, redis_server,
                                                                hub_factory):
    """``join_leave = false``: presence, no join/leave frames. A plain PUBLISH of a join
    lookalike on the channel is a message, never a join."""
    hub = hub_factory("--config", config_file(tmp_path), redis=redis_server)
    async with client(hub.ws_url + "?user=a") as a, client(hub.ws_url + "?user=b") as b:
        await a.call(op="subscribe", channel="big:hall")
        await b.call(op="subscribe", channel="big:hall")
        assert users(await a.call(op="presence", channel="big:hall")) == ["a", "b"]
        await a.call(op="subscribe", channel="chat:x")
        fake = json.dumps({"event": "join", "client": "x", "user": "mallory"})
        redis_server.client().publish("hub:chat:x", fake)
        await poll(lambda: _true([e for e in a.events if e["type"] == "message"]), 5)
        await b.close()
        await asyncio.sleep(1.0)
        assert a.joins_leaves("big:hall") == []
        assert [e["type"] for e in a.events] == ["join", "message"]  # its own join in chat:x
        assert a.events[1]["data"] == json.loads(fake)


async def test_sigkill_leaves_arrive_once_within_the_bound(tmp_path, redis_server,
                                                           hub_factory):
    """A SIGKILLed process's clients leave within presence_ttl + a sweep, exactly once, on
    every other process's subscribers (two live processes sweep concurrently)."""
    path = config_file(tmp_path)
    a = hub_factory("--config", path, redis=redis_server)
    c = hub_factory("--config", path, redis=redis_server)
    doomed = hub_factory("--config", path, redis=redis_server)
    async with client(a.ws_url + "?user=alice") as alice, \
            client(c.ws_url + "?user=carol") as carol:
        await alice.call(op="subscribe", channel="chat:k")
        await carol.call(op="subscribe", channel="chat:k")
        victims = []
        for n in range(5):
            ws = await open_ws(doomed.ws_url + f"?user=v{n}").__aenter__()
            victims.append(Client(ws))
            await victims[-1].call(op="subscribe", channel="chat:k")
        reply = await alice.call(op="presence", channel="chat:k")
        assert len(reply["clients"]) == 7
        victim_ids = {c["client"] for c in reply["clients"] if c["user"].startswith("v")}
        await asyncio.sleep(4)  # past one presence_ttl: the refresh keeps everybody
        assert len((await carol.call(op="presence", channel="chat:k"))["clients"]) == 7
        doomed.kill()
        killed = time.monotonic()

        def leaves(who: Client) -> list[str]:
            return [client for kind, _, client in who.joins_leaves("chat:k")
                    if kind == "leave"]

        await poll(lambda: _true(set(leaves(alice)) == victim_ids
                                       and set(leaves(carol)) == victim_ids), LEAVE_BOUND)
        elapsed = time.monotonic() - killed
        assert elapsed <= LEAVE_BOUND
        await asyncio.sleep(6)  # another sweep of each process: no second leave
        assert sorted(leaves(alice)) == sorted(victim_ids)
        assert sorted(leaves(carol)) == sorted(victim_ids)
        assert users(await alice.call(op="presence", channel="chat:k")) == ["alice", "carol"]
        for v in victims:
            v.task.cancel()


async def test_ordered_shutdown_announces_the_leaves_at_once(tmp_path, redis_server,
                                                             hub_factory):
    path = config_file(tmp_path)
    a = hub_factory("--config", path, redis=redis_server)
    b = hub_factory("--config", path, redis=redis_server)
    async with client(a.ws_url + "?user=alice") as alice, client(b.ws_url + "?user=bob") as bob:
        await alice.call(op="subscribe", channel="chat:s")
        await bob.call(op="subscribe", channel="chat:s")
        start = time.monotonic()
        b.terminate()
        await poll(lambda: _true([x for x in alice.joins_leaves("chat:s")
                                        if x[:2] == ("leave", "bob")]), 2.5)
        assert time.monotonic() - start < 2.5  # well before presence_ttl + a sweep
        assert users(await alice.call(op="presence", channel="chat:s")) == ["alice"]


async def test_embedded_broker(tmp_path, hub_factory):
    hub = hub_factory("--config", config_file(tmp_path))
    async with client(hub.ws_url + "?user=a") as a, client(hub.ws_url + "?user=b") as b:
        await a.call(op="subscribe", channel="chat:e")
        await b.call(op="subscribe", channel="chat:e")
        stats = await a.call(op="presence_stats", channel="chat:e")
        assert (stats["clients"], stats["users"]) == (2, 2)
        await b.call(op="unsubscribe", channel="chat:e")
        await poll(lambda: _true([x for x in a.joins_leaves("chat:e")
                                        if x[:2] == ("leave", "b")]), 5)
        assert [k for k, _, _ in a.joins_leaves("chat:e")] == ["join", "join", "leave"]
        assert users(await a.call(op="presence", channel="chat:e")) == ["a"]


@pytest.mark.timeout(120)
async def test_three_shards(tmp_path, redis_factory, hub_factory):
    shards = [redis_factory() for _ in range(3)]
    urls = [arg for s in shards for arg in ("--redis-url", s.url)]
    path = config_file(tmp_path)
    a = hub_factory("--config", path, *urls)
    b = hub_factory("--config", path, *urls)
    channels = [f"chat:r{n}" for n in range(12)]
    async with client(a.ws_url + "?user=alice") as alice, client(b.ws_url + "?user=bob") as bob:
        for channel in channels:
            await alice.call(op="subscribe", channel=channel)
            await bob.call(op="subscribe", channel=channel)
        for channel in channels:
            assert users(await alice.call(op="presence", channel=channel)) == ["alice", "bob"]
        held = [len(s.client().keys("{hub:chat:*}:p")) for s in shards]
        assert sum(held) == len(channels) and all(held), held
        await bob.close()
        await poll(lambda: _true(all(("leave", "bob") in [x[:2] for x in
                                                                alice.joins_leaves(c)]
                                           for c in channels)), 5)


def cluster_hub(hub_factory, cluster: Cluster, path: str):
    """A hub on the Redis Cluster ``cluster`` (as tests/system/test_cluster.py starts them)."""
    return hub_factory("--redis-cluster", "--redis-url", cluster.url, "--probe-interval",
                       "0.5", "--probe-timeout", "1", "--config", path)


def presence_set(reply: dict) -> set[tuple[str, str | None]]:
    assert reply["type"] == "presence", reply
    return {(c["client"], c["user"]) for c in reply["clients"]}


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_redis_cluster(tmp_path, cluster, hub_factory):
    """On a three-master Redis Cluster, channels on every master: both processes read the
    same presence and stats, joins and leaves cross processes, and the clients of a
    SIGKILLed third process leave within the bound, exactly once (the two live processes
    sweep every master's index concurrently)."""
    path = config_file(tmp_path)
    a = cluster_hub(hub_factory, cluster, path)
    b = cluster_hub(hub_factory, cluster, path)
    doomed = cluster_hub(hub_factory, cluster, path)
    by_master: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    for n in range(200):  # two channels on each master
        channel = f"chat:c{n}"
        owner = by_master[cluster.owner(channel)]
        if len(owner) < 2:
            owner.append(channel)
    channels = [c for names in by_master.values() for c in names]
    assert len(channels) == 6, by_master
    async with client(a.ws_url + "?user=alice") as alice, \
            client(b.ws_url + "?user=bob") as bob, client(b.ws_url) as anon:
        for who in (alice, bob, anon):
            for channel in channels:
                assert (await who.call(op="subscribe", channel=channel))["type"] == "ack"
        for port, names in by_master.items():  # each channel's entries on its own master
            for channel in names:
                assert cluster.client(port).hlen(f"{{hub:{channel}}}:p") == 3, (port, channel)
        seen: dict[str, set[tuple[str, str | None]]] = {}
        for channel in channels:  # both processes read the same presence and stats
            here = presence_set(await alice.call(op="presence", channel=channel))
            assert here == presence_set(await bob.call(op="presence", channel=channel))
            assert sorted((u or "") for _, u in here) == ["", "alice", "bob"]
            for reader in (alice, bob):
                stats = await reader.call(op="presence_stats", channel=channel)
                assert (stats["clients"], stats["users"]) == (3, 2), stats
            seen[channel] = here
        ids = {u: c for c, u in seen[channels[0]]}
        assert all({u: c for c, u in s} == ids for s in seen.values())
        # the joins of b's clients reach alice on a, on every master (bob subscribed after
        # alice: he sees his own join and anon's)
        await poll(lambda: _true(all(len(alice.joins_leaves(c)) == 3
                                     and len(bob.joins_leaves(c)) == 2 for c in channels)), 10)
        for channel in channels:
            assert alice.joins_leaves(channel) == [
                ("join", "alice", ids["alice"]), ("join", "bob", ids["bob"]),
                ("join", None, ids[None])]
            assert bob.joins_leaves(channel) == [("join", "bob", ids["bob"]),
                                                 ("join", None, ids[None])]
        # an unsubscribe on b: its leave reaches a, once per channel
        left = [names[0] for names in by_master.values()]
        for channel in left:
            assert (await anon.call(op="unsubscribe", channel=channel))["type"] == "ack"
        await poll(lambda: _true(all(("leave", None, ids[None]) in alice.joins_leaves(c)
                                     for c in left)), 10)
        for channel in left:
            assert presence_set(await alice.call(op="presence", channel=channel)) == {
                (ids["alice"], "alice"), (ids["bob"], "bob")}

        # SIGKILL of a third process with two clients on every channel
        victims = []
        for n in range(2):
            ws = await open_ws(doomed.ws_url + f"?user=v{n}").__aenter__()
            victims.append(Client(ws))
            for channel in channels:
                await victims[-1].call(op="subscribe", channel=channel)
        victim_ids = set()
        for channel in channels:
            reply = await bob.call(op="presence", channel=channel)
            mine = {c for c, u in presence_set(reply) if u is not None and u.startswith("v")}
            assert len(mine) == 2, reply
            victim_ids |= mine
        assert len(victim_ids) == 2
        # the joins of the third process's clients reach both a and b, once each
        await poll(lambda: _true(all(sum(k == "join" and c in victim_ids
                                         for k, _, c in w.joins_leaves(ch)) == 2
                                     for w in (alice, bob) for ch in channels)), 10)
        await asyncio.sleep(4)  # past one presence_ttl: the refresh keeps them on every master
        for channel in channels:
            stats = await alice.call(op="presence_stats", channel=channel)
            assert stats["users"] == 4, (channel, stats)
        doomed.kill()
        killed = time.monotonic()

        def leaves(who: Client, channel: str) -> list[str]:
            return [c for kind, _, c in who.joins_leaves(channel)
                    if kind == "leave" and c in victim_ids]

        await poll(lambda: _true(all(set(leaves(w, c)) == victim_ids
                                     for w in (alice, bob) for c in channels)), LEAVE_BOUND)
        assert time.monotonic() - killed <= LEAVE_BOUND
        await asyncio.sleep(6)  # another sweep of each process: no second leave
        for channel in channels:
            for who in (alice, bob):
                assert sorted(leaves(who, channel)) == sorted(victim_ids), channel
            assert {u for _, u in presence_set(await bob.call(op="presence",
                                                              channel=channel))} <= {
                "alice", "bob", None}
        # every entry of the dead process was swept by exactly one live process
        swept = [metric(h, "hub_presence_swept_total") for h in (a, b)]
        assert sum(s or 0 for s in swept) == len(victim_ids) * len(channels), swept
        for v in victims:
            v.task.cancel()


async def test_metrics(tmp_path, redis_server, hub_factory):
    """``hub_presence_*`` on /metrics of real processes: the join and leave events each
    published, the sweeps and what they removed (a SIGKILLed process's entries), a failed
    ``add`` (Redis out of memory) counted and repaired by the refresh, which announces it."""
    path = config_file(tmp_path)
    a = hub_factory("--config", path, redis=redis_server)
    doomed = hub_factory("--config", path, redis=redis_server)
    events = "hub_presence_events_total"
    async with client(a.ws_url + "?user=alice") as alice, client(a.ws_url + "?user=bob") as bob:
        await alice.call(op="subscribe", channel="chat:m")
        await bob.call(op="subscribe", channel="chat:m")
        await poll(lambda: _true(len(alice.joins_leaves("chat:m")) == 2), 5)
        await bob.call(op="unsubscribe", channel="chat:m")
        await poll(lambda: _true(len(alice.joins_leaves("chat:m")) == 3), 5)
        assert metric(a, events, {"event": "join"}) == 2
        assert metric(a, events, {"event": "leave"}) == 1
        await bob.call(op="subscribe", channel="big:m")  # join_leave = false: no event
        assert metric(a, events, {"event": "join"}) == 2
        assert metric(a, "hub_presence_failures_total", {"op": "add"}) == 0

        async with client(doomed.ws_url + "?user=v") as victim:
            await victim.call(op="subscribe", channel="chat:m")
            await poll(lambda: _true(len(alice.joins_leaves("chat:m")) == 4), 5)
            assert metric(doomed, events, {"event": "join"}) == 1
            assert metric(a, events, {"event": "join"}) == 2  # published by doomed
            doomed.kill()
            await poll(lambda: _true(("leave", "v") in [x[:2] for x in
                                                         alice.joins_leaves("chat:m")]),
                       LEAVE_BOUND)
        assert metric(a, "hub_presence_swept_total") == 1
        assert metric(a, events, {"event": "leave"}) == 2
        assert (metric(a, "hub_presence_sweeps_total") or 0) >= 1

        # Redis refuses writes: the add fails (counted), the subscribe still succeeds; once
        # Redis accepts writes again the refresh creates the entry and announces the join
        redis = redis_server.client()
        redis.config_set("maxmemory", 1)
        try:
            async with client(a.ws_url + "?user=carol") as carol:
                assert (await carol.call(op="subscribe", channel="chat:m"))["type"] == "ack"
                assert metric(a, "hub_presence_failures_total", {"op": "add"}) == 1
                assert users(await alice.call(op="presence", channel="chat:m")) == ["alice"]
                redis.config_set("maxmemory", 0)
                await poll(lambda: _true(("join", "carol") in [x[:2] for x in
                                                               alice.joins_leaves("chat:m")]),
                           5)
                assert metric(a, "hub_presence_recreated_total") == 1
                assert metric(a, events, {"event": "join"}) == 3
                assert users(await alice.call(op="presence", channel="chat:m")) == [
                    "alice", "carol"]
        finally:
            redis.config_set("maxmemory", 0)
