"""The hub's batched keepalive (hub/keepalive.py) on a real ``hub serve``: a peer that stops
answering pings is closed with 1011 within about two ping intervals and counted in
``hub_connections_closed_total{code="1011"}``; peers that answer (a raw client answering by
hand, websockets' client with its own keepalive off) stay open and keep being pinged;
``--ping-interval 0`` sends no ping at all.

Bounds on when the close comes are the keepalive's documented semantics (docs/reliability.md),
with a wide margin for a busy machine; nothing here measures performance.
"""

from __future__ import annotations

import asyncio
import time

from tests.helpers import open_ws
from tests.system.test_hardening_session import RawClient, closes_metric, masked, ping_ok

INTERVAL = 1.0


async def answer_pings(raw: RawClient, stop: asyncio.Event) -> int:
    """Read the server's frames and answer every ping with its pong until ``stop``; return the
    pings answered."""
    answered = 0
    while not stop.is_set():
        try:
            opcode, payload = await raw.frame(0.2)
        except TimeoutError:
            continue
        if opcode == 0x9:
            raw.writer.write(masked(0xA, payload))
            answered += 1
        elif opcode == 0x8:
            raise AssertionError("the live peer was closed")
    return answered


async def test_silent_peer_closed_with_1011_live_peers_kept(hub_factory):
    hub = hub_factory("--ping-interval", str(INTERVAL))
    stop = asyncio.Event()
    live = await RawClient.open(hub.port, "/ws?user=live")
    mute = await RawClient.open(hub.port, "/ws?user=mute")
    opened = time.monotonic()
    async with open_ws(hub.ws_url + "?user=lib", ping_interval=None) as lib:
        answering = asyncio.create_task(answer_pings(live, stop))
        try:
            code, seen = await mute.until_close(6 * INTERVAL + 10)
            after = time.monotonic() - opened
            print(f"silent peer: frames {seen} (opcode: count), close {code} after {after:.2f} s")
            assert code == 1011 and seen.get(0x9, 0) >= 1
            # pinged about one interval after it opened, failed one interval later; margin
            # for a loaded machine
            assert INTERVAL * 0.9 <= after <= 2 * INTERVAL + 3.0
            await asyncio.sleep(3 * INTERVAL)  # three more rounds: the live peers stay
            await ping_ok(lib)
        finally:
            stop.set()
            answered = await answering
            live.close()
            mute.close()
        assert answered >= 3, answered
    assert closes_metric(hub, 1011) == 1


async def test_ping_interval_zero_sends_no_pings(hub_factory):
    hub = hub_factory("--ping-interval", "0")
    mute = await RawClient.open(hub.port, "/ws?user=mute")
    try:
        try:
            opcode, _ = await mute.frame(3.0)
        except TimeoutError:
            opcode = None
        assert opcode is None  # nothing came: no ping, no close
    finally:
        mute.close()
    assert closes_metric(hub, 1011) == 0
