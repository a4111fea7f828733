"""The ``channels`` stacks: Django Channels 4 with channels_redis, served by uvicorn.

One ``AsyncWebsocketConsumer`` (:class:`BenchConsumer`) at ``/ws/``: its ``connect()``
joins the group ``bench`` (``channel_layer.group_add``) and then accepts, so a client whose
handshake completed is in the group. A backend publishes with the channel layer's
``group_send("bench", {"type": "bench.message", "text": <json>})`` (``bench.publisher``,
kinds ``channels`` and ``channels-pubsub``); the consumer's ``bench_message`` handler sends
``text`` as one text frame (the published bytes, like the ceiling).

``--layer core`` is ``channels_redis.core.RedisChannelLayer``, the layer of Channels' own
tutorial and docs, with its default settings (capacity 100 messages per channel key, expiry
60 s): a group is a Redis sorted set of channel names, and ``group_send`` reads it and
pushes one copy of the message per server process (listing that process's channel names)
with a Lua script; each process pops its copies with BZPOPMIN and hands one to every named
consumer. ``--layer pubsub`` is ``channels_redis.pubsub.RedisPubSubChannelLayer`` (marked
beta by channels_redis): a group is a Redis pub/sub channel (``asgi__group__bench``) that
each process subscribes to, ``group_send`` is one PUBLISH, and the process puts the message
on the queue of every local consumer of the group.

No middleware: no ``AuthMiddlewareStack`` and no ``AllowedHostsOriginValidator`` (none of
the other stacks authenticates or checks origins). uvicorn runs with its default WebSocket
implementation (``websockets-sansio`` with websockets >= 13), no permessage-deflate, no
access log, uvloop unless ``--no-uvloop``.

Run as ``python -m bench.channels_server --port P --redis-url URL [--layer core|pubsub]``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["GROUP", "LAYERS", "build_application", "configure", "layer_config"]

GROUP = "bench"
#: --layer name -> the channel layer's backend class path.
LAYERS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


def layer_config(layer: str, redis_url: str) -> dict[str, Any]:
    """The ``CHANNEL_LAYERS["default"]`` setting of ``layer`` (a key of :data:`LAYERS`)
    on ``redis_url``; the layer's own defaults otherwise. Raises KeyError for another name."""
    return {"BACKEND": LAYERS[layer], "CONFIG": {"hosts": [redis_url]}}


def configure(layer: str, redis_url: str) -> None:
    """Configure Django (in-process settings, no project) with that channel layer and set it
    up; call once per process before importing consumers or using ``get_channel_layer()``."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only-not-secret",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        INSTALLED_APPS=["channels"],
        CHANNEL_LAYERS={"default": layer_config(layer, redis_url)},
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()


def build_application() -> Any:
    """The ASGI application: ``/ws/`` -> :class:`BenchConsumer` (after :func:`configure`)."""
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.urls import path

    class BenchConsumer(AsyncWebsocketConsumer):
        """Joins group ``bench`` on connect; forwards every ``bench.message`` event's text."""

        async def connect(self) -> None:
            await self.channel_layer.group_add(GROUP, self.channel_name)
            await self.accept()

        async def disconnect(self, code: int) -> None:
            await self.channel_layer.group_discard(GROUP, self.channel_name)

        async def bench_message(self, event: dict) -> None:
            await self.send(text_data=event["text"])

    return ProtocolTypeRouter({"websocket": URLRouter([path("ws/", BenchConsumer.as_asgi())])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--layer", choices=sorted(LAYERS), default="core")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args()
    configure(args.layer, args.redis_url)
    import uvicorn

    uvicorn.run(build_application(), host="127.0.0.1", port=args.port,
                loop="asyncio" if args.no_uvloop else "uvloop", lifespan="off",
                log_level="warning", access_log=False, ws_per_message_deflate=False)


if __name__ == "__main__":
    main()
