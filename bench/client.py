"""The load generator: one worker process holds a share of the N WebSocket connections.

Every stack is spoken to with the same client, so the client cost is the same; only the
few bytes of handshake and framing differ (:data:`PROTOCOLS`). Two clients exist:

* ``lean`` (default): :class:`bench.lean.LeanConnection`, handshake and outgoing frames by
  the websockets library, incoming frames read in ``data_received`` with no task wake-up per
  message (about 4x less client CPU per delivery, see that module);
* ``websockets``: ``websockets.asyncio.client.connect`` (compression off, keepalive off, no
  proxy) with one reader task per connection; kept to cross-check the lean client.

A worker is driven by its parent over a ``multiprocessing`` pipe:

* on start it connects and subscribes its connections, then sends
  ``("ready", {"connected", "failed", "error", "seconds"})``;
* ``("collect", run, published, deadline, quiet)`` waits until every open connection
  received the ``published`` messages of run ``run``, or nothing arrived for ``quiet``
  seconds, or ``time.time()`` passed ``deadline``; it answers ``("result", {...})`` with the
  latencies in milliseconds (float32 bytes), the publish times (float64 bytes) and counts;
* ``("settle", limit, quiet)`` waits until no frame arrived for ``quiet`` seconds (at most
  ``limit`` seconds) and answers ``("settled", late deliveries)``;
* ``("close",)`` closes every connection and ends the worker.

Every delivery carries the publisher's ``time.time()`` in its payload; the latency is the
receive ``time.time()`` minus that (one machine, one clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from .lean import LeanConnection, lean_connect
from .procs import raise_nofile

__all__ = ["PROTOCOLS", "decode_ceiling", "decode_hub", "decode_socketio", "fields", "worker_main"]

Decoded = tuple[int, float] | None  # (run, publish time.time()) of a delivery, None otherwise


@dataclass(frozen=True)
class Protocol:
    """How a client of one stack joins the bench channel and recognises a delivery."""

    path: str
    join: Callable[[Any, int], Any]  # coroutine: subscribe on an open connection
    decode: Callable[[bytes], Decoded]
    answer: Callable[[bytes], bytes | None]  # a reply the client owes the server, or None


def _payload(data: dict) -> Decoded:
    return data["r"], data["t"]


def fields(raw: bytes) -> Decoded:
    """``(r, t)`` of the bench payload inside ``raw`` without a JSON parse.

    The publisher writes ``{"r":R,"s":S,"t":T,"p":"xx.."}`` (bench.publisher); the servers
    forward it verbatim (ceiling, hub) or re-encoded with the same key order and maybe
    spaces (socketio), which ``int()``/``float()`` skip. Falls back to orjson when the
    markers are not where expected."""
    i = raw.find(b'"r":')
    j = raw.find(b'"t":', i)
    if i < 0 or j < 0:
        return None
    try:
        return int(raw[i + 4:raw.index(b",", i)]), float(raw[j + 4:raw.index(b",", j)])
    except ValueError:
        return None


# ceiling: the server broadcasts the published bytes as they are.
async def _join_ceiling(ws: Any, index: int) -> None:
    return None


def decode_ceiling(raw: bytes) -> Decoded:
    return fields(raw) or _payload(orjson.loads(raw))


# hub: {"op":"subscribe"} then {"type":"ack"}; deliveries are {"type":"message",...}.
async def _join_hub(ws: Any, index: int) -> None:
    await ws.send(b'{"op":"subscribe","channel":"bench","id":1}', text=True)
    while True:
        frame = orjson.loads(await ws.recv(decode=False))
        if frame.get("type") == "ack" and frame.get("id") == 1:
            return
        if frame.get("type") == "error":
            raise RuntimeError(f"hub refused the subscription: {frame}")


def decode_hub(raw: bytes) -> Decoded:
    if raw.startswith(b'{"type":"message",'):  # the hub's documented frame (protocol.md)
        return fields(raw) or _payload(orjson.loads(raw)["data"])
    return None


# socketio: Engine.IO v4 open packet, Socket.IO v5 namespace connect, pings from the server.
async def _join_socketio(ws: Any, index: int) -> None:
    opened = await ws.recv(decode=False)
    if not opened.startswith(b"0{"):
        raise RuntimeError(f"expected an Engine.IO open packet, got {opened[:80]!r}")
    await ws.send(b"40", text=True)
    while True:
        frame = await ws.recv(decode=False)
        if frame == b"2":
            await ws.send(b"3", text=True)
        elif frame.startswith(b"40"):
            return
        elif frame.startswith(b"44"):
            raise RuntimeError(f"Socket.IO connect refused: {frame[:200]!r}")


# node-socketio speaks the same Engine.IO v4 / Socket.IO v5 as python-socketio: the same join
# (its "connection" handler joins room bench right after the CONNECT packet it answers "40"
# with, in the same tick) and the same event frames 42["msg",{...}].


def decode_socketio(raw: bytes) -> Decoded:
    if not raw.startswith(b'42["msg",'):
        return None
    return fields(raw) or _payload(orjson.loads(raw[2:])[1])


def _answer_socketio(raw: bytes) -> bytes | None:
    return b"3" if raw == b"2" else None


def _no_answer(raw: bytes) -> None:
    return None


PROTOCOLS: dict[str, Protocol] = {
    "ceiling": Protocol("/", _join_ceiling, decode_ceiling, _no_answer),
    "hub": Protocol("/ws?user=bench{index}", _join_hub, decode_hub, _no_answer),
    "socketio": Protocol("/socket.io/?EIO=4&transport=websocket", _join_socketio,
                         decode_socketio, _answer_socketio),
    # channels: the consumer at /ws/ joins group bench in connect() before it accepts, so
    # a completed handshake is the join; deliveries are the published text (as the ceiling).
    "channels": Protocol("/ws/", _join_ceiling, decode_ceiling, _no_answer),
}


class _Recorder:
    """Latencies and counts per run, filled by every connection of this worker.

    A delivery of a run that was already collected (or of the warm-up run -1) is *late*:
    it is counted, not recorded.
    """

    def __init__(self) -> None:
        self.latencies: dict[int, array] = {}
        self.sent: dict[int, array] = {}
        self.last: dict[int, float] = {}
        self.done: set[int] = {-1}
        self.late = 0
        self.other = 0  # frames that were not deliveries (acks, pings, ...)
        self.total = 0  # every frame received

    def add(self, run: int, sent: float, now: float) -> None:
        lat = self.latencies.get(run)
        if lat is None:
            if run in self.done:
                self.late += 1
                return
            lat = self.latencies[run] = array("f")
            self.sent[run] = array("d")
        lat.append((now - sent) * 1000.0)
        self.sent[run].append(sent)
        self.last[run] = now

    def frame(self, raw: bytes, proto: Protocol) -> bytes | None:
        """Count one frame; record it if it is a delivery, else return the reply the client
        owes the server for it (an Engine.IO pong), or None."""
        self.total += 1
        got = proto.decode(raw)
        if got is not None:
            self.add(got[0], got[1], time.time())
            return None
        self.other += 1
        return proto.answer(raw)

    def count(self, run: int) -> int:
        lat = self.latencies.get(run)
        return 0 if lat is None else len(lat)

    def pop(self, run: int) -> dict:
        self.done.add(run)
        lat = self.latencies.pop(run, array("f"))
        return {"received": len(lat), "latencies_ms": lat.tobytes(),
                "sent": self.sent.pop(run, array("d")).tobytes(),
                "last": self.last.pop(run, None)}


async def _reader(ws: ClientConnection, proto: Protocol, rec: _Recorder) -> None:
    with contextlib.suppress(Exception):
        while True:
            reply = rec.frame(await ws.recv(decode=False), proto)
            if reply is not None:
                await ws.send(reply, text=True)


def _attach_lean(ws: LeanConnection, proto: Protocol, rec: _Recorder) -> None:
    """Record deliveries straight from ``data_received`` (no reader task)."""

    def on_message(raw: bytes) -> None:
        reply = rec.frame(raw, proto)
        if reply is not None:
            ws.send_now(reply)

    while not ws.queue.empty():  # messages that arrived between the join and now
        raw = ws.queue.get_nowait()
        if raw is not None:
            on_message(raw)
    ws.on_message = on_message


async def _open(url: str, proto: Protocol, index: int, timeout: float,
                client: str = "lean") -> Any:
    if client == "lean":
        ws: Any = await lean_connect(url, timeout)
    else:
        ws = await connect(url, compression=None, ping_interval=None, proxy=None,
                           open_timeout=timeout, close_timeout=2, max_size=2**20)
    try:
        await asyncio.wait_for(proto.join(ws, index), timeout)
    except BaseException:
        await ws.close()
        raise
    return ws


async def _run(ctrl: Connection, stack: str, urls: list[str], indexes: list[int],
               concurrency: int, timeout: float, client: str) -> None:
    loop = asyncio.get_running_loop()
    proto = PROTOCOLS[stack]
    rec = _Recorder()
    conns: list[Any] = []
    readers: list[asyncio.Task] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(i: int) -> None:
        url = urls[i % len(urls)] + proto.path.format(index=i)
        async with gate:
            try:
                ws = await _open(url, proto, i, timeout, client)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
        conns.append(ws)
        if client == "lean":
            _attach_lean(ws, proto, rec)
        else:
            readers.append(asyncio.create_task(_reader(ws, proto, rec)))

    await asyncio.gather(*(one(i) for i in indexes))
    ctrl.send(("ready", {"connected": len(conns), "failed": len(errors),
                         "error": errors[0] if errors else None,
                         "seconds": time.monotonic() - started}))
    try:
        while True:
            cmd = await loop.run_in_executor(None, ctrl.recv)
            if cmd[0] == "collect":
                _, run, published, deadline, quiet = cmd
                await _collect(rec, conns, run, published, deadline, quiet)
                result = rec.pop(run)
                result["open"] = sum(1 for ws in conns if _is_open(ws))
                ctrl.send(("result", result))
            elif cmd[0] == "settle":
                late = rec.late
                await _settle(rec, cmd[1], cmd[2])
                ctrl.send(("settled", rec.late - late))
            elif cmd[0] == "close":
                break
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        await asyncio.gather(*readers, return_exceptions=True)
        ctrl.send(("closed", None))


def _is_open(ws: Any) -> bool:
    state = ws.state
    return (state if isinstance(state, str) else state.name) == "OPEN"


async def _collect(rec: _Recorder, conns: list[Any], run: int, published: int,
                   deadline: float, quiet: float) -> None:
    last_count, last_change = -1, time.monotonic()
    while time.time() < deadline:
        count = rec.count(run)
        expected = published * sum(1 for ws in conns if _is_open(ws))
        if count >= expected:
            return
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        await asyncio.sleep(0.05)


async def _settle(rec: _Recorder, limit: float, quiet: float) -> None:
    """Return once no frame arrived for ``quiet`` s, or after ``limit`` s."""
    end = time.monotonic() + limit
    total, changed = rec.total, time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.05)
        if rec.total != total:
            total, changed = rec.total, time.monotonic()
        elif time.monotonic() - changed >= quiet:
            return


def worker_main(ctrl: Connection, stack: str, urls: list[str], indexes: list[int],
                concurrency: int = 32, timeout: float = 30.0, use_uvloop: bool = True,
                client: str = "lean") -> None:
    """Entry point of a load-generator process (see the module docstring).

    ``client`` is ``"lean"`` (:mod:`bench.lean`) or ``"websockets"`` (the library's asyncio
    client); ``timeout`` bounds each connect + join in seconds."""
    raise_nofile()
    coro = _run(ctrl, stack, urls, indexes, concurrency, timeout, client)
    try:
        if use_uvloop:
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
