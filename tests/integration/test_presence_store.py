"""hub.presence: the same suite against MemoryPresence and RedisPresence on a real
redis-server, then the Redis-only contract (keys, round trips of a refresh, restarts, the
cluster). Timings are polled, never asserted; figures are printed."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from hub.history import RedisHistory, ensure_functions
from hub.history.redis import LIBRARY_VERSION, loaded_version
from hub.presence import (
    ClientInfo,
    MemoryPresence,
    Presence,
    PresenceStats,
    RedisPresence,
    index_key,
    pack_info,
    registry_key,
    unpack_info,
)
from tests.helpers import poll

SHORT = 0.3  # seconds: a ttl that expires during a test
LONG = 600.0  # seconds: a ttl that does not


def aclient(server, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=10, **kwargs)


class Harness:
    def __init__(self, kind: str, store: Presence, make_peer, clients: list) -> None:
        self.kind = kind
        self.store = store
        self.make_peer = make_peer  # another process's store on the same data
        self.clients = clients


@pytest.fixture(params=["memory", "redis"])
async def h(request):
    if request.param == "memory":
        store = MemoryPresence()
        yield Harness("memory", store, lambda: store, [])
        return
    server = request.getfixturevalue("redis_server")
    clients = [aclient(server)]
    await ensure_functions(clients[0])

    def peer() -> RedisPresence:
        clients.append(aclient(server))
        return RedisPresence(clients[-1], prefix="hub:")

    yield Harness("redis", RedisPresence(clients[0], prefix="hub:"), peer, clients)
    for c in clients:
        await c.aclose()


def names(infos) -> list[str]:
    return sorted(i.client for i in infos)


async def test_add_refresh_remove(h):
    s = h.store
    alice = ClientInfo("c1", "alice")
    assert await s.add("chat:a", alice, ttl=LONG) is True
    assert await s.add("chat:a", alice, ttl=LONG) is False  # a refresh
    assert await s.add("chat:a", ClientInfo("c2"), ttl=LONG) is True
    assert sorted(await s.clients("chat:a"), key=lambda i: i.client) == [
        alice, ClientInfo("c2", None)]
    # the info of an entry is replaced by a later add
    assert await s.add("chat:a", ClientInfo("c2", "bob"), ttl=LONG) is False
    assert ClientInfo("c2", "bob") in await s.clients("chat:a")
    assert await s.stats("chat:a") == PresenceStats(2, 2)
    assert await s.clients("chat:other") == []
    assert await s.remove("chat:a", "c1") is True
    assert await s.remove("chat:a", "c1") is False  # exactly one caller reports the leave
    assert await s.remove("chat:nothing", "c1") is False
    assert names(await s.clients("chat:a")) == ["c2"]
    assert await s.remove("chat:a", "c2") is True
    assert await s.clients("chat:a") == [] and await s.stats("chat:a") == PresenceStats(0, 0)
    assert await s.channels_with_expired() == []
    with pytest.raises(ValueError):
        await s.add("chat:a", alice, ttl=0)
    with pytest.raises(ValueError):
        await s.refresh([("chat:a", alice)], ttl=-1)


async def test_users_are_counted_distinct_and_anonymous_as_clients_only(h):
    s = h.store
    entries = [("chat:u", ClientInfo(f"a{i}", "alice")) for i in range(3)]
    entries += [("chat:u", ClientInfo("b0", "bob")), ("chat:u", ClientInfo("x0")),
                ("chat:u", ClientInfo("x1", None))]
    assert len(await s.refresh(entries, ttl=LONG)) == 6  # all created
    assert await s.stats("chat:u") == PresenceStats(clients=6, users=2)
    assert await s.remove("chat:u", "a0") and await s.remove("chat:u", "a1")
    assert await s.stats("chat:u") == PresenceStats(clients=4, users=2)
    assert await s.remove("chat:u", "a2")
    assert await s.stats("chat:u") == PresenceStats(clients=3, users=1)
    # a user whose only connection expired is no longer counted, before any cleaning
    await s.add("chat:u", ClientInfo("c0", "carol"), ttl=SHORT)
    assert (await s.stats("chat:u")).users == 2

    async def carol_gone():
        return await s.stats("chat:u") == PresenceStats(3, 1)

    await poll(carol_gone, what="carol's entry to expire")


async def test_expired_entries_are_never_returned_and_expire_returns_them_once(h):
    s = h.store
    await s.add("chat:e", ClientInfo("short", "u1"), ttl=SHORT)
    await s.add("chat:e", ClientInfo("long", "u2"), ttl=LONG)
    await s.add("chat:f", ClientInfo("long", "u2"), ttl=LONG)

    async def expired():
        return names(await s.clients("chat:e")) == ["long"]

    await poll(expired, what="the short entry to expire")
    # not cleaned yet: still invisible to clients() and stats()
    assert await s.stats("chat:e") == PresenceStats(1, 1)
    assert await s.channels_with_expired() == ["chat:e"]
    assert await s.expire("chat:e") == [ClientInfo("short", "u1")]
    assert await s.expire("chat:e") == []
    assert await s.channels_with_expired() == []
    assert await s.remove("chat:e", "short") is False  # taken by expire: no second leave
    assert names(await s.clients("chat:e")) == ["long"]
    assert await s.expire("chat:f") == []


async def test_an_expired_entry_is_revived_by_a_refresh_before_the_sweep(h):
    s = h.store
    await s.add("chat:r", ClientInfo("c", "u"), ttl=SHORT)

    async def gone():
        return await s.clients("chat:r") == []

    await poll(gone, what="expiry")
    # the owner was stalled but is alive: its refresh wins, there is no leave to report
    assert await s.refresh([("chat:r", ClientInfo("c", "u"))], ttl=LONG) == []
    assert await s.channels_with_expired() == [] and await s.expire("chat:r") == []
    assert names(await s.clients("chat:r")) == ["c"]


async def test_concurrent_sweepers_get_each_expired_entry_exactly_once(h):
    channels = [f"room:{i}" for i in range(5)]
    entries = [(channels[i % 5], ClientInfo(f"c{i}", f"u{i % 17}")) for i in range(200)]
    await h.store.refresh(entries, ttl=SHORT)
    await h.store.add("room:0", ClientInfo("alive", "u"), ttl=LONG)

    async def all_expired():
        stats = [await h.store.stats(c) for c in channels]
        return sum(st.clients for st in stats) == 1

    await poll(all_expired, what="200 entries to expire")
    sweepers = [h.make_peer() for _ in range(4)]

    async def sweeper(store: Presence) -> list[tuple[str, str]]:
        got = []
        while True:
            batch = await store.sweep(limit=7)  # small batches: many interleavings
            if not batch and not await store.channels_with_expired():
                return got
            got += [(channel, info.client) for channel, infos in batch.items()
                    for info in infos]

    # a process removing some of the same entries at the same time (a late unsubscribe)
    async def remover(store: Presence) -> list[tuple[str, str]]:
        got = []
        for channel, info in entries[::3]:
            if await store.remove(channel, info.client):
                got.append((channel, info.client))
        return got

    results = await asyncio.gather(*(sweeper(s) for s in sweepers), remover(h.make_peer()))
    everything = [item for r in results for item in r]
    assert len(everything) == len(set(everything)) == 200  # no duplicates, none lost
    assert set(everything) == {(c, i.client) for c, i in entries}
    assert names(await h.store.clients("room:0")) == ["alive"]
    print(f"\n[{h.kind}] 200 expired entries over 4 sweepers + 1 remover: "
          f"{[len(r) for r in results]}")


async def test_refresh_returns_the_entries_it_created_again(h):
    s = h.store
    entries = [("chat:x", ClientInfo("c1", "u1")), ("chat:y", ClientInfo("c1", "u1")),
               ("chat:x", ClientInfo("c2", None))]
    def key(entry):
        return entry[0], entry[1].client

    assert sorted(await s.refresh(entries, ttl=SHORT), key=key) == sorted(entries, key=key)
    assert await s.refresh(entries[:1], ttl=LONG) == []  # c1 in chat:x lives on

    async def swept():
        return sorted((c, names(i)) for c, i in (await s.sweep()).items())

    got = await poll(swept, what="the short entries to be swept")
    assert got == [("chat:x", ["c2"]), ("chat:y", ["c1"])]
    # the owner comes back after its entries were swept: they are created again
    assert sorted(await s.refresh(entries, ttl=LONG), key=key) == sorted(entries[1:], key=key)
    assert await s.refresh([], ttl=LONG) == []


async def test_memory_clock_is_injectable():
    now = [1000.0]
    s = MemoryPresence(clock=lambda: now[0])
    await s.add("chat:m", ClientInfo("a", "u"), ttl=10)
    await s.add("chat:m", ClientInfo("b", "u"), ttl=20)
    await s.add("chat:n", ClientInfo("c", None), ttl=5)
    now[0] = 1009.999
    assert await s.channels_with_expired() == ["chat:n"]
    assert await s.stats("chat:m") == PresenceStats(2, 1)
    now[0] = 1010.0  # expired from its expiry on
    assert names(await s.clients("chat:m")) == ["b"]
    assert await s.channels_with_expired() == ["chat:n", "chat:m"]  # the most overdue first
    assert await s.expire("chat:m") == [ClientInfo("a", "u")]
    now[0] = 1030.0
    assert await s.sweep() == {"chat:m": [ClientInfo("b", "u")],
                               "chat:n": [ClientInfo("c", None)]}
    assert await s.channels_with_expired() == []


def test_packed_info():
    assert pack_info(ClientInfo("c", "alice")) == b'{"user":"alice"}'
    assert pack_info(ClientInfo("c")) == b"{}"
    assert unpack_info("c", b'{"user":"\xc3\xa9","conn_info":{"x":1}}') == ClientInfo("c", "é")
    assert unpack_info("c", b'{"user":5}') == ClientInfo("c", None)
    assert unpack_info("c", b"garbage") == ClientInfo("c", None)


# --- Redis only --------------------------------------------------------------------------

async def test_redis_keys_index_and_server_time(redis_server):
    client = aclient(redis_server)
    await ensure_functions(client)
    assert await loaded_version(client) == LIBRARY_VERSION >= 2
    store = RedisPresence(client, prefix="hub:")
    await store.add("chat:k", ClientInfo("c1", "alice"), ttl=100)
    await store.add("chat:k", ClientInfo("c2"), ttl=50)
    index = "{hub:}presence:channels"
    assert store.index("chat:k") == index
    assert await client.hgetall("{hub:chat:k}:p") == {b"c1": b'{"user":"alice"}', b"c2": b"{}"}
    scores = dict(await client.zrange("{hub:chat:k}:pz", 0, -1, withscores=True))
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros // 1000
    assert 0 < scores[b"c1"] - now_ms <= 100_000 and 0 < scores[b"c2"] - now_ms <= 50_000
    assert await client.zscore(index, "hub:chat:k") == scores[b"c2"]  # the earliest expiry
    assert 0 < await client.pttl("{hub:chat:k}:p") <= 100_000 + 300_000  # backstop: + linger
    assert key_slot(b"{hub:chat:k}:p") == key_slot(b"{hub:chat:k}:pz") == key_slot(b"hub:chat:k")
    await store.remove("chat:k", "c2")
    assert await client.zscore(index, "hub:chat:k") == scores[b"c1"]
    await store.remove("chat:k", "c1")
    assert await client.exists("{hub:chat:k}:p", "{hub:chat:k}:pz") == 0
    assert await client.zcard(index) == 0
    # the documented FCALL forms
    assert await client.fcall("hub_presence_add", 2, "hub:chat:k", index, "60",
                              "c9", b'{"user":"z"}', "c8", b"{}") == [1, 1]
    assert await client.fcall_ro("hub_presence_stats", 1, "hub:chat:k") == [2, 1]
    assert sorted(await client.fcall_ro("hub_presence_clients", 1, "hub:chat:k")) == sorted(
        [b"c9", b'{"user":"z"}', b"c8", b"{}"])
    assert await client.fcall_ro("hub_presence_due", 1, index, 10) == []
    assert await client.fcall("hub_presence_remove", 2, "hub:chat:k", index, "c9") == 1
    assert await client.fcall("hub_presence_refresh", 3, index, "hub:chat:k", "hub:chat:l",
                              "60", 1, 2, "c8", b"{}", "d1", b"{}", "d2", b'{"user":"y"}'
                              ) == [0, 1, 1]
    assert await client.fcall_ro("hub_presence_stats", 1, "hub:chat:l") == [2, 1]
    for bad in (("hub_presence_refresh", 2, index, "hub:chat:k", "60", 2, "c", "{}"),
                ("hub_presence_refresh", 1, index, "60"),
                ("hub_presence_refresh", 2, index, "hub:{x", "60", 1, "c", "{}"),
                ("hub_presence_add", 2, "hub:chat:k", index, "0", "c", "{}"),
                ("hub_presence_add", 2, "hub:chat:k", index, "x", "c", "{}"),
                ("hub_presence_add", 2, "hub:chat:k", index, "5", "c"),
                ("hub_presence_add", 1, "hub:chat:k", "5", "c", "{}"),
                ("hub_presence_add", 2, "hub:{x}", index, "5", "c", "{}")):
        with pytest.raises(aioredis.ResponseError, match="hub: "):
            await client.fcall(*bad)
    # the history functions share the library and still work
    assert (await RedisHistory(client).publish("chat:k", b"x", size=5, ttl=60)).offset == 1
    await client.aclose()


class CountingConnection(aioredis.Connection):
    """Counts writes to Redis: one per command, one per pipeline (its commands go in one
    write and their replies are read after): the round trips."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


