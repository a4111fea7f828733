"""hub.history: the same suite against MemoryHistory and RedisHistory on a real redis-server,
then the Redis-only contract (the FCALL form, the history channel, the library version rule,
restarts with and without persistence). Timings are polled, never asserted."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.brokers.base import Publication, StreamPosition
from hub.history import (
    History,
    MemoryHistory,
    RedisHistory,
    ensure_functions,
    format_history_message,
    functions_on_connect,
    history_channel,
    history_keys,
    parse_history_message,
)
from hub.history.redis import LIBRARY_CODE, LIBRARY_VERSION, library_version, loaded_version
from tests.helpers import poll

REDIS_CLI = shutil.which("redis-cli")


def with_version(code: str, version: int) -> str:
    return code.replace(f"local VERSION = {LIBRARY_VERSION}\n", f"local VERSION = {version}\n")


class Harness:
    """One store, a way to lose everything, and the history messages it delivered."""

    def __init__(self, kind: str, store: History, client: aioredis.Redis | None = None):
        self.kind = kind
        self.store = store
        self.client = client
        self.delivered: list[Publication] = []

    async def lose_everything(self) -> None:
        if self.client is None:
            assert isinstance(self.store, MemoryHistory)
            self.store.clear()
        else:
            await self.client.flushall()


def aclient(server) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)


@pytest.fixture(params=["memory", "redis"])
async def h(request):
    if request.param == "memory":
        harness = Harness("memory", MemoryHistory())
        harness.store.on_publish = harness.delivered.append
        yield harness
        return
    server = request.getfixturevalue("redis_server")
    client = aclient(server)
    await ensure_functions(client)
    yield Harness("redis", RedisHistory(client, prefix="hub:"), client)
    await client.aclose()


async def test_offsets_have_no_holes_under_concurrent_publishers(h):
    async def publisher(task: int) -> list[StreamPosition]:
        return [await h.store.publish("chat:a", b"%d-%d" % (task, i), size=1000, ttl=60)
                for i in range(200)]

    results = await asyncio.gather(*(publisher(t) for t in range(4)))
    offsets = sorted(p.offset for r in results for p in r)
    assert offsets == list(range(1, 801))
    assert len({p.epoch for r in results for p in r}) == 1
    for r in results:  # one publisher's order is kept
        assert [p.offset for p in r] == sorted(p.offset for p in r)
    read = await h.store.read("chat:a", since=StreamPosition(0, results[0][0].epoch), limit=1000)
    assert read.complete and not read.more
    assert [p.offset for p in read.publications] == list(range(1, 801))
    assert read.position == StreamPosition(800, results[0][0].epoch)


async def test_position_creates_the_epoch_so_that_it_is_recoverable(h):
    start = await h.store.position("chat:new", ttl=60)
    assert start.offset == 0 and start.epoch and ":" not in start.epoch
    assert await h.store.position("chat:new", ttl=60) == start
    first = await h.store.publish("chat:new", b"one", size=10, ttl=60)
    assert first == StreamPosition(1, start.epoch)
    read = await h.store.read("chat:new", since=start, limit=10)
    assert read.complete and [p.payload for p in read.publications] == [b"one"]
    assert read.publications[0] == Publication("chat:new", b"one", 1, start.epoch)
    # nothing published since: complete with nothing to deliver
    read = await h.store.read("chat:new", since=first, limit=10)
    assert read.complete and read.publications == [] and read.position == first


async def test_trimming_to_size(h):
    for i in range(1, 11):
        top = await h.store.publish("chat:t", b"m%d" % i, size=5, ttl=60)
    epoch = top.epoch
    lost = await h.store.read("chat:t", since=StreamPosition(2, epoch), limit=100)
    assert not lost.complete  # 3, 4, 5 are gone: the caller knows the lost range
    assert [p.offset for p in lost.publications] == [6, 7, 8, 9, 10]
    edge = await h.store.read("chat:t", since=StreamPosition(5, epoch), limit=100)
    assert edge.complete and [p.offset for p in edge.publications] == [6, 7, 8, 9, 10]
    first_two = await h.store.read("chat:t", since=StreamPosition(5, epoch), limit=2)
    assert first_two.complete and first_two.more
    assert [p.offset for p in first_two.publications] == [6, 7]
    checked = await h.store.read("chat:t", since=StreamPosition(5, epoch), limit=0)
    assert checked.complete and checked.publications == []
    recent = await h.store.read("chat:t", since=None, limit=3)
    assert not recent.complete and [p.offset for p in recent.publications] == [8, 9, 10]
    assert recent.position == StreamPosition(10, epoch)


async def test_the_last_writers_size_wins(h):
    for i in range(10):
        await h.store.publish("chat:s", b"%d" % i, size=10, ttl=60)
    await h.store.publish("chat:s", b"x", size=3, ttl=60)
    read = await h.store.read("chat:s", since=None, limit=100)
    assert [p.offset for p in read.publications] == [9, 10, 11]


async def test_other_epoch_or_beyond_the_top_reads_the_most_recent(h):
    for i in range(4):
        top = await h.store.publish("chat:o", b"%d" % i, size=10, ttl=60)
    other = await h.store.read("chat:o", since=StreamPosition(2, "0ther"), limit=2)
    assert not other.complete and [p.offset for p in other.publications] == [3, 4]
    beyond = await h.store.read("chat:o", since=StreamPosition(9, top.epoch), limit=10)
    assert not beyond.complete and [p.offset for p in beyond.publications] == [1, 2, 3, 4]


async def test_stream_expires_and_meta_outlives_it(h):
    for i in range(3):
        top = await h.store.publish("chat:x", b"%d" % i, size=10, ttl=1)

    async def expired():
        return not (await h.store.read("chat:x", since=None, limit=10)).publications

    await poll(expired, what="the stream to expire")
    assert await h.store.position("chat:x", ttl=1) == top  # the epoch and offset are kept
    nxt = await h.store.publish("chat:x", b"after", size=10, ttl=1)
    assert nxt == StreamPosition(4, top.epoch)
    behind = await h.store.read("chat:x", since=StreamPosition(1, top.epoch), limit=10)
    assert not behind.complete and [p.offset for p in behind.publications] == [4]
    at_top = await h.store.read("chat:x", since=top, limit=10)
    assert at_top.complete and [p.offset for p in at_top.publications] == [4]


async def test_epoch_changes_when_everything_is_lost(h):
    old = await h.store.publish("chat:f", b"a", size=10, ttl=60)
    await h.lose_everything()
    if h.kind == "redis":
        assert await loaded_version(h.client) == LIBRARY_VERSION  # FLUSHALL keeps functions
    new = await h.store.position("chat:f", ttl=60)
    assert new.offset == 0 and new.epoch != old.epoch
    assert await h.store.publish("chat:f", b"b", size=10, ttl=60) == StreamPosition(1, new.epoch)
    read = await h.store.read("chat:f", since=old, limit=10)
    assert not read.complete and [p.payload for p in read.publications] == [b"b"]


async def test_idempotency_key(h):
    counted: list[bytes] = []
    if h.kind == "redis":
        pubsub = h.client.pubsub()
        await pubsub.subscribe(history_channel("hub:chat:i"))
        await pubsub.get_message(timeout=2)  # the subscribe confirmation
    first = await h.store.publish("chat:i", b"once", size=10, ttl=60, idempotency_key="k1")
    again = await h.store.publish("chat:i", b"twice", size=10, ttl=60, idempotency_key="k1")
    other = await h.store.publish("chat:i", b"other", size=10, ttl=60, idempotency_key="k2")
    assert again == first and other.offset == first.offset + 1
    read = await h.store.read("chat:i", since=None, limit=10)
    assert [p.payload for p in read.publications] == [b"once", b"other"]
    if h.kind == "redis":
        async def two():
            message = await pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                counted.append(message["data"])
            return len(counted) >= 2

        await poll(two, what="two history messages")
        assert await pubsub.get_message(timeout=0.5) is None  # and no third
        await pubsub.aclose()
    else:
        counted = [format_history_message(p.offset or 0, p.epoch or "", p.payload)
                   for p in h.delivered]
    assert counted == [format_history_message(1, first.epoch, b"once"),
                       format_history_message(2, first.epoch, b"other")]


async def test_bad_arguments(h):
    with pytest.raises(ValueError):
        await h.store.publish("chat:b", b"x", size=0, ttl=60)
    with pytest.raises(ValueError):
        await h.store.read("chat:b", since=None, limit=-1)


# --- the message format, pure ------------------------------------------------------------

def test_keys_and_channel_names():
    assert history_keys("hub:chat:a") == ("{hub:chat:a}:m", "{hub:chat:a}:s", "{hub:chat:a}:i:")
    assert history_channel("hub:chat:a") == "{hub:chat:a}:h"
    with pytest.raises(ValueError):
        history_channel("hub:{x}")


def test_parser():
    pub = parse_history_message(b"{hub:chat:a}:h", b"12:ab09:{\"a\":1}\n:x", prefix="hub:")
    assert pub == Publication("chat:a", b"{\"a\":1}\n:x", 12, "ab09")
    assert parse_history_message("{hub:c}:h", b"1:f:", prefix="hub:").payload == b""
    for channel, data in [
        ("hub:chat:a", b"1:ab:x"),          # the ordinary channel
        ("{hub:chat:a}:x", b"1:ab:x"),      # not the history suffix
        ("{other:chat:a}:h", b"1:ab:x"),    # another prefix
        ("{hub:}:h", b"1:ab:x"),            # no channel
        ("{hub:chat:a}:h", b"0:ab:x"),      # offsets start at 1
        ("{hub:chat:a}:h", b"01:ab:x"),
        ("{hub:chat:a}:h", b"1:AB:x"),      # epochs are lower-case hex
        ("{hub:chat:a}:h", b"1::x"),
        ("{hub:chat:a}:h", b"1:ab"),
        ("{hub:chat:a}:h", b"{\"text\":\"hi\"}"),
    ]:
        with pytest.raises(ValueError):
            parse_history_message(channel, data, prefix="hub:")


# --- Redis only --------------------------------------------------------------------------

async def test_redis_cli_fcall_form(redis_server):
    assert REDIS_CLI
    client = aclient(redis_server)
    await ensure_functions(client)
    cmd = [REDIS_CLI, "-p", str(redis_server.port), "FCALL", "hub_publish", "1",
           "hub:chat:room1", '{"text":"hi"}', "100", "600"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    offset, epoch = out.split()
    assert offset == "1" and epoch
    out2 = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    assert out2.split() == ["2", epoch]
    for bad, error in [(cmd[:-2], "hub: size must be a number"),
                       ([*cmd[:-2], "0", "600"], "hub: size must be at least 1"),
                       ([*cmd[:6], "hub:{x}", *cmd[7:]], "must not contain")]:
        done = subprocess.run(bad, capture_output=True, text=True, timeout=10, check=False)
        assert error in done.stdout + done.stderr
    store = RedisHistory(client)
    read = await store.read("chat:room1", since=StreamPosition(0, epoch), limit=10)
    assert read.complete and [p.payload for p in read.publications] == [b'{"text":"hi"}'] * 2
    assert await client.ttl("{hub:chat:room1}:s") in range(590, 601)
    assert await client.ttl("{hub:chat:room1}:m") > 29 * 24 * 3600
    await client.aclose()


async def test_plain_publish_is_never_a_history_message(redis_server):
    client = aclient(redis_server)
    await ensure_functions(client)
    store = RedisHistory(client)
    pubsub = client.pubsub()
    await pubsub.subscribe("hub:chat:p", history_channel("hub:chat:p"))
    received: list[tuple[bytes, bytes]] = []

    async def got(n):
        message = await pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            received.append((message["channel"], message["data"]))
        return len(received) >= n

    await client.publish("hub:chat:p", b"1:abc:looks like one")
    pos = await store.publish("chat:p", b"real", size=10, ttl=60)
    await poll(lambda: got(2), what="both messages")
    parsed = []
    for channel, data in received:
        try:
            parsed.append(parse_history_message(channel, data, prefix="hub:"))
        except ValueError:
            assert channel == b"hub:chat:p"
    assert parsed == [Publication("chat:p", b"real", pos.offset, pos.epoch)]
    await pubsub.aclose()
    await client.aclose()


async def test_restart_without_persistence_reloads_the_functions(redis_server):
    client = aclient(redis_server)
    await ensure_functions(client)
    store = RedisHistory(client)
    old = await store.publish("chat:r", b"a", size=10, ttl=60)
    redis_server.restart()
    assert await _retry_once(lambda: loaded_version(client)) is None  # functions are gone
    loads = store.loads
    new = await store.publish("chat:r", b"b", size=10, ttl=60)  # Function not found -> load
    assert store.loads == loads + 1
    assert new.offset == 1 and new.epoch != old.epoch
    redis_server.restart()
    await _retry_once(client.ping)
    assert await ensure_functions(client) == LIBRARY_VERSION
    assert await loaded_version(client) == LIBRARY_VERSION
    await client.aclose()


async def _retry_once(call):
    try:
        return await call()
    except Exception:  # a pooled connection that Redis closed fails once
        return await call()


async def test_every_new_connection_loads_the_library(redis_server):
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5,
                            redis_connect_func=functions_on_connect)
    assert await client.ping()
    assert await loaded_version(client) == LIBRARY_VERSION  # the first connection loaded it
    redis_server.restart()
    await _retry_once(client.ping)  # a new connection: the library is back before any FCALL
    plain = aclient(redis_server)
    assert await plain.function_list(library="hub")
    await client.function_load(with_version(LIBRARY_CODE, LIBRARY_VERSION + 1), replace=True)
    await client.connection_pool.disconnect()
    assert await client.ping()  # a newer library is left alone on connect too
    assert await loaded_version(plain) == LIBRARY_VERSION + 1
    await plain.aclose()
    await client.aclose()


async def test_version_rule(redis_server):
    client = aclient(redis_server)
    assert library_version(LIBRARY_CODE) == LIBRARY_VERSION
    await client.function_load(with_version(LIBRARY_CODE, LIBRARY_VERSION - 1), replace=True)
    assert await loaded_version(client) == LIBRARY_VERSION - 1
    assert await ensure_functions(client) == LIBRARY_VERSION  # an older one is replaced
    assert await loaded_version(client) == LIBRARY_VERSION
    newer = with_version(LIBRARY_CODE, LIBRARY_VERSION + 5)
    await client.function_load(newer, replace=True)
    assert await ensure_functions(client) == LIBRARY_VERSION + 5  # a newer one stays
    assert await loaded_version(client) == LIBRARY_VERSION + 5
    store = RedisHistory(client)
    assert (await store.publish("chat:v", b"x", size=5, ttl=60)).offset == 1  # and works
    # a 'hub' library without hub_version counts as version 0
    await client.function_load("#!lua name=hub\nredis.register_function('hub_x', "
                               "function() return 1 end)", replace=True)
    assert await loaded_version(client) == 0
    assert await ensure_functions(client) == LIBRARY_VERSION
    # two processes racing: the lock serialises check and load, the newest wins
    await client.function_delete("hub")
    versions = [LIBRARY_VERSION, LIBRARY_VERSION + 1, LIBRARY_VERSION, LIBRARY_VERSION + 1]
    others = [aclient(redis_server) for _ in versions]
    await asyncio.gather(*(ensure_functions(c, code=with_version(LIBRARY_CODE, v))
                           for c, v in zip(others, versions, strict=True)))
    assert await loaded_version(client) == LIBRARY_VERSION + 1
    for c in others:
        await c.aclose()
    await client.aclose()


async def test_appendonly_survives_sigkill(redis_factory):
    server = redis_factory(extra=("--appendonly", "yes", "--appendfsync", "always"))
    client = aclient(server)
    await ensure_functions(client)
    store = RedisHistory(client)
    for i in range(5):
        top = await store.publish("chat:d", b"%d" % i, size=10, ttl=600)
    server.restart()  # SIGKILL, then start on the same port and directory
    await _retry_once(client.ping)
    assert await loaded_version(client) == LIBRARY_VERSION
    read = await store.read("chat:d", since=StreamPosition(0, top.epoch), limit=10)
    assert read.complete and read.position == top
    assert [p.payload for p in read.publications] == [b"%d" % i for i in range(5)]
    assert (await store.publish("chat:d", b"5", size=10, ttl=600)) == StreamPosition(6, top.epoch)
    await client.aclose()


async def test_publish_latency_figures(redis_server):
    """Prints FCALL hub_publish vs plain PUBLISH latency (bounded loop); asserts nothing
    about timings."""
    client = aclient(redis_server)
    await ensure_functions(client)
    store = RedisHistory(client)
    n = 2000
    payload = b'{"text":"' + b"x" * 100 + b'"}'
    for _ in range(200):  # warm up
        await client.publish("hub:chat:w", payload)
    t0 = time.perf_counter()
    for _ in range(n):
        await client.publish("hub:chat:w", payload)
    plain = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        await store.publish("chat:w", payload, size=100, ttl=600)
    fcall = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        await store.read("chat:w", since=None, limit=10)
    read = (time.perf_counter() - t0) / n
    print(f"\nlatency per call over {n} sequential calls: PUBLISH {plain * 1e6:.0f} us, "
          f"FCALL hub_publish (size 100) {fcall * 1e6:.0f} us, "
          f"FCALL hub_read (limit 10) {read * 1e6:.0f} us")
    await client.aclose()


# --- Redis Cluster -----------------------------------------------------------------------

@pytest.mark.cluster
async def test_cluster_publish_read_and_spublish(tmp_path):
    from redis.asyncio.cluster import RedisCluster

    from tests.system.test_cluster import Cluster

    nodes = Cluster(tmp_path / "cluster")
    try:
        nodes.create()
        client = RedisCluster(host="127.0.0.1", port=nodes.ports[0], socket_timeout=5)
        assert await ensure_functions(client) == LIBRARY_VERSION  # on every master
        for port in nodes.masters():
            assert nodes.client(port).fcall("hub_version", 0) == LIBRARY_VERSION
        store = RedisHistory(client)
        names = [f"chat:c{i}" for i in range(12)]
        owners = {nodes.owner(name) for name in names}
        assert len(owners) == 3  # the channels span every master
        # a sharded-pub/sub subscriber on the owner of chat:c0's history channel
        owner = nodes.client(nodes.owner(names[0]))
        pubsub = owner.pubsub()
        pubsub.ssubscribe(history_channel("hub:" + names[0]))
        for name in names:
            for i in range(3):
                top = await store.publish(name, b"%d" % i, size=2, ttl=60)
            read = await store.read(name, since=StreamPosition(1, top.epoch), limit=10)
            assert read.complete and [p.offset for p in read.publications] == [2, 3]
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            message = pubsub.get_sharded_message(timeout=0.2)
            if message and message["type"] == "smessage":
                got.append(parse_history_message(message["channel"], message["data"],
                                                 prefix="hub:"))
        assert [(p.channel, p.offset, p.payload) for p in got] == [
            (names[0], 1, b"0"), (names[0], 2, b"1"), (names[0], 3, b"2")]
        pubsub.close()
        # the documented backend command through redis-cli -c
        assert REDIS_CLI
        out = subprocess.run([REDIS_CLI, "-c", "-p", str(nodes.ports[0]), "FCALL",
                              "hub_publish", "1", "hub:chat:c5", "x", "100", "600"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        assert out.split()[0] == "4"
        await client.aclose()
    finally:
        nodes.close()


@pytest.mark.cluster
async def test_cluster_master_restart_reloads_the_functions(tmp_path):
    from redis.asyncio.cluster import RedisCluster

    from tests.helpers import wait_until
    from tests.system.test_cluster import Cluster

    nodes = Cluster(tmp_path / "cluster")
    try:
        nodes.create()
        client = RedisCluster(host="127.0.0.1", port=nodes.ports[0], socket_timeout=5)
        await ensure_functions(client)
        store = RedisHistory(client)
        channel = next(f"chat:m{i}" for i in range(100)
                       if nodes.owner(f"chat:m{i}") != nodes.ports[0])
        old = await store.publish(channel, b"a", size=10, ttl=60)
        port = nodes.owner(channel)
        nodes.restart(port)  # no persistence: its keys and functions are gone
        wait_until(nodes._settled, 30, what="the cluster to settle")
        assert await asyncio.to_thread(lambda: nodes.client(port).function_list()) == []

        async def published():
            try:
                return await store.publish(channel, b"b", size=10, ttl=60)
            except (ConnectionError, OSError, aioredis.ConnectionError):
                return None  # the client's connection to the restarted master

        new = await poll(published, what="a publish after the restart")
        assert new.offset == 1 and new.epoch != old.epoch
        assert nodes.client(port).fcall("hub_version", 0) == LIBRARY_VERSION
        await client.aclose()
    finally:
        nodes.close()


# --- the two stores agree ----------------------------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(["a", "b"]), st.integers(1, 4),
              st.sampled_from([None, "k1", "k2"])),
    st.tuples(st.just("read"), st.sampled_from(["a", "b"]), st.integers(-1, 12),
              st.integers(0, 5)),
    st.tuples(st.just("position"), st.sampled_from(["a", "b"]), st.just(0), st.just(0)),
), max_size=30)


@given(ops=_ops)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_memory_and_redis_agree(redis_server, ops):
    """Random operation sequences give the same offsets, payloads and flags on both stores
    (epochs compared by identity per store)."""

    async def run(store: History, reset) -> list:
        await reset()
        out, epochs = [], {}

        def ep(e):
            return epochs.setdefault(e, len(epochs))

        for i, (op, name, x, y) in enumerate(ops):
            channel = "chat:" + name
            if op == "publish":
                p = await store.publish(channel, b"%d" % i, size=x, ttl=600, idempotency_key=y)
                out.append(("p", p.offset, ep(p.epoch)))
            elif op == "position":
                p = await store.position(channel, ttl=600)
                out.append(("pos", p.offset, ep(p.epoch)))
            else:
                top = await store.position(channel, ttl=600)
                since = None if x < 0 else StreamPosition(x, top.epoch)
                r = await store.read(channel, since=since, limit=y, ttl=600)
                out.append(("r", r.position.offset, ep(r.position.epoch), r.complete,
                            [(p.offset, p.payload, ep(p.epoch)) for p in r.publications]))
        return out

    async def both():
        memory = MemoryHistory()

        async def clear_memory():
            memory.clear()

        client = aclient(redis_server)
        await ensure_functions(client)

        async def flush():
            await client.flushall()

        try:
            assert await run(memory, clear_memory) == await run(RedisHistory(client), flush)
        finally:
            await client.aclose()

    asyncio.run(both())


async def test_new_epoch_retires_only_the_expected_epoch(h):
    await h.store.publish("chat:n", b"1", size=10, ttl=60)
    old = (await h.store.publish("chat:n", b"2", size=10, ttl=60)).epoch
    # another epoch named: nothing changes
    assert await h.store.new_epoch("chat:n", "f" * 20, ttl=60) == StreamPosition(2, old)
    fresh = await h.store.new_epoch("chat:n", old, ttl=60)
    assert fresh.offset == 0 and fresh.epoch != old
    # a second hub retiring the same old epoch does not wipe the new one
    assert await h.store.new_epoch("chat:n", old, ttl=60) == fresh
    assert await h.store.publish("chat:n", b"3", size=10, ttl=60) == StreamPosition(1, fresh.epoch)
    read = await h.store.read("chat:n", since=StreamPosition(2, old), limit=10)
    assert not read.complete and [p.offset for p in read.publications] == [1]
