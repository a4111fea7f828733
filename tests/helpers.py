"""Small client helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["command", "no_message", "open_ws", "recv_json", "subscribe"]


def open_ws(url: str, **kwargs) -> connect:
    """``connect(url)`` with loopback-friendly defaults (no proxy, no compression)."""
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(url, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def command(ws: ClientConnection, timeout: float = 10.0, **cmd) -> dict:
    """Send one command and return the first frame that answers it (same id)."""
    await ws.send(json.dumps(cmd))
    while True:
        reply = await recv_json(ws, timeout)
        if reply.get("type") in ("ack", "pong", "error") and reply.get("id") == cmd.get("id"):
            return reply


async def subscribe(ws: ClientConnection, channel: str, id: int = 1) -> None:
    reply = await command(ws, op="subscribe", channel=channel, id=id)
    assert reply == {"type": "ack", "id": id}, reply


async def no_message(ws: ClientConnection, wait: float = 0.3) -> None:
    """Assert that nothing arrives within ``wait`` seconds."""
    try:
        frame = await asyncio.wait_for(ws.recv(), wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame!r}")