async def _fcall_calls(client: aioredis.Redis) -> tuple[int, int]:
    """(FCALL calls, microseconds Redis spent in them) so far."""
    stats = (await client.info("commandstats")).get("cmdstat_fcall", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def test_refresh_of_10000_connections_in_few_round_trips(redis_server):
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_server.port, socket_timeout=30,
                                   connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    plain = aclient(redis_server)
    await ensure_functions(plain)
    store = RedisPresence(client, prefix="hub:")  # batch 500
    # 10,000 connections, each in one of 100 rooms and in its own personal channel
    entries = []
    for i in range(10_000):
        info = ClientInfo(f"client-{i:05d}", f"user-{i}")
        entries += [(f"room:{i % 100}", info), (f"user:user-{i}", info)]
    channels = 100 + 10_000
    figures = []
    await client.ping()  # the connection's handshake is not part of the figure
    for attempt in ("create", "refresh"):
        writes, (fcalls, usec) = CountingConnection.writes, await _fcall_calls(plain)
        t0 = time.perf_counter()
        created = await store.refresh(entries, ttl=LONG)
        elapsed = time.perf_counter() - t0
        trips = CountingConnection.writes - writes
        calls_now, usec_now = await _fcall_calls(plain)
        calls, busy = calls_now - fcalls, (usec_now - usec) / 1e3
        assert len(created) == (20_000 if attempt == "create" else 0)
        # many channels per FCALL (one index key), at most `batch` entries per FCALL
        assert calls <= 2 * math.ceil(len(entries) / store.batch)
        assert trips == math.ceil(calls / store.batch) == 1  # one pipeline
        figures.append(f"{attempt}: {trips} round trip(s), {calls} FCALLs, {elapsed * 1e3:.0f} ms "
                       f"(Redis busy {busy:.0f} ms, {busy / calls:.1f} ms per call on average)")
    assert await store.stats("room:7") == PresenceStats(100, 100)
    assert await plain.zcard("{hub:}presence:channels") == channels
    print(f"\nrefresh of 10,000 connections x 2 channels (20,000 entries, {channels} "
          f"channels, batch {store.batch}): " + "; ".join(figures))
    await client.aclose()
    await plain.aclose()


async def test_restart_without_persistence_reloads_the_functions(redis_server):
    client = aclient(redis_server)
    await ensure_functions(client)
    store = RedisPresence(client)
    entries = [("chat:r", ClientInfo("c1", "u1")), ("chat:s", ClientInfo("c1", "u1"))]
    assert await store.refresh(entries, ttl=LONG) == entries
    redis_server.restart()  # functions and entries are gone
    try:
        await client.ping()
    except Exception:  # a pooled connection that Redis closed fails once
        await client.ping()
    assert await loaded_version(client) is None
    loads = store.loads
    # the next periodic refresh loads the library and re-creates every entry
    assert await store.refresh(entries, ttl=LONG) == entries
    assert store.loads == loads + 1
    assert await loaded_version(client) == LIBRARY_VERSION
    assert names(await store.clients("chat:r")) == ["c1"]
    redis_server.restart()
    for call in (lambda: store.add("chat:r", ClientInfo("c2"), ttl=LONG),):
        assert await call() is True  # connection retry, then Function not found -> load
    assert store.loads == loads + 2
    assert await store.remove("chat:r", "c2") is True
    await client.aclose()


@pytest.mark.cluster
async def test_cluster_presence_across_masters(tmp_path):
    from redis.asyncio.cluster import RedisCluster

    from tests.system.test_cluster import Cluster

    nodes = Cluster(tmp_path / "cluster")
    try:
        nodes.create()
        client = RedisCluster(host="127.0.0.1", port=nodes.ports[0], socket_timeout=10)
        assert await ensure_functions(client) == LIBRARY_VERSION
        store = RedisPresence(client, prefix="hub:")
        peer_client = RedisCluster(host="127.0.0.1", port=nodes.ports[0], socket_timeout=10)
        peer = RedisPresence(peer_client, prefix="hub:")
        channels = [f"chat:c{i}" for i in range(12)]
        assert len({nodes.owner(c) for c in channels}) == 3  # every master holds some
        for c in channels:
            index = store.index(c)
            assert index == index_key("hub:", c, cluster=True)
            assert key_slot(index.encode()) == key_slot(("hub:" + c).encode())
        entries = [(c, ClientInfo(f"k{i}-{c}", f"u{i}")) for c in channels for i in range(10)]
        assert len(await store.refresh(entries, ttl=SHORT)) == 120
        await store.add(channels[0], ClientInfo("alive", "u"), ttl=LONG)
        assert await store.stats(channels[0]) == PresenceStats(11, 11)
        registry = await client.smembers(registry_key("hub:"))
        assert {r.decode() for r in registry} == {store.index(c) for c in channels}

        async def due():
            return len(await store.channels_with_expired()) == 12

        await poll(due, what="the entries to expire on every master")
        got = await asyncio.gather(store.sweep(limit=3), peer.sweep(limit=3),
                                   store.sweep(), peer.sweep())
        swept = [(c, i.client) for g in got for c, infos in g.items() for i in infos]
        swept += [(c, i.client) for c, infos in (await store.sweep()).items() for i in infos]
        assert sorted(swept) == sorted((c, i.client) for c, i in entries)
        assert await store.channels_with_expired() == []
        assert names(await store.clients(channels[0])) == ["alive"]
        assert await store.remove(channels[0], "alive") is True
        await client.aclose()
        await peer_client.aclose()
    finally:
        nodes.close()


def test_index_tags_cover_every_slot():
    tags = {index_key("hub:", f"c{i}", cluster=True) for i in range(50)}
    assert all(t.startswith("{hub:presence:") and t.endswith("}:channels") for t in tags)
    for i in itertools.islice(range(10_000), 0, None, 997):
        channel = f"x{i}"
        assert key_slot(index_key("hub:", channel, cluster=True).encode()) == key_slot(
            ("hub:" + channel).encode())


DYING_PROCESS = """
import asyncio, sys
import redis.asyncio as aioredis
from hub.history import ensure_functions
from hub.presence import ClientInfo, RedisPresence

async def main():
    client = aioredis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
    await ensure_functions(client)
    store = RedisPresence(client)
    entries = [(f"room:{i % 7}", ClientInfo(f"dead-{i}", f"u{i % 13}")) for i in range(300)]
    await store.refresh(entries, ttl=float(sys.argv[2]))
    print("ready", flush=True)
    while True:  # a live process would refresh every ttl / 3; this one is about to die
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_sigkilled_process_leaves_are_reported_exactly_once(redis_server):
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-c", DYING_PROCESS, str(redis_server.port), "1"],
                            stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait(10)
    clients = [aclient(redis_server) for _ in range(3)]
    survivors = [RedisPresence(c) for c in clients]
    await survivors[0].add("room:0", ClientInfo("alive", "u0"), ttl=LONG)
    assert await clients[0].zcard("{hub:room:0}:pz") == 43 + 1  # the dead's, live or not
    reported: list[tuple[str, str]] = []

    async def sweeper(store: RedisPresence) -> None:
        deadline = time.monotonic() + 20
        while len(reported) < 300 and time.monotonic() < deadline:
            for channel, infos in (await store.sweep(limit=50)).items():
                reported.extend((channel, i.client) for i in infos)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(sweeper(s) for s in survivors))
    assert len(reported) == len(set(reported)) == 300
    assert {c for _, c in reported} == {f"dead-{i}" for i in range(300)}
    assert await survivors[1].sweep() == {}
    assert names(await survivors[2].clients("room:0")) == ["alive"]
    for c in clients:
        await c.aclose()


async def test_a_sweep_is_two_round_trips(redis_server):
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_server.port, socket_timeout=30,
                                   connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    await ensure_functions(client)
    store = RedisPresence(client)
    entries = [(f"room:{i}", ClientInfo(f"c{i}-{j}")) for i in range(300) for j in range(3)]
    await store.refresh(entries, ttl=SHORT)

    async def all_due():
        return len(await store.channels_with_expired()) == 300

    await poll(all_due, what="300 channels to be due")
    writes = CountingConnection.writes
    swept = await store.sweep()
    assert CountingConnection.writes - writes == 2
    assert sum(len(v) for v in swept.values()) == 900 and len(swept) == 300
    await client.aclose()


async def test_a_sweep_skips_a_channel_whose_call_fails(redis_server):
    client = aclient(redis_server)
    await ensure_functions(client)
    store = RedisPresence(client)
    await store.add("chat:ok", ClientInfo("c1"), ttl=SHORT)
    await client.zadd("{hub:}presence:channels", {"hub:bad{name": 0})  # not a valid key

    async def swept():
        return await store.sweep()

    assert await poll(swept, what="the sweep") == {"chat:ok": [ClientInfo("c1")]}
    assert await store.channels_with_expired() == ["bad{name"]  # still due, nothing changed
    await client.aclose()
