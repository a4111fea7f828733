"""Broker pieces without a network: stop_task, the memory broker, the factory."""

from __future__ import annotations

import asyncio

from hub.broker import create_broker, stop_task
from hub.broker_memory import MemoryBroker
from hub.broker_redis import RedisBroker, ShardedBroker, redact_url
from hub.config import Config


async def test_stop_task_ends_a_task_that_swallows_a_cancellation():
    swallowed = 0

    async def stubborn():
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:  # what asyncio.wait_for can do on Python 3.11
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await stop_task(task, timeout=2.0)
    assert task.cancelled() and swallowed == 1


async def test_stop_task_gives_up_after_its_timeout():
    async def immortal():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    assert not await stop_task(task, timeout=0.3)
    task.get_coro().close()  # end it by force for the test's own teardown
    assert await stop_task(None)


async def test_memory_broker_delivers_in_order_after_the_publish_returns():
    got = []
    broker = MemoryBroker(lambda ch, p: got.append((ch, p)), lambda chs: None)
    await broker.start()
    assert broker.connected
    assert await broker.publish("news", b"0") == 0  # nobody subscribed
    await broker.subscribe("news", 1.0)
    assert broker.is_live("news")
    assert [await broker.publish("news", str(i).encode()) for i in range(3)] == [1, 1, 1]
    assert got == []  # deferred to the next loop iteration, like a real broker
    await asyncio.sleep(0)
    assert got == [("news", b"0"), ("news", b"1"), ("news", b"2")]
    await broker.unsubscribe("news")
    await broker.publish("news", b"x")
    await asyncio.sleep(0)
    assert len(got) == 3


def test_factory_picks_the_broker_from_the_config():
    def noop(*args):
        return None

    assert isinstance(create_broker(Config(), noop, noop), MemoryBroker)
    one = Config(redis_url=("redis://127.0.0.1:1/0",))
    assert isinstance(create_broker(one, noop, noop), RedisBroker)
    three = Config(redis_url=tuple(f"redis://127.0.0.1:{p}/0" for p in (1, 2, 3)))
    sharded = create_broker(three, noop, noop)
    assert isinstance(sharded, ShardedBroker) and len(sharded.shards) == 3


def test_redact_url_hides_passwords():
    assert redact_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
