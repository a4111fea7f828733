"""The publisher process: M messages of a given size to one channel through Redis.

Each message is the JSON object ``{"r": run, "s": seq, "t": time.time(), "p": "xx..."}``
padded with ``p`` to ``size`` bytes. The publish kinds (:data:`KINDS`, ``Stack.publish``):

* ``redis``: ``PUBLISH channel <json>`` (ceiling, node-ws, the hub stacks);
* ``socketio``: an external write-only ``socketio.AsyncRedisManager`` emits event ``msg`` to
  the room ``bench`` (python-socketio);
* ``socketio-emitter``: what ``@socket.io/redis-emitter`` sends for
  ``emitter.to("bench").emit("msg", data)``: ``PUBLISH socket.io#/#bench# <msgpack>`` of
  ``["emitter", {"type": 2, "data": ["msg", data], "nsp": "/"}, {"rooms": ["bench"],
  "flags": {}, "except": []}]`` (:func:`socketio_emitter_message`; the smoke test pins it
  byte for byte against the Node emitter), read by ``@socket.io/redis-adapter``;
* ``channels`` / ``channels-pubsub``: Django Channels' ``group_send("bench", {"type":
  "bench.message", "text": <json>})`` on ``RedisChannelLayer`` / ``RedisPubSubChannelLayer``
  (configured as ``bench.channels_server`` configures the server).

``rate`` is in messages per second, 0 meaning as fast as possible; the run stops after
``count`` messages or ``time_limit`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from multiprocessing.connection import Connection

__all__ = ["KINDS", "SOCKETIO_EMITTER_CHANNEL", "publisher_main", "socketio_emitter_message"]

KINDS = ("redis", "socketio", "socketio-emitter", "channels", "channels-pubsub")
#: @socket.io/redis-emitter's channel for one room: key "socket.io", namespace "/", room.
SOCKETIO_EMITTER_CHANNEL = "socket.io#/#bench#"


def _message(run: int, seq: int, size: int) -> tuple[bytes, dict]:
    t = time.time()
    head = f'{{"r":{run},"s":{seq},"t":{t:.6f},"p":"'
    pad = "x" * max(0, size - len(head) - 2)
    return (head + pad + '"}').encode(), {"r": run, "s": seq, "t": t, "p": pad}


def socketio_emitter_message(data: dict, room: str = "bench", event: str = "msg") -> bytes:
    """The Redis message ``@socket.io/redis-emitter`` 5 publishes for
    ``emitter.to(room).emit(event, data)`` (msgpack, the emitter's default notepack.io
    parser, same key order); publish it to ``socket.io#/#<room>#``."""
    import msgpack

    packet = {"type": 2, "data": [event, data], "nsp": "/"}  # 2 = EVENT (socket.io-parser)
    return msgpack.packb(["emitter", packet, {"rooms": [room], "flags": {}, "except": []}])


class _OverCapacity(logging.Handler):
    """Counts channels_redis' "N of M channels over capacity in group G" records (each is a
    group_send whose message was not stored for N server processes)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "over capacity" in str(record.msg):
            self.count += 1


async def _publish(ctrl: Connection, kind: str, redis_url: str, channel: str, run: int, count: int,
                   rate: float, size: int, time_limit: float) -> dict:
    dropped: _OverCapacity | None = None
    if kind == "socketio":
        import socketio

        manager = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)

        async def send(raw: bytes, data: dict) -> None:
            await manager.emit("msg", data, room="bench", namespace="/")

        async def close() -> None:
            if getattr(manager, "redis", None) is not None:
                await manager.redis.aclose()
    elif kind in ("channels", "channels-pubsub"):
        from channels.layers import get_channel_layer

        from .channels_server import GROUP, configure

        configure("core" if kind == "channels" else "pubsub", redis_url)
        layer = get_channel_layer()
        # RedisChannelLayer drops a group message for a process whose channel key already
        # holds ``capacity`` (100) messages, and says so only in an INFO log record: count them.
        over_capacity = _OverCapacity()
        logging.getLogger("channels_redis.core").addHandler(over_capacity)
        logging.getLogger("channels_redis.core").setLevel(logging.INFO)
        dropped = over_capacity

        async def send(raw: bytes, data: dict) -> None:
            await layer.group_send(GROUP, {"type": "bench.message", "text": raw.decode()})

        async def close() -> None:
            if kind == "channels":
                await layer.close_pools()
            else:
                await layer.flush()
    elif kind in ("redis", "socketio-emitter"):
        import redis.asyncio as redis

        client = redis.Redis.from_url(redis_url)
        emitter = kind == "socketio-emitter"

        async def send(raw: bytes, data: dict) -> None:
            if emitter:
                await client.publish(SOCKETIO_EMITTER_CHANNEL, socketio_emitter_message(data))
            else:
                await client.publish(channel, raw)

        async def close() -> None:
            await client.aclose()
    else:
        raise ValueError(f"unknown publish kind {kind!r}; one of {', '.join(KINDS)}")

    await send(*_message(-1, -1, size))  # warm the connection up; run -1 is ignored
    ctrl.send(("warm", None))
    await asyncio.get_running_loop().run_in_executor(None, ctrl.recv)  # ("go",)
    published = 0
    cpu = time.process_time()
    start = time.monotonic()
    first = time.time()
    try:
        for seq in range(count):
            now = time.monotonic()
            if now - start > time_limit:
                break
            if rate > 0:
                due = start + seq / rate
                if due > now:
                    await asyncio.sleep(due - now)
            await send(*_message(run, seq, size))
            published += 1
    finally:
        last = time.time()
        await close()
    return {"published": published, "first": first, "last": last,
            "cpu": time.process_time() - cpu,
            "layer_dropped": None if dropped is None else dropped.count}


def publisher_main(ctrl: Connection, kind: str, redis_url: str, channel: str, run: int,
                   count: int, rate: float, size: int, time_limit: float) -> None:
    """Entry point of the publisher process.

    It sends ``("warm", None)`` once connected (one message of run -1 published), waits for
    ``("go",)``, then sends ``("done", {"published", "first", "last", "cpu",
    "layer_dropped"})`` or ``("error", str)``: ``first``/``last`` are ``time.time()`` of the
    first and last publish, ``cpu`` the publisher's CPU seconds, ``layer_dropped`` (kind
    ``channels`` only, else None) how many ``group_send`` calls RedisChannelLayer reported
    over capacity (messages it did not store for at least one server process).
    """
    import uvloop

    try:
        result = uvloop.run(_publish(ctrl, kind, redis_url, channel, run, count, rate, size,
                                     time_limit))
    except Exception as exc:
        ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    ctrl.send(("done", result))
