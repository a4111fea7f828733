"""The ``socketio`` stack: python-socketio AsyncServer on aiohttp with AsyncRedisManager.

Every client joins the room ``bench`` in its connect handler (before the server confirms
the namespace connection). Backends publish with an external
``socketio.AsyncRedisManager(url, write_only=True).emit("msg", data, room="bench")``.
Run as ``python -m bench.socketio_server --port P --redis-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import socketio
from aiohttp import web

ROOM = "bench"
CHANNEL = "socketio"  # the Redis channel of AsyncRedisManager (its default)


def build_app(redis_url: str) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url, channel=CHANNEL)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager,
                               transports=["websocket"], logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict, auth: object = None) -> None:
        await sio.enter_room(sid, ROOM)

    app = web.Application()
    sio.attach(app)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.no_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(args.redis_url), host="127.0.0.1", port=args.port,
                print=None, access_log=None, handle_signals=True)
