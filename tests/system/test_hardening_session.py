"""Hardening against hostile clients (issue 11), the session's side: every frame counted
against ``--max-frame-rate``, paced command floods closed with 4029, ``rate_limited`` errors
that echo the command's id, ``--max-connections-per-user``, and keepalive closes counted in
``hub_connections_closed_total``.

Real ``hub serve`` processes, real clients (websockets' client, or a raw socket speaking
RFC 6455 by hand where the client library would not misbehave), loopback only. Every attack
loop is bounded in frames and seconds; timings are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from unittest.mock import ANY

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import make_token, metric, open_ws, recv_json, wait_until

SECRET = "s" * 32


# -- helpers -------------------------------------------------------------------------------

def closes_metric(hub, code: int) -> float:
    """``hub_connections_closed_total{code="<code>"}`` (0 when absent)."""
    return metric(hub, "hub_connections_closed_total", {"code": str(code)}) or 0.0


def token(user: str) -> str:
    return make_token(SECRET, user, ttl=600)


async def ping_ok(ws, tag: object = "alive") -> None:
    await ws.send(json.dumps({"op": "ping", "id": tag}))
    assert await recv_json(ws, 10) == {"type": "pong", "id": tag}


def masked(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One client frame (RFC 6455 section 5.2): masked, payload under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + body


class RawClient:
    """A WebSocket client on a bare TCP stream: it sends the frames it is told to and
    answers nothing (no pong, no close)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str = "/ws") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next server frame: ``(opcode, payload)``; raises IncompleteReadError at EOF."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            size = b1 & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(size)
        return await asyncio.wait_for(read(), timeout)

    async def until_close(self, timeout: float = 15.0) -> tuple[int | None, dict[int, int]]:
        """Read frames until the server's close frame (or EOF); return its code (None at EOF
        without one) and the count of frames seen by opcode."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                opcode, payload = await self.frame(max(0.1, deadline - time.monotonic()))
            except asyncio.IncompleteReadError:
                return None, seen
            seen[opcode] = seen.get(opcode, 0) + 1
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if payload else None, seen

    def close(self) -> None:
        self.writer.transport.abort()


async def bystander_keeps_receiving(hub, publisher, subscriber, stop: asyncio.Event) -> int:
    """Publish on ``news`` through ``publisher`` until ``stop``; return how many of those the
    ``subscriber`` received (it must receive every one, in order)."""
    n = 0
    while not stop.is_set() and n < 2000:
        await publisher.send(json.dumps({"op": "publish", "channel": "news", "data": n, "id": n}))
        assert await recv_json(publisher, 10) == {"type": "ack", "id": n}
        assert await recv_json(subscriber, 10) == {"type": "message", "channel": "news",
                                                   "data": n, "from": ANY}
        n += 1
        await asyncio.sleep(0.01)
    return n


# -- 1. every frame counts: pings and continuation frames ------------------------------------

MAX_ATTACK_FRAMES = 20_000
MAX_ATTACK_SECONDS = 10.0


async def test_ping_flood_is_closed_4029_and_a_subscriber_keeps_receiving(hub_factory):
    hub = hub_factory("--client-publish", "news")
    async with open_ws(hub.ws_url) as sub, open_ws(hub.ws_url) as pub, \
            open_ws(hub.ws_url, ping_interval=None) as flood:
        await sub.send(json.dumps({"op": "subscribe", "channel": "news", "id": 0}))
        assert await recv_json(sub) == {"type": "ack", "id": 0}
        stop = asyncio.Event()
        bystander = asyncio.create_task(bystander_keeps_receiving(hub, pub, sub, stop))
        waiters = []
        sent = 0
        start = time.monotonic()
        try:
            while sent < MAX_ATTACK_FRAMES and time.monotonic() - start < MAX_ATTACK_SECONDS:
                # 125-byte pings as fast as the socket takes them, never waiting for a pong
                # (the client library reads the pongs in the background).
                waiters.append(await flood.ping(sent.to_bytes(4, "big") + b"p" * 121))
                sent += 1
                if sent % 100 == 0:
                    await asyncio.sleep(0)
        except ConnectionClosed:
            pass
        elapsed = time.monotonic() - start
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(flood.recv(), 10)
        pongs = sum(1 for w in waiters if w.done() and not w.cancelled()
                    and w.exception() is None)
        code = flood.close_code
        stop.set()
        delivered = await asyncio.wait_for(bystander, 30)
        print(f"ping flood: {sent} pings sent in {elapsed:.2f} s, {pongs} answered, then close "
              f"{code}; bystander received {delivered}/{delivered} messages")
        assert code == 4029, (sent, pongs, code)
        # Closed after the burst (2000 frames) plus what the budget refilled meanwhile.
        assert pongs < MAX_ATTACK_FRAMES
        assert delivered > 0
        await ping_ok(sub)
    assert closes_metric(hub, 4029) == 1  # counted once, not again when the TCP link went
    assert "more than 1000 frames per second" in hub.log_text()


async def test_message_of_thousands_of_empty_continuation_frames_is_closed_4029(hub_factory):
    hub = hub_factory()
    async with open_ws(hub.ws_url) as bystander:
        raw = await RawClient.open(hub.port)
        try:
            # Messages of 4000 empty continuation frames each, a ping command at the end:
            # 5 messages, 20,005 frames in all, written at once.
            message = (masked(0x1, b"", fin=False) + masked(0x0, b"", fin=False) * 4000
                       + masked(0x0, b'{"op":"ping","id":1}'))
            frames = 0
            for _ in range(5):
                raw.writer.write(message)
                frames += 4002
            await raw.writer.drain()
            code, seen = await raw.until_close()
        finally:
            raw.close()
        print(f"continuation flood: {frames} frames written; server sent {seen} "
              f"(opcode: count) and close {code}")
        assert code == 4029, (code, seen)
        assert seen.get(0x1, 0) == 0  # not one of these messages was answered
        await ping_ok(bystander)
    assert "Traceback" not in hub.log_text()


async def test_honest_client_fragmenting_and_pinging_is_not_closed(hub_factory):
    """Within the default budget (1000 frames/s, burst 2000): 50 messages in 20 fragments
    each and 500 pings, all at once, are served."""
    hub = hub_factory()
    async with open_ws(hub.ws_url) as ws:
        for i in range(50):
            text = json.dumps({"op": "ping", "id": i})
            await ws.send([text[j:j + 2] for j in range(0, len(text), 2)])  # fragments
        assert [await recv_json(ws) for _ in range(50)] == [
            {"type": "pong", "id": i} for i in range(50)]
        waiters = [await ws.ping(str(i)) for i in range(500)]
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        await ping_ok(ws)


# -- 2. a paced command flood is closed, not answered forever --------------------------------

async def test_paced_command_flood_is_closed_4029_after_a_bounded_number_of_replies(
        hub_factory):
    hub = hub_factory()  # --rate-limit 100: burst 200, windows of 800 commands
    async with open_ws(hub.ws_url) as flood, open_ws(hub.ws_url) as calm:
        replies = {"pong": 0, "rate_limited": 0}

        async def read() -> int | None:
            try:
                while True:
                    reply = json.loads(await flood.recv())
                    replies["pong" if reply["type"] == "pong" else reply["code"]] += 1
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd is not None else None

        reader = asyncio.create_task(read())
        sent = 0
        start = time.monotonic()
        frame = json.dumps({"op": "ping", "id": 1})
        try:
            # 150 commands per 10 ms (150x the limit): a token comes back between bursts,
            # which reset the old rule's count of consecutive refusals.
            while (not reader.done() and sent < 150_000
                   and time.monotonic() - start < MAX_ATTACK_SECONDS):
                for _ in range(150):
                    await flood.send(frame)
                sent += 150
                await asyncio.sleep(0.01)
        except ConnectionClosed:
            pass
        code = await asyncio.wait_for(reader, 15)
        print(f"paced flood: {sent} commands sent in {time.monotonic() - start:.2f} s; "
              f"replies {replies}; close {code}")
        assert code == 4029, (sent, replies)
        # Every refused command was answered until the close, and the close came within a
        # window or two of commands (800 each), not after the 10 s of the attack.
        assert replies["rate_limited"] > 0
        assert sum(replies.values()) < 5000, replies
        await ping_ok(calm)
    assert closes_metric(hub, 4029) == 1


async def test_clients_at_and_above_the_rate_limit_are_not_closed(hub_factory):
    hub = hub_factory("--rate-limit", "50")  # burst 100, windows of 400 commands

    async def client(per_second: float, count: int) -> dict[str, int]:
        got = {"pong": 0, "rate_limited": 0}
        async with open_ws(hub.ws_url) as ws:
            async def read() -> None:
                for _ in range(count):
                    reply = await recv_json(ws, 15)
                    got["pong" if reply["type"] == "pong" else reply["code"]] += 1

            reader = asyncio.create_task(read())
            for i in range(count):  # the burst first, then paced
                await ws.send(json.dumps({"op": "ping", "id": i}))
                if i >= 100:
                    await asyncio.sleep(1 / per_second)
            await asyncio.wait_for(reader, 30)
            await asyncio.sleep(1.1)  # the bucket refills; the connection is still open
            await ping_ok(ws)
        return got

    at_limit, above = await asyncio.gather(client(50, 250), client(75, 400))
    print(f"at the limit: {at_limit}; at 1.5x the limit: {above}")
    assert at_limit["pong"] + at_limit["rate_limited"] == 250
    assert above["pong"] + above["rate_limited"] == 400
    assert closes_metric(hub, 4029) == 0


# -- 3. rate_limited echoes the command's id -------------------------------------------------

async def test_rate_limited_errors_carry_the_command_id(hub_factory):
    hub = hub_factory("--rate-limit", "5", "--client-publish", "news")  # burst 10, window 40
    async with open_ws(hub.ws_url) as ws:
        frames = [json.dumps({"op": "ping", "id": i}) for i in range(10)] + [
            json.dumps({"op": "ping", "id": 7}),
            json.dumps({"op": "ping", "id": "s-8"}),
            json.dumps({"op": "subscribe", "channel": "news", "id": 9}),
            json.dumps({"op": "publish", "channel": "news", "data": {"x": 1}, "id": "p10"}),
            json.dumps({"op": "subscribe", "channel": "bad name", "id": 11}),
            json.dumps({"op": "ping"}),
            json.dumps({"op": "ping", "id": [1]}),
            "not json",
        ]
        for frame in frames:
            await ws.send(frame)
        replies = [await recv_json(ws) for _ in frames]
        assert replies[:10] == [{"type": "pong", "id": i} for i in range(10)]
        limited = replies[10:]
        print("refused:", limited)
        assert all(r["type"] == "error" and r["code"] == "rate_limited" for r in limited), limited
        assert [r["id"] for r in limited] == [7, "s-8", 9, "p10", 11, None, None, None]
        await asyncio.sleep(1.0)
        await ping_ok(ws)


# -- 4. connections per user -----------------------------------------------------------------

async def refused_status(url: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(url):
            pass
    return info.value.response.status_code


async def test_max_connections_per_user_at_the_handshake_answers_429(hub_factory):
    hub = hub_factory("--max-connections-per-user", "3")
    alice = hub.ws_url + "?user=alice"
    conns = [await open_ws(alice).__aenter__() for _ in range(3)]
    try:
        assert await refused_status(alice) == 429
        async with open_ws(hub.ws_url + "?user=bob") as bob, open_ws(hub.ws_url) as anon:
            await ping_ok(bob)
            await ping_ok(anon)
        for ws in conns:
            await ping_ok(ws)
        await conns.pop().close()

        async def accepted() -> bool:
            try:
                async with open_ws(alice) as ws:
                    conns.append(ws)
                    await ping_ok(ws)
                    conns.pop()
                return True
            except InvalidStatus:
                return False

        for _ in range(100):  # the slot is free once the hub saw the close
            if await accepted():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no new connection of alice after one closed")
    finally:
        for ws in conns:
            await ws.close()
    log = hub.log_text()
    assert "handshake refused (429)" in log and "already has 3 connections" in log


async def test_max_connections_per_user_in_band_connect_closes_4009(hub_factory):
    hub = hub_factory("--jwt-secret", SECRET, "--max-connections-per-user", "2")
    async with open_ws(hub.ws_url, additional_headers={"Authorization":
                                                        f"Bearer {token('alice')}"}) as first, \
            open_ws(hub.ws_url) as second:
        await second.send(json.dumps({"op": "connect", "token": token("alice"), "id": 1}))
        assert (await recv_json(second))["user"] == "alice"
        # A third alice: in band, closed 4009; at the handshake, 429.
        async with open_ws(hub.ws_url) as third:
            await third.send(json.dumps({"op": "connect", "token": token("alice"), "id": 1}))
            with pytest.raises(ConnectionClosed) as info:
                await recv_json(third, 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4009
        assert await refused_status(hub.ws_url + "?token=" + token("alice")) == 429
        async with open_ws(hub.ws_url) as bob:
            await bob.send(json.dumps({"op": "connect", "token": token("bob"), "id": 1}))
            assert (await recv_json(bob))["user"] == "bob"
        await ping_ok(first)
        await ping_ok(second)
    assert closes_metric(hub, 4009) == 1


# -- 5. keepalive closes are counted ---------------------------------------------------------

async def test_keepalive_timeout_close_is_counted_once(hub_factory):
    hub = hub_factory("--ping-interval", "1")
    raw = await RawClient.open(hub.port, "/ws?user=mute")
    try:  # it reads the server's frames but never answers a ping
        code, seen = await raw.until_close(15)
    finally:
        raw.close()
    print(f"silent client: server sent {seen} (opcode: count), close {code}")
    assert code == 1011 and seen.get(0x9, 0) >= 1
    wait_until(lambda: closes_metric(hub, 1011) == 1, 10, what="1011 counted")
    # A client that closes itself is not a close of the hub's; nothing counted twice.
    async with open_ws(hub.ws_url) as ws:
        await ping_ok(ws)
    await asyncio.sleep(0.5)
    assert closes_metric(hub, 1011) == 1
    assert closes_metric(hub, 1000) == 0


# -- memory: the new per-connection state lives in slots -------------------------------------

def test_frame_budget_and_flood_window_state_is_in_slots():
    """No instance-dict keys for the new state (docs/benchmarks.md: a resized dict costs every
    idle connection): 8 bytes a slot."""
    from websockets.asyncio.server import ServerConnection

    from hub.connection import HubConnection

    new = {"frames", "frames_at", "commands", "refused"}
    assert new <= set(HubConnection.__slots__)
    assert "strikes" not in HubConnection.__slots__
    extra = HubConnection.__basicsize__ - ServerConnection.__basicsize__
    print(f"HubConnection slots: {len(HubConnection.__slots__)}, {extra} bytes over "
          "ServerConnection's instance")
    assert extra == 8 * len(HubConnection.__slots__)
