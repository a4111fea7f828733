"""Shared parts of ``python -m bench.history`` and ``python -m bench.storm``.

* :func:`write_config` / :func:`start_hub` / :func:`wait_ready` / :func:`terminate`: one
  ``hub serve`` (optionally ``--workers N``) with a configuration file that declares the
  history namespace ``hist`` and the plain namespace ``plain``.
* :class:`RedisStats`: ``INFO cpu`` (``used_cpu_sys + used_cpu_user``) and ``INFO
  commandstats`` of our own redis-server, before/after (``CONFIG RESETSTAT`` at the start).
* :func:`publisher_main`: the publisher process; it publishes through
  :class:`hub.AsyncPublisher` (``PUBLISH`` on a plain channel, ``FCALL hub_publish`` on a
  history channel: exactly what a backend using the library does).
* :func:`loadgen_main`: a load-generator process holding a share of the clients
  (:class:`bench.lean.LeanConnection`); every client subscribes to one history channel
  (and optionally one plain channel), tracks its offset and epoch, checks that offsets
  arrive contiguous (no duplicate, no hole, no reordering) and, when its connection closes,
  reconnects with the SDKs' backoff (docs/clients.md: from ``min_delay`` doubling, full
  jitter, capped at ``max_delay``) and resubscribes with ``since`` its last offset+epoch.

Every process started here is stopped by pid (see :mod:`bench.procs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil
import redis
from websockets.exceptions import InvalidHandshake
from websockets.frames import Close

from .client import fields
from .lean import LeanConnection
from .procs import raise_nofile, start, tree
from .stacks import REPO

__all__ = [
    "RedisStats",
    "busy_seconds",
    "loadgen_main",
    "publisher_main",
    "recv",
    "source_addresses",
    "start_hub",
    "tcp_counters",
    "terminate",
    "wait_ready",
    "write_config",
]

HIST, PLAIN = "hist", "plain"  # the namespaces of the configuration file


def recv(conn: Any, timeout: float, what: str) -> Any:
    """The next message of a worker process's pipe ``conn`` (a tuple, its tag first); raises
    TimeoutError after ``timeout`` seconds and RuntimeError for an ``("error", text)``
    answer, naming ``what``."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from {what} within {timeout:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"{what} failed: {msg[1]}")
    return msg


