"""The ``ceiling`` stack: the least a Redis-fed WebSocket broadcaster can do.

One redis-py asyncio PubSub subscriber on one channel; every message goes to every open
connection with ``websockets.asyncio.server.broadcast`` (no protocol, no subscribe, no JSON).
Run as ``python -m bench.ceiling_server --port P --redis-url URL --channel hub:bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import redis.asyncio as redis
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(port: int, redis_url: str, channel: str) -> None:
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)

        async def fan_out() -> None:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is not None and msg["type"] == "message":
                    broadcast(conns, msg["data"], text=True)

        task = asyncio.create_task(fan_out())
        try:
            await server.wait_closed()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pubsub.aclose()
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", default="hub:bench")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args()
    coro = main(args.port, args.redis_url, args.channel)
    if args.no_uvloop:
        asyncio.run(coro)
    else:
        import uvloop

        uvloop.run(coro)
