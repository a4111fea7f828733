"""hub.client: the Python client SDK of hub (docs/clients.md).

::

    from hub.client import connect

    async with connect("ws://127.0.0.1:8765/ws", get_token=fetch_token) as client:
        sub = await client.subscribe("chat:room1", last=20)
        await client.publish("chat:room1", {"text": "hi"})
        async for message in sub:
            print(message.channel, message.data, message.offset, message.from_)

Modules: ``client`` (the connection loop, requests), ``subscription`` (a subscription's
inbox, position and iterator), ``frames`` (the wire format, sans-I/O), ``policy`` (close
codes and backoff, pure), ``errors`` (the exceptions). It speaks docs/protocol.md only and
shares no code with the server (it reuses the value type ``StreamPosition``).
"""

from .client import Client, connect
from .errors import (
    AuthenticationFailed,
    BadChannel,
    BadRequest,
    ClientClosed,
    ClientError,
    ConnectionLost,
    ConnectionStopped,
    Forbidden,
    Gap,
    HubError,
    LimitExceeded,
    NoHistory,
    NoPresence,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unsubscribed,
)
from .frames import (
    ClientInfo,
    HistoryReply,
    Message,
    PresenceEvent,
    PresenceStatsReply,
    Sender,
    StreamPosition,
)
from .subscription import Subscription

__all__ = [
    "AuthenticationFailed",
    "BadChannel",
    "BadRequest",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientInfo",
    "ConnectionLost",
    "ConnectionStopped",
    "Forbidden",
    "Gap",
    "HistoryReply",
    "HubError",
    "LimitExceeded",
    "Message",
    "NoHistory",
    "NoPresence",
    "PresenceEvent",
    "PresenceStatsReply",
    "RateLimited",
    "Sender",
    "StreamPosition",
    "Subscription",
    "Unauthorized",
    "Unavailable",
    "Unsubscribed",
    "connect",
]
