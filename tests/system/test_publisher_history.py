"""Publisher / AsyncPublisher and ``hub publish`` on history channels (FCALL hub_publish), on
real redis-servers: positions, the stream, the history pub/sub message, idempotency keys,
plain channels unchanged, shards, the configuration file, a Redis restarted without
persistence, no re-send by redis-py, and a Redis Cluster. Timings are never asserted."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from hub import AsyncPublisher, Publisher
from hub.brokers.base import StreamPosition
from hub.channels import NamespaceOptions
from hub.exceptions import ConfigError
from hub.history import RedisHistory, history_channel
from hub.sharding import shard_index
from tests.helpers import run_cli, wait_until

CHAT = {"chat": NamespaceOptions(history_size=10, history_ttl=60)}


def stream(client: redis.Redis, key: str) -> list[tuple[bytes, bytes]]:
    """``(entry id, payload)`` of the stream ``{<key>}:s`` (docs/history-format.md)."""
    return [(entry_id, fields[b"d"]) for entry_id, fields in client.xrange(f"{{{key}}}:s")]


def next_message(pubsub, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            return message
    return None


def write_config(tmp_path, body: str):
    path = tmp_path / "hub.toml"
    path.write_text(body)
    return path


# -- one Redis --------------------------------------------------------------------------------


def test_history_channel_offsets_stream_and_history_message(redis_server):
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe(history_channel("hub:chat:room"), "hub:chat:room")
    next_message(pubsub, 0.5)  # the subscribe confirmations
    with Publisher(redis_server.url, namespaces=CHAT) as pub:
        # the library was never loaded: the first publish loads it and runs once more
        positions = [pub.publish("chat:room", {"n": n}) for n in (1, 2, 3)]
    assert all(isinstance(p, StreamPosition) for p in positions), positions
    epoch = positions[0].epoch
    assert positions == [StreamPosition(n, epoch) for n in (1, 2, 3)]
    assert stream(client, "hub:chat:room") == [
        (b"1-0", b'{"n":1}'), (b"2-0", b'{"n":2}'), (b"3-0", b'{"n":3}')]
    assert 0 < client.pttl("{hub:chat:room}:s") <= 60_000
    got = [next_message(pubsub) for _ in range(3)]
    assert [m["channel"] for m in got] == [b"{hub:chat:room}:h"] * 3
    assert [m["data"] for m in got] == [f"{n}:{epoch}:{{\"n\":{n}}}".encode() for n in (1, 2, 3)]
    assert next_message(pubsub, 0.3) is None  # nothing on the plain channel
    # the hub's own store reads the same history
    read = asyncio.run(_read(redis_server.url, "chat:room"))
    assert read.position == StreamPosition(3, epoch)
    assert [p.payload for p in read.publications] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']


async def _read(url: str, channel: str):
    client = aioredis.Redis.from_url(url)
    try:
        return await RedisHistory(client).read(channel, since=None, limit=10)
    finally:
        await client.aclose()


def test_plain_channels_unchanged(redis_server):
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe("hub:news")
    next_message(pubsub, 0.5)
    with Publisher(redis_server.url, namespaces=CHAT) as pub:
        assert pub.publish("news", {"t": 1}) == 1  # PUBLISH's reply: one subscriber
        assert pub.publish("other:x", 2) == 0
        assert pub.publish_to_user("alice", 3) == 0  # no [namespaces.user]: plain
        assert type(pub.publish("news", 4)) is int
    assert next_message(pubsub)["data"] == b'{"t":1}'
    assert client.keys("{*") == []  # no history key anywhere
    assert client.execute_command("FUNCTION", "LIST") == []  # and the library not needed


def test_idempotency_key(redis_server):
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe(history_channel("hub:chat:a"))
    next_message(pubsub, 0.5)
    with Publisher(redis_server.url, namespaces=CHAT) as pub:
        first = pub.publish("chat:a", {"v": 1}, idempotency_key="order-17")
        again = pub.publish("chat:a", {"v": "other"}, idempotency_key="order-17")
        other = pub.publish("chat:a", {"v": 2}, idempotency_key="order-18")
        plain = pub.publish("chat:a", {"v": 3})
        assert again == first
        assert (first.offset, other.offset, plain.offset) == (1, 2, 3)
        # not on a plain channel, and never an empty key: refused before anything is sent
        with pytest.raises(ValueError, match="history channel"):
            pub.publish("news", 1, idempotency_key="k")
        with pytest.raises(ValueError, match="non-empty"):
            pub.publish("chat:a", 1, idempotency_key="")
    assert [d for _, d in stream(client, "hub:chat:a")] == [b'{"v":1}', b'{"v":2}', b'{"v":3}']
    got = [next_message(pubsub)["data"] for _ in range(3)]
    assert [g.split(b":", 2)[2] for g in got] == [b'{"v":1}', b'{"v":2}', b'{"v":3}']
    assert next_message(pubsub, 0.3) is None


def test_personal_channels_with_history(redis_server):
    options = {"user": NamespaceOptions(history_size=5, history_ttl=30)}
    with Publisher(redis_server.url, namespaces=options) as pub:
        assert pub.publish_to_user("alice", 1) == StreamPosition(1, pub.publish_to_user(
            "alice", 2).epoch)
        assert pub.publish_to_user("bob", 1, idempotency_key="x").offset == 1
    assert len(stream(redis_server.client(), "hub:user:alice")) == 2


def test_channels_table_gives_every_other_channel_history(redis_server):
    with Publisher(redis_server.url, channels=NamespaceOptions(2, 30),
                   namespaces={"live": NamespaceOptions()}) as pub:
        assert [pub.publish("news", n).offset for n in range(4)] == [1, 2, 3, 4]
        assert pub.publish("live:score", 1) == 0
    assert [i for i, _ in stream(redis_server.client(), "hub:news")] == [b"3-0", b"4-0"]


def test_prefix_with_braces_and_history_is_refused(redis_server):
    with pytest.raises(ValueError, match="without"):
        Publisher(redis_server.url, prefix="{x}:", namespaces=CHAT)
    Publisher(redis_server.url, prefix="{x}:").close()  # no history: as before


def test_restart_without_persistence_loads_the_library_and_starts_a_new_epoch(redis_server):
    with Publisher(redis_server.url, namespaces=CHAT) as pub:
        before = pub.publish("chat:r", 1)
        assert pub.publish("chat:r", 2).offset == 2
        redis_server.restart()  # --save "" --appendonly no: functions and history gone
        assert redis_server.client().execute_command("FUNCTION", "LIST") == []
        after = pub.publish("chat:r", 3)
        assert after.offset == 1 and after.epoch != before.epoch
        assert pub.publish("news", 1) == 0  # the stale pooled connection was replaced
    assert redis_server.client().execute_command("FUNCTION", "LIST")
    assert stream(redis_server.client(), "hub:chat:r") == [(b"1-0", b"3")]


def test_never_downgrades_a_newer_library(redis_server):
    from hub.history.redis import LIBRARY_CODE, LIBRARY_VERSION

    newer = LIBRARY_CODE.replace(f"local VERSION = {LIBRARY_VERSION}\n",
                                 f"local VERSION = {LIBRARY_VERSION + 1}\n")
    client = redis_server.client()
    client.execute_command("FUNCTION", "LOAD", newer)
    from hub.publisher import ensure_functions_sync

    assert ensure_functions_sync(client) == LIBRARY_VERSION + 1
    with Publisher(redis_server.url, namespaces=CHAT) as pub:
        assert pub.publish("chat:v", 1).offset == 1
    assert int(client.fcall("hub_version", 0)) == LIBRARY_VERSION + 1


def test_a_publish_is_never_sent_twice_by_redis_py(redis_server):
    """redis-py 6+ re-sends a command after a timeout by default: a frozen Redis would then
    apply the FCALL up to four times once it wakes up. Retries are off: exactly once."""
    with Publisher(redis_server.url, namespaces=CHAT, socket_timeout=0.5) as pub:
        pub.publish("chat:t", 0)
        assert pub._clients[0].get_connection_kwargs()["retry"].get_retries() == 0
        redis_server.pause()
        try:
            with pytest.raises(RedisTimeoutError):
                pub.publish("chat:t", 1)
            time.sleep(1.5)  # time for any re-send redis-py would have made
        finally:
            redis_server.resume()
    client = redis_server.client()
    wait_until(lambda: len(stream(client, "hub:chat:t")) >= 2, 5, what="the FCALL applied")
    time.sleep(0.3)
    assert [d for _, d in stream(client, "hub:chat:t")] == [b"0", b"1"]


# -- shards -----------------------------------------------------------------------------------


def test_history_lands_on_the_channel_s_shard(redis_factory):
    servers = [redis_factory() for _ in range(3)]
    urls = [s.url for s in servers]
    names = [f"chat:room{i}" for i in range(12)]
    assert len({shard_index(n, 3) for n in names}) == 3
    with Publisher(urls, namespaces=CHAT) as pub:
        for name in names:
            first, second = pub.publish(name, name), pub.publish(name, 2)
            assert (first.offset, second.offset, first.epoch) == (1, 2, second.epoch)
    for name in names:
        home = shard_index(name, 3)
        for i, server in enumerate(servers):
            held = stream(server.client(), "hub:" + name)
            assert held == ([(b"1-0", f'"{name}"'.encode()), (b"2-0", b"2")] if i == home
                            else []), (name, i)


# -- the configuration file ------------------------------------------------------------------


def test_from_config(tmp_path, redis_server):
    path = write_config(tmp_path, f'redis_url = ["{redis_server.url}"]\nredis_prefix = "app:"\n'
                        "\n[namespaces.chat]\nhistory_size = 3\nhistory_ttl = 20\n")
    with Publisher.from_config(path) as pub:
        assert pub.prefix == "app:"
        assert pub.options("chat:x") == NamespaceOptions(3, 20.0)
        assert [pub.publish("chat:x", n).offset for n in range(5)] == [1, 2, 3, 4, 5]
        assert pub.publish("news", 1) == 0
    client = redis_server.client()
    assert [i for i, _ in stream(client, "app:chat:x")] == [b"3-0", b"4-0", b"5-0"]
    assert 0 < client.pttl("{app:chat:x}:s") <= 20_000


def test_from_config_errors(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv("HUB_REDIS_URL", redis_server.url)  # not read by from_config
    path = write_config(tmp_path, "[namespaces.chat]\nhistory_size = 3\nhistory_ttl = 20\n")
    with pytest.raises(ConfigError, match="redis_url"):
        Publisher.from_config(path)
    bad = write_config(tmp_path, "[namespaces.chat]\nhistory_size = 3\n")
    with pytest.raises(ConfigError, match="history_ttl"):
        AsyncPublisher.from_config(bad)


# -- AsyncPublisher ---------------------------------------------------------------------------


async def test_async_publisher(tmp_path, redis_server):
    path = write_config(tmp_path, f'redis_url = ["{redis_server.url}"]\n\n'
                        "[namespaces.chat]\nhistory_size = 10\nhistory_ttl = 60\n")
    client = redis_server.client()
    async with AsyncPublisher.from_config(path) as pub:
        positions = [await pub.publish("chat:a", n) for n in (1, 2, 3)]
        assert pub._clients[0].get_connection_kwargs()["retry"].get_retries() == 0
        epoch = positions[0].epoch
        assert positions == [StreamPosition(n, epoch) for n in (1, 2, 3)]
        assert await pub.publish("chat:a", 9, idempotency_key="k") == StreamPosition(4, epoch)
        assert await pub.publish("chat:a", 10, idempotency_key="k") == StreamPosition(4, epoch)
        with pytest.raises(ValueError, match="history channel"):
            await pub.publish("news", 1, idempotency_key="k")
        assert await pub.publish("news", 1) == 0
        assert await pub.publish_to_user("alice", 1) == 0
        await asyncio.to_thread(redis_server.restart)
        after = await pub.publish("chat:a", 5)
        assert after.offset == 1 and after.epoch != epoch
        assert await pub.publish("news", 1) == 0
    assert stream(client, "hub:chat:a") == [(b"1-0", b"5")]


async def test_async_sharded(redis_factory):
    servers = [redis_factory() for _ in range(3)]
    names = [f"chat:room{i}" for i in range(12)]
    async with AsyncPublisher([s.url for s in servers], namespaces=CHAT) as pub:
        for name in names:
            assert (await pub.publish(name, 1)).offset == 1
    for name in names:
        for i, server in enumerate(servers):
            assert bool(stream(server.client(), "hub:" + name)) == (i == shard_index(name, 3))


# -- hub publish ------------------------------------------------------------------------------


def test_cli_publish_with_config(tmp_path, redis_server):
    path = write_config(tmp_path, f'redis_url = ["{redis_server.url}"]\n\n'
                        "[namespaces.chat]\nhistory_size = 10\nhistory_ttl = 60\n")
    first = run_cli("publish", "chat:c", '{"a":1}', "--config", str(path))
    assert first.returncode == 0, first.stderr
    offset, epoch = first.stdout.split()
    assert first.stdout == f"1 {epoch}\n" and offset == "1"
    keyed = run_cli("publish", "chat:c", "2", "--config", str(path), "--idempotency-key", "k")
    assert keyed.stdout == f"2 {epoch}\n", keyed.stderr
    again = run_cli("publish", "chat:c", "3", "--config", str(path), "--idempotency-key", "k")
    assert again.stdout == f"2 {epoch}\n", again.stderr
    # no variable: an exported HUB_IDEMPOTENCY_KEY does not make repeats vanish
    from_env = run_cli("publish", "chat:c", "4", "--config", str(path),
                       env={"HUB_IDEMPOTENCY_KEY": "k"})
    assert from_env.stdout == f"3 {epoch}\n", from_env.stderr
    plain = run_cli("publish", "news", "1", "--config", str(path))
    assert (plain.returncode, plain.stdout) == (0, "0\n"), plain.stderr
    refused = run_cli("publish", "news", "1", "--config", str(path), "--idempotency-key", "k")
    assert refused.returncode == 2 and "history channel" in refused.stderr, refused.stderr
    assert [d for _, d in stream(redis_server.client(), "hub:chat:c")] == [b'{"a":1}', b"2",
                                                                           b"4"]


# -- Redis Cluster ----------------------------------------------------------------------------


from tests.system.test_cluster import cluster  # noqa: E402, F401 (the fixture)


@pytest.mark.cluster
async def test_cluster_history_on_the_key_s_master(cluster):  # noqa: F811 (the fixture)
    names = [f"chat:room{i}" for i in range(12)]
    owners = {name: cluster.owner(name) for name in names}
    assert len(set(owners.values())) == 3
    with Publisher(cluster.url, cluster=True, namespaces=CHAT) as pub:
        for name in names:
            first, second = pub.publish(name, 1), pub.publish(name, 2)
            assert (first.offset, second.offset, first.epoch) == (1, 2, second.epoch)
        # redis-py's cluster client must not re-send an FCALL after a connection error
        assert pub._history_clients[0].retry.get_retries() == 0
        assert pub.publish("news", 1) == 0  # SPUBLISH as before
    async with AsyncPublisher(cluster.url, cluster=True, namespaces=CHAT) as apub:
        for name in names:
            assert (await apub.publish(name, 3)).offset == 3
        assert apub._history_clients[0].retry.get_retries() == 0
        assert await apub.publish("news", 1) == 0
    for name in names:  # on the master of the key's slot (another one answers MOVED)
        held = stream(cluster.client(owners[name]), "hub:" + name)
        assert [d for _, d in held] == [b"1", b"2", b"3"], name
