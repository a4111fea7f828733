"""The publisher process: M messages of a given size to one channel through Redis.

Each message is the JSON object ``{"r": run, "s": seq, "t": time.time(), "p": "xx..."}``
padded with ``p`` to ``size`` bytes. ``redis`` publishes it with ``PUBLISH channel``;
``socketio`` emits it with an external write-only ``socketio.AsyncRedisManager`` to the
room ``bench``. ``rate`` is in messages per second, 0 meaning as fast as possible; the run
stops after ``count`` messages or ``time_limit`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import time
from multiprocessing.connection import Connection

__all__ = ["publisher_main"]


def _message(run: int, seq: int, size: int) -> tuple[bytes, dict]:
    t = time.time()
    head = f'{{"r":{run},"s":{seq},"t":{t:.6f},"p":"'
    pad = "x" * max(0, size - len(head) - 2)
    return (head + pad + '"}').encode(), {"r": run, "s": seq, "t": t, "p": pad}


async def _publish(ctrl: Connection, kind: str, redis_url: str, channel: str, run: int, count: int,
                   rate: float, size: int, time_limit: float) -> dict:
    if kind == "socketio":
        import socketio

        manager = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)

        async def send(raw: bytes, data: dict) -> None:
            await manager.emit("msg", data, room="bench", namespace="/")

        async def close() -> None:
            if getattr(manager, "redis", None) is not None:
                await manager.redis.aclose()
    else:
        import redis.asyncio as redis

        client = redis.Redis.from_url(redis_url)

        async def send(raw: bytes, data: dict) -> None:
            await client.publish(channel, raw)

        async def close() -> None:
            await client.aclose()

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
            "cpu": time.process_time() - cpu}


def publisher_main(ctrl: Connection, kind: str, redis_url: str, channel: str, run: int,
                   count: int, rate: float, size: int, time_limit: float) -> None:
    """Entry point of the publisher process.

    It sends ``("warm", None)`` once connected (one message of run -1 published), waits for
    ``("go",)``, then sends ``("done", {"published", "first", "last"})`` or ``("error", str)``.
    """
    import uvloop

    try:
        result = uvloop.run(_publish(ctrl, kind, redis_url, channel, run, count, rate, size,
                                     time_limit))
    except Exception as exc:
        ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    ctrl.send(("done", result))