def write_config(path: str, redis_url: str, history_size: int, history_ttl: float = 600.0,
                 ) -> str:
    """Write the hub configuration file: ``redis_url``, namespace ``hist`` with a history of
    ``history_size`` messages kept ``history_ttl`` s, namespace ``plain`` without. Returns
    ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'redis_url = ["{redis_url}"]\nredis_prefix = "hub:"\n\n'
                f"[namespaces.{HIST}]\nhistory_size = {history_size}\n"
                f"history_ttl = {history_ttl}\n\n"
                f"[namespaces.{PLAIN}]\nhistory_size = 0\n")
    return path


def start_hub(port: int, config: str, log_path: str, *, workers: int = 1,
              max_connections: int = 10000, extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``python -m hub serve`` on 127.0.0.1:``port`` with ``config`` (warnings only,
    ``--max-connections`` per process, no per-user limit) in its own session."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env = {k: v for k, v in env.items() if not k.startswith("HUB_")}
    cmd = [sys.executable, "-m", "hub", "serve", "--port", str(port), "--config", config,
           "--log-level", "warning", "--max-connections", str(max_connections),
           "--max-connections-per-user", "0", *(["--workers", str(workers)] if workers > 1
                                                else []), *extra]
    return start(cmd, log_path=log_path, cwd=REPO, env=env)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until ``/readyz`` answers 200. RuntimeError when ``proc`` exits first,
    TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited with {proc.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError), \
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"hub on {port}: /readyz not 200 after {timeout} s")


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """SIGTERM ``proc`` (the hub's graceful stop), wait until it and its children exited
    (SIGKILL after ``timeout`` s); return the seconds it took."""
    t0 = time.monotonic()
    procs = tree(proc)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(Exception):
        proc.wait(timeout=1)
    return time.monotonic() - t0


def busy_seconds() -> float:
    """CPU seconds the whole machine was busy (all cores, neither idle nor iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(
        t, "guest_nice", 0.0)


def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters of /proc/net/netstat that tell why connects wait:
    ``ListenOverflows`` (accept queue full), ``ListenDrops``, ``TCPReqQFullDrop``,
    ``SyncookiesSent``, ``TCPTimeouts``, ``TCPSynRetrans``; {} when unreadable."""
    wanted = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
              "SyncookiesSent", "TCPTimeouts", "TCPSynRetrans")
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        for k, v in zip(head.split()[1:], values.split()[1:], strict=False):
            if k in wanted:
                out[k] = int(v)
    return out


def source_addresses(clients: int, per_address: int = 8000) -> list[str]:
    """Loopback source addresses for ``clients`` connections: 127.0.0.1 up to
    ``per_address`` clients, then 127.0.0.2, ... (each address has its own ephemeral
    ports)."""
    return [f"127.0.0.{1 + k}" for k in range(max(1, math.ceil(clients / per_address)))]


class RedisStats:
    """CPU and command statistics of one redis-server (ours: ``CONFIG RESETSTAT`` is used).

    :meth:`mark` resets ``INFO commandstats`` and notes the CPU; :meth:`read` returns
    ``(cpu seconds since the mark, {command: {"calls", "usec", "usec_per_call"}})``.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self._cpu0 = 0.0

    def cpu(self) -> float:
        """``used_cpu_sys + used_cpu_user`` of ``INFO cpu``, in seconds."""
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def mark(self) -> None:
        self.client.config_resetstat()
        self._cpu0 = self.cpu()

    def read(self) -> tuple[float, dict[str, dict[str, float]]]:
        cpu = self.cpu() - self._cpu0
        stats = {}
        for key, value in self.client.info("commandstats").items():
            name = key.removeprefix("cmdstat_")
            if name in ("info", "config|resetstat", "config"):
                continue  # the bench's own calls
            stats[name] = {"calls": int(value["calls"]), "usec": int(value["usec"]),
                           "usec_per_call": float(value["usec_per_call"])}
        return cpu, stats

    def close(self) -> None:
        self.client.close()


# -- the publisher process ----------------------------------------------------------------


def message(run: int, seq: int, size: int) -> dict[str, Any]:
    """The bench payload ``{"r":run,"s":seq,"t":time.time(),"p":"xx.."}`` of about ``size``
    bytes once encoded (the same shape as bench.publisher's, so bench.client.fields reads
    it)."""
    t = time.time()
    head = len(f'{{"r":{run},"s":{seq},"t":{t:.6f},"p":""}}')
    return {"r": run, "s": seq, "t": round(t, 6), "p": "x" * max(0, size - head)}


async def _publisher(ctrl: Connection, config: str) -> None:
    from hub.publisher import AsyncPublisher

    loop = asyncio.get_running_loop()
    async with AsyncPublisher.from_config(config) as pub:
        ctrl.send(("ready", None))
        while True:
            cmd = await loop.run_in_executor(None, ctrl.recv)
            if cmd[0] == "close":
                return
            if cmd[0] != "run":  # a late ("stop",)
                continue
            _, run, channels, count, rate, size, time_limit = cmd
            # count None: publish until ("stop",) arrives on the pipe (checked between
            # publishes, so keep rate > 0 then)
            positions: dict[str, list] = {}
            published, errors, first_error = 0, 0, None
            cpu, start_t, first = time.process_time(), time.monotonic(), time.time()
            seq = 0
            while count is None or seq < count:
                now = time.monotonic()
                if now - start_t > time_limit:
                    break
                if count is None and ctrl.poll():
                    ctrl.recv()  # ("stop",)
                    break
                if rate > 0:
                    due = start_t + seq / rate
                    if due > now:
                        await asyncio.sleep(due - now)
                channel = channels[seq % len(channels)]
                try:
                    pos = await pub.publish(channel, message(run, seq, size))
                except Exception as exc:  # counted: a storm bench keeps publishing
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                else:
                    published += 1
                    if not isinstance(pos, int):
                        positions[channel] = [pos.offset, pos.epoch]
                    positions.setdefault("#" + channel, [0])[0] += 1
                seq += 1
            ctrl.send(("done", {"published": published, "first": first, "last": time.time(),
                                "cpu": time.process_time() - cpu, "errors": errors,
                                "first_error": first_error,
                                "positions": {c: p for c, p in positions.items()
                                              if not c.startswith("#")},
                                "counts": {c[1:]: p[0] for c, p in positions.items()
                                           if c.startswith("#")}}))


def publisher_main(ctrl: Connection, config: str) -> None:
    """Entry point of the publisher process (uvloop).

    Sends ``("ready", None)`` once connected; then for every ``("run", run, channels,
    count, rate, size, time_limit)`` publishes ``count`` messages (None: until a
    ``("stop",)``) round-robin over ``channels`` at ``rate`` msg/s (0: as fast as it can,
    one publish in flight) and answers ``("done", {"published", "first", "last", "cpu",
    "errors", "first_error", "positions": {channel: [offset, epoch]} (history channels),
    "counts": {channel: published}})``; ``("close",)`` ends it.
    """
    import uvloop

    try:
        uvloop.run(_publisher(ctrl, config))
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


# -- the load generator ---------------------------------------------------------------------


class _Conn(LeanConnection):
    """A lean connection that remembers the close code the server sent, and ignores a
    handshake response that arrives after its connect timed out (LeanConnection would set
    the result of its cancelled ``opened`` future and log a fatal transport error)."""

    close_code: int | None = None
    status_line: bytes = b""  # the first line of the handshake response

    def data_received(self, data: bytes) -> None:
        if self.state == "CONNECTING":
            if self.opened.done():
                return  # given up (timeout): the transport is being aborted
            if not self.status_line:
                self.status_line = data.partition(b"\r\n")[0][:60]
        super().data_received(data)

    def _frame(self, b0: int, payload: bytes) -> None:
        if b0 & 0x0F == 8 and self.close_code is None:
            self.close_code = Close.parse(payload).code if payload else 1005
        super()._frame(b0, payload)


async def _open(uri: str, source: str | None, timeout: float) -> _Conn:
    """TCP connect (from ``source`` when given) and the opening handshake."""
    parts = urlsplit(uri)
    loop = asyncio.get_running_loop()

    async def go() -> _Conn:
        _, conn = await loop.create_connection(
            lambda: _Conn(uri), parts.hostname, parts.port or 80,
            local_addr=(source, 0) if source else None)
        try:
            await conn.opened
        except BaseException as exc:
            if conn.transport is not None:
                conn.transport.abort()
            if isinstance(exc, InvalidHandshake) and conn.status_line.startswith(b"HTTP/"):
                # a refusal (503, 429...): name its status, not the parser's complaint
                raise _Refused(conn.status_line.decode("latin-1")) from None
            raise
        return conn

    return await asyncio.wait_for(go(), timeout)


class _Refused(Exception):
    """The server answered the handshake with another status than 101."""


class _Client:
    """One simulated client: its channels, position and counters (see the module doc)."""

    __slots__ = ("acked", "attempts", "caught_at", "closed_at", "codes", "dups", "epoch",
                 "errors", "failed", "hist", "holes", "index", "last", "missing", "opened_at",
                 "phase", "plain", "received", "recovered", "source", "storm", "sub_id", "target",
                 "unavailable", "ws")

    def __init__(self, index: int, hist: str | None, plain: str | None,
                 source: str | None) -> None:
        self.index, self.hist, self.plain, self.source = index, hist, plain, source
        self.ws: _Conn | None = None
        self.last: int | None = None  # last offset received on ``hist``
        self.epoch: str | None = None
        self.sub_id = 0
        self.acked = False  # the hist subscription of the current connection is acked
        self.target: int | None = None  # ack offset of a recovery not yet caught up to
        self.received = self.dups = self.holes = self.missing = 0
        self.recovered = self.failed = self.unavailable = self.errors = 0
        self.attempts = 0  # connect attempts since the storm mark
        self.codes: dict[str, int] = {}  # close codes / connect errors since the mark
        self.storm = False
        self.phase = "new"  # sleeping, connecting, open, closing, stopped
        self.closed_at = self.opened_at = self.caught_at = 0.0

    def subscribe(self) -> None:
        if self.hist is None or self.ws is None:
            return
        self.sub_id += 1
        cmd: dict[str, Any] = {"op": "subscribe", "channel": self.hist, "id": self.sub_id}
        if self.last is not None and self.epoch is not None:
            cmd["since"] = {"offset": self.last, "epoch": self.epoch}
        self.ws.send_now(orjson.dumps(cmd))

    def seen(self, offset: int, now: float) -> None:
        last = self.last
        self.received += 1
        if last is None or offset == last + 1:
            self.last = offset
        elif offset <= last:
            self.dups += 1
        else:
            self.holes += 1
            self.missing += offset - last - 1
            self.last = offset
        if self.target is not None and self.last is not None and self.last >= self.target:
            self.target = None
            self.caught_at = now

    def ack(self, frame: dict, now: float) -> None:
        if frame.get("id") != self.sub_id:
            return  # the plain channel's ack (id 0)
        self.acked = True
        offset, epoch = frame.get("offset"), frame.get("epoch")
        if "recovered" not in frame:  # the first subscription: live from the ack's offset
            self.last, self.epoch = offset, epoch
            if self.storm:
                self.caught_at = now
            return
        if frame["recovered"]:
            self.recovered += 1
            if self.last is not None and offset is not None and self.last < offset:
                self.target = offset
            else:
                self.caught_at = now
        else:
            self.failed += 1
            self.last, self.epoch = None, epoch  # take what follows as the new base
            self.caught_at = now


class _Gen:
    """The clients of one load-generator process and what it reports."""

    def __init__(self, url: str, clients: list[_Client], concurrency: int, timeout: float,
                 min_delay: float, max_delay: float) -> None:
        self.url, self.clients, self.timeout = url, clients, timeout
        self.min_delay, self.max_delay = min_delay, max_delay
        self.gate: asyncio.Semaphore | None = asyncio.Semaphore(concurrency)
        self.stopping = False
        self.storm_at = 0.0
        self.counts: dict[int, int] = {}  # run -> deliveries (plain and hist)
        self.lat: dict[int, array] = {}
        self.last_rx: dict[int, float] = {}
        self.other = 0
        self.first_error: str | None = None
        self.samples: dict[str, str] = {}  # first message of each connect error type
        self.tasks: list[asyncio.Task] = []
        self.attempt_at = array("d")  # time of every connect attempt since the storm mark

    def handler(self, c: _Client) -> Any:
        counts, lat, last_rx = self.counts, self.lat, self.last_rx

        def on_message(raw: bytes) -> None:
            now = time.time()
            if raw.startswith(b'{"type":"message"'):
                got = fields(raw)
                if got is not None:
                    run = got[0]
                    counts[run] = counts.get(run, 0) + 1
                    a = lat.get(run)
                    if a is None:
                        a = lat[run] = array("f")
                    a.append((now - got[1]) * 1000.0)
                    last_rx[run] = now
                i = raw.rfind(b',"offset":')
                if i > 0:
                    try:
                        offset = int(raw[i + 10:-1])
                    except ValueError:
                        offset = orjson.loads(raw)["offset"]
                    c.seen(offset, now)
                return
            frame = orjson.loads(raw)
            kind = frame.get("type")
            if kind == "ack":
                c.ack(frame, now)
            elif kind == "error":
                if frame.get("id") == c.sub_id and frame.get("code") == "unavailable":
                    c.unavailable += 1  # history not readable in time: ask again shortly
                    asyncio.get_running_loop().call_later(0.5, c.subscribe)
                else:
                    c.errors += 1
                    self.first_error = self.first_error or str(frame)[:300]
            else:
                self.other += 1

        return on_message

    async def life(self, c: _Client) -> None:
        """Run ``c``: connect, subscribe, reconnect after a close (see the module doc)."""
        try:
            await self._life(c)
        except asyncio.CancelledError:
            if not self.stopping:
                c.phase = "cancelled"
                self.samples.setdefault("cancelled", f"client {c.index} in {c.phase}")
            raise
        except Exception as exc:  # a bench bug: say so in the report, never hang silently
            c.phase = "crashed"
            self.samples.setdefault("crash", f"{type(exc).__name__}: {exc}"[:300])
            raise

    async def _life(self, c: _Client) -> None:
        attempt, first = 0, True
        while not self.stopping:
            if not first:
                c.phase = "sleeping"
                await asyncio.sleep(random.uniform(0, min(self.max_delay,
                                                          self.min_delay * 2 ** attempt)))
                if self.stopping:
                    return
            c.attempts += 1
            if c.storm:
                self.attempt_at.append(time.time())
            c.phase = "connecting"
            try:
                if first and self.gate is not None:
                    async with self.gate:
                        ws = await _open(self.url + f"?user=u{c.index}", c.source,
                                         self.timeout)
                else:
                    ws = await _open(self.url + f"?user=u{c.index}", c.source, self.timeout)
            except (Exception, asyncio.CancelledError) as exc:
                # CancelledError: Python 3.11's wait_for can let the inner cancellation out
                # when the handshake completes as the timeout fires; only ours ends the task
                if isinstance(exc, asyncio.CancelledError) and self.stopping:
                    raise
                first = False
                attempt += 1
                key = type(exc).__name__
                if isinstance(exc, _Refused):
                    key = " ".join(str(exc).split()[1:2]) or key  # the status code
                c.codes[key] = c.codes.get(key, 0) + 1
                if key not in self.samples:
                    self.samples[key] = str(exc)[:200]
                continue
            first = False
            c.ws, c.acked = ws, False
            c.opened_at = time.time()
            ws.on_message = self.handler(c)
            if c.plain is not None:
                ws.send_now(orjson.dumps({"op": "subscribe", "channel": c.plain, "id": 0}))
            c.subscribe()
            c.phase = "open"
            await ws.closed
            c.ws = None
            key = str(ws.close_code or "tcp")
            c.codes[key] = c.codes.get(key, 0) + 1
            if c.storm and not c.closed_at:
                c.closed_at = time.time()
            attempt = 0 if c.acked else attempt + 1
            if ws.close_code is not None and 4000 <= ws.close_code < 5000 and \
                    ws.close_code not in (4005, 4008, 4009, 4029):
                c.phase = "stopped"
                return  # the SDK policy: stop
        c.phase = "stopped"

    def mark_storm(self) -> None:
        self.storm_at = time.time()
        self.gate = None  # reconnects are not throttled: every client goes at once
        self.attempt_at = array("d")
        for c in self.clients:
            c.storm, c.closed_at, c.opened_at, c.caught_at = True, 0.0, 0.0, 0.0
            c.attempts, c.codes = 0, {}

    def status(self) -> dict[str, Any]:
        cs = self.clients
        phases: dict[str, int] = {}
        for c in cs:
            phase = "closing" if c.phase == "open" and c.ws is not None \
                and c.ws.state != "OPEN" else c.phase
            phases[phase] = phases.get(phase, 0) + 1
        return {"phases": phases,
                "open": sum(1 for c in cs if c.ws is not None and c.ws.state == "OPEN"),
                "acked": sum(1 for c in cs if c.acked and c.ws is not None),
                "closed": sum(1 for c in cs if c.closed_at),
                "caught": sum(1 for c in cs if c.storm and c.caught_at > self.storm_at
                              and c.target is None and c.ws is not None),
                "received": sum(c.received for c in cs)}

    def report(self) -> dict[str, Any]:
        cs = self.clients
        codes: dict[str, int] = {}
        for c in cs:
            for k, v in c.codes.items():
                codes[k] = codes.get(k, 0) + v
        return {
            "clients": len(cs), "received": sum(c.received for c in cs),
            "dups": sum(c.dups for c in cs), "holes": sum(c.holes for c in cs),
            "missing": sum(c.missing for c in cs),
            "recovered": sum(c.recovered for c in cs), "failed": sum(c.failed for c in cs),
            "unavailable": sum(c.unavailable for c in cs), "errors": sum(c.errors for c in cs),
            "first_error": self.first_error, "codes": codes, "samples": self.samples,
            "attempts": sum(c.attempts for c in cs), "other_frames": self.other,
            "attempt_at": self.attempt_at.tolist(),
            "open": sum(1 for c in cs if c.ws is not None and c.ws.state == "OPEN"),
            "last": {str(c.index): [c.hist, c.last, c.epoch] for c in cs},
            "closed_at": [c.closed_at for c in cs if c.closed_at],
            "opened_at": [c.opened_at for c in cs if c.storm and c.opened_at > self.storm_at],
            "caught_at": [c.caught_at for c in cs if c.storm and c.caught_at > self.storm_at],
            "recover_s": [c.caught_at - c.opened_at for c in cs if c.storm
                          and c.caught_at > self.storm_at and c.opened_at > self.storm_at],
        }


async def _loadgen(ctrl: Connection, url: str, specs: list[tuple], concurrency: int,
                   timeout: float, min_delay: float, max_delay: float) -> None:
    loop = asyncio.get_running_loop()
    clients = [_Client(*spec) for spec in specs]
    gen = _Gen(url, clients, concurrency, timeout, min_delay, max_delay)
    t0 = time.monotonic()
    gen.tasks = [asyncio.create_task(gen.life(c)) for c in clients]
    deadline = time.monotonic() + max(60.0, len(clients) / 50)
    while time.monotonic() < deadline and not all(c.acked for c in clients):
        await asyncio.sleep(0.05)
    ctrl.send(("ready", {"acked": sum(1 for c in clients if c.acked),
                         "seconds": time.monotonic() - t0, "first_error": gen.first_error,
                         "codes": gen.report()["codes"]}))
    try:
        while True:
            cmd = await loop.run_in_executor(None, ctrl.recv)
            if cmd[0] == "status":
                ctrl.send(("status", gen.status()))
            elif cmd[0] == "storm":
                gen.mark_storm()
                ctrl.send(("marked", gen.storm_at))
            elif cmd[0] == "collect":  # bench.history: deliveries of one run
                _, run, expected, deadline_t, quiet = cmd
                await _collect(gen, run, expected, deadline_t, quiet)
                lat = gen.lat.pop(run, array("f"))
                ctrl.send(("result", {"received": gen.counts.pop(run, 0),
                                      "last": gen.last_rx.pop(run, None),
                                      "latencies_ms": lat.tobytes()}))
            elif cmd[0] == "expect":  # every client at its channel's final offset
                _, finals, deadline_t = cmd
                while time.time() < deadline_t and not all(
                        c.hist is None or c.last == finals.get(c.hist, [0])[0]
                        for c in clients):
                    await asyncio.sleep(0.05)
                ctrl.send(("report", gen.report()))
            elif cmd[0] == "close":
                break
    finally:
        gen.stopping = True
        for task in gen.tasks:
            task.cancel()
        await asyncio.gather(*(c.ws.close(1.0) for c in clients if c.ws is not None),
                             return_exceptions=True)
        await asyncio.gather(*gen.tasks, return_exceptions=True)
        ctrl.send(("closed", None))


async def _collect(gen: _Gen, run: int, expected: int, deadline: float, quiet: float) -> None:
    last_count, last_change = -1, time.monotonic()
    while time.time() < deadline:
        count = gen.counts.get(run, 0)
        if count >= expected:
            return
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        await asyncio.sleep(0.05)


def loadgen_main(ctrl: Connection, url: str, specs: list[tuple], concurrency: int = 32,
                 timeout: float = 30.0, min_delay: float = 0.25, max_delay: float = 10.0
                 ) -> None:
    """Entry point of a load-generator process (uvloop).

    ``url`` is the hub's ``ws://host:port/ws``; ``specs`` one ``(index, history channel or
    None, plain channel or None, source address or None)`` per client. The first connects go
    ``concurrency`` at a time; once every client is acked (or after max(60, n/50) s) it
    sends ``("ready", {...})``. Commands: ``("status",)`` -> ``("status", {open, acked,
    closed, caught, received})``; ``("storm",)`` marks the start of a storm (reconnects from
    then on are not throttled) -> ``("marked", time)``; ``("collect", run, expected,
    deadline, quiet)`` -> ``("result", {received, last, latencies_ms})``; ``("expect",
    {channel: [offset, epoch]}, deadline)`` waits until every client is at its channel's
    offset -> ``("report", {...})``; ``("close",)``.
    """
    raise_nofile()
    import uvloop

    try:
        uvloop.run(_loadgen(ctrl, url, specs, concurrency, timeout, min_delay, max_delay))
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
