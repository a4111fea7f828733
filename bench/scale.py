"""``python -m bench.scale``: hold N WebSocket connections against ``hub serve --workers W``.

Issue 15 ("100,000 connections on one machine", "memory per connection"). One session:

1. a private ``redis-server`` (bench.procs.RedisServer) and ``hub serve --workers W
   --redis-url ... --max-connections M --ping-interval S`` on a free loopback port;
2. P load-generator processes (the lean client, bench/lean.py) open the N connections
   ``/ws?user=u<i>`` (the handshake subscribes ``user:u<i>``), each then subscribes the shared
   channel ``bench`` (not with ``--no-shared``: the personal channel only, and no
   broadcasts); connection i binds source address ``127.0.0.<2 + i % sources>`` before
   it connects (``IP_BIND_ADDRESS_NO_PORT``), so that no source address runs out of ephemeral
   ports; every process stays below the per-process open-file limit;
3. **memory**: the RSS of every worker before any client and with its connections idle
   (connections per worker = its open files minus those it had before);
4. **keepalive**: the workers' CPU over ``--idle`` seconds of idle connections, every one
   pinged once per ``--ping-interval`` and answering (cores, and us per ping);
5. **broadcast**: ``--broadcasts`` messages ``PUBLISH hub:bench``, one at a time; for each,
   receive ``time.time()`` minus the publish time at every connection: p50, p99, max (the
   max is the time for one message to reach all N);
6. **personal pushes**: ``--pushes`` messages ``PUBLISH hub:user:u<i>`` to random users, as
   fast as one pipelined redis-py client publishes; pushes delivered per second, and every
   push must reach its own user's connection (``wrong`` counts any other);
7. **storm** (``--no-storm`` skips it): the hub is stopped (SIGTERM: every client gets 1001)
   and started again, and once it answers ``/readyz`` every client reconnects at once
   (``--connect-concurrency`` handshakes in flight per process, retries after a refusal);
   connections accepted per second, and the workers' CPU per handshake;
8. one more broadcast: every reconnected client must receive it.

Printed and written to ``OUT/scale.json`` (``--out``, default
``bench/results/scale-<UTC time>/``); nothing is asserted but completion. Exit code 0 when
the session ran, 1 when it failed (the error is printed), 2 on a usage error.
``--smoke`` is the preset of tests/system/test_bench_scale.py (tiny N, short phases).
Every child process is stopped in a ``finally`` block, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import orjson
import psutil

from .lean import LeanConnection
from .procs import RedisServer, cpu_seconds, free_port, raise_nofile, rss_bytes, start, stop

__all__ = ["loadgen_main", "main"]

KIB = 1024.0
#: Open files a load-generator process or a hub worker keeps for itself below the limit.
FD_MARGIN = 500
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2


# -- the load generator (one process) ----------------------------------------------------------

class _Worker:
    """The connections of one load-generator process and what they received."""

    def __init__(self, port: int, indexes: list[int], sources: int, concurrency: int,
                 timeout: float, shared: bool = True) -> None:
        self.port, self.indexes, self.sources, self.shared = port, indexes, sources, shared
        self.concurrency, self.timeout = concurrency, timeout
        self.conns: dict[int, LeanConnection] = {}
        self.latencies: dict[int, array[float]] = {}  # broadcast seq -> latencies (s)
        self.pushes = 0
        self.push_wrong = 0
        self.push_last = 0.0
        self.other = 0
        self.errors: dict[str, int] = {}

    def on_message(self, index: int, raw: bytes) -> None:
        now = time.time()
        try:
            frame = orjson.loads(raw)
            data = frame["data"]
            kind = data["k"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.other += 1
            return
        if kind == "b":
            self.latencies.setdefault(data["s"], array("d")).append(now - data["t"])
        elif kind == "p":
            if data["u"] == index and frame["channel"] == f"user:u{index}":
                self.pushes += 1
            else:
                self.push_wrong += 1
            self.push_last = now
        else:
            self.other += 1

    async def _open(self, index: int) -> LeanConnection:
        loop = asyncio.get_running_loop()
        uri = f"ws://127.0.0.1:{self.port}/ws?user=u{index}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{2 + index % self.sources}", 0))
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            _, conn = await loop.create_connection(lambda: LeanConnection(uri), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            await conn.opened
            if self.shared:
                await conn.send(b'{"op":"subscribe","channel":"bench","id":1}')
            while self.shared:
                frame = orjson.loads(await conn.recv())
                if frame.get("type") == "ack" and frame.get("id") == 1:
                    break
                if frame.get("type") == "error":
                    raise RuntimeError(f"subscribe refused: {frame}")
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        conn.handshake = None  # type: ignore[assignment] # the client's memory, not needed
        conn.on_message = partial(self.on_message, index)
        return conn

    async def connect_all(self, retries: int = 20) -> dict[str, Any]:
        """(Re)open every connection that is not open, ``concurrency`` at a time; a failed
        attempt is retried after a random 0.1-1 s, at most ``retries`` times."""
        todo = [i for i in self.indexes if i not in self.conns or
                self.conns[i].state != "OPEN"]
        sem = asyncio.Semaphore(self.concurrency)
        t0 = time.time()
        done: list[float] = []
        refused = array("d")  # times of the failed attempts (the connect-rate plot)
        failed = 0

        async def one(index: int) -> None:
            nonlocal failed
            for _ in range(retries + 1):
                async with sem:
                    try:
                        self.conns[index] = await asyncio.wait_for(self._open(index),
                                                                   self.timeout)
                        done.append(time.time())
                        return
                    except Exception as exc:
                        refused.append(time.time())
                        key = f"{type(exc).__name__}: {str(exc)[:80]}"
                        self.errors[key] = self.errors.get(key, 0) + 1
                await asyncio.sleep(random.uniform(0.1, 1.0))
            failed += 1

        await asyncio.gather(*(one(i) for i in todo))
        return {"started": t0, "last": max(done) if done else t0, "connected": len(done),
                "failed": failed, "open": self.open_count(), "errors": dict(self.errors),
                "done_times": array("d", done).tobytes(), "failed_times": refused.tobytes()}

    def open_count(self) -> int:
        return sum(1 for c in self.conns.values() if c.state == "OPEN")

    def report(self) -> dict[str, Any]:
        return {"latencies": {s: a.tobytes() for s, a in self.latencies.items()},
                "pushes": self.pushes, "push_wrong": self.push_wrong,
                "push_last": self.push_last, "other": self.other, "open": self.open_count()}

    async def close_all(self) -> None:
        for conn in self.conns.values():
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0.1)


async def _serve(ctrl: Connection, worker: _Worker) -> None:
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, ctrl.recv)
        op = msg[0]
        if op == "connect":
            ctrl.send(("connected", await worker.connect_all()))
        elif op == "report":
            ctrl.send(("report", worker.report()))
        elif op == "close":
            await worker.close_all()
            ctrl.send(("closed", None))
            return


def loadgen_main(ctrl: Connection, port: int, indexes: list[int], sources: int,
                 concurrency: int, timeout: float, shared: bool = True) -> None:
    """Entry point of one load-generator process, driven over ``ctrl``: ``("connect",)``
    opens (again) every connection not open and answers ``("connected", figures)``;
    ``("report",)`` answers ``("report", what was received so far)``; ``("close",)`` aborts
    every connection and ends the process. ``shared`` False: no subscription to ``bench``
    (the personal channel only)."""
    raise_nofile()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in the bench extra
        run = asyncio.run
    try:
        run(_serve(ctrl, _Worker(port, indexes, sources, concurrency, timeout, shared)))
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctrl.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


# -- the session ---------------------------------------------------------------------------

def _ask(ctrls: Sequence[Connection], msg: tuple[Any, ...], timeout: float) -> list[Any]:
    for c in ctrls:
        c.send(msg)
    out = []
    deadline = time.monotonic() + timeout
    for c in ctrls:
        if not c.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no answer to {msg[0]!r} within {timeout:.0f} s")
        answer = c.recv()
        if answer[0] == "error":
            raise RuntimeError(f"load generator failed: {answer[1]}")
        out.append(answer[1])
    return out


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(
        t, "guest_nice", 0.0)


class _Machine:
    """CPU of the machine outside the processes given: other people's jobs."""

    def __init__(self, ours: list[psutil.Process]) -> None:
        self.ours = ours
        self.t0, self.busy0, self.cpu0 = time.monotonic(), _busy_seconds(), cpu_seconds(ours)

    def other_cores(self) -> float:
        wall = time.monotonic() - self.t0
        other = (_busy_seconds() - self.busy0) - (cpu_seconds(self.ours) - self.cpu0)
        return max(0.0, other) / wall if wall > 0 else 0.0


class Hub:
    """``hub serve --workers W`` as a subprocess, and its worker processes."""

    def __init__(self, args: argparse.Namespace, port: int, redis_url: str, logdir: str):
        self.args, self.port, self.redis_url, self.logdir = args, port, redis_url, logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", str(a.workers), "--redis-url", self.redis_url,
               "--max-connections", str(a.max_connections), "--ping-interval",
               str(a.ping_interval), "--log-level", "warning", *a.hub_arg]
        self.starts += 1
        self.proc = start(cmd, log_path=os.path.join(self.logdir, f"hub-{self.starts}.log"))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode} (log in "
                                   f"{self.logdir})")
            if time.monotonic() > deadline:
                raise TimeoutError("hub not ready")
            if len(self.workers()) == a.workers and self._ready() and all(
                    self._listens(p) for p in self.workers()):
                return
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _listens(self, p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in p.net_connections(kind="tcp"))
        return False

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def workers(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        if self.args.workers == 1:
            return self.processes()[:1]
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children()
        return []

    def stop(self) -> None:
        stop(self.proc, grace=30.0)
        self.proc = None


def _fds(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            out.append(p.num_fds())
        except psutil.Error:
            out.append(0)
    return out


#: Points of the receive-time distribution kept per broadcast (``quantiles_ms``): the
#: 0th, 0.5th, ... 100th percentile, whatever N.
QUANTILES = 201


def _quantiles_ms(values: Sequence[float]) -> list[float]:
    """``QUANTILES`` evenly spaced percentiles (0 to 100) of ``values`` (seconds), in ms;
    ``[]`` when there is none. Sorted; the last one is the max."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [round(ordered[round(k * last / (QUANTILES - 1))] * 1e3, 3)
            for k in range(QUANTILES)]


def _timeline(start: float, done: Sequence[float], failed: Sequence[float],
              bins: int = 200) -> dict[str, Any]:
    """Connections accepted and attempts refused per time bin from ``start`` (epoch s):
    ``{"bin_s": width, "connected": [count, ...], "failed_attempts": [count, ...]}``, at
    most ``bins`` bins (0.1 s wide at least), enough to cover the last event."""
    end = max([*done, *failed, start])
    width = max(0.1, (end - start) / bins)
    n = int((end - start) / width) + 1
    counts = [[0] * n, [0] * n]
    for row, times in zip(counts, (done, failed), strict=True):
        for t in times:
            row[min(n - 1, max(0, int((t - start) / width)))] += 1
    return {"bin_s": width, "connected": counts[0], "failed_attempts": counts[1]}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Session:
    """One run of the phases of the module docstring; figures in :attr:`results`."""

    def __init__(self, args: argparse.Namespace, out: str) -> None:
        self.a, self.out = args, out
        self.results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}}
        self.redis: RedisServer | None = None
        self.hub: Hub | None = None
        self.loadgen: list[tuple[mp.process.BaseProcess, Connection]] = []

    def log(self, line: str) -> None:
        print(line, flush=True)

    def ctrls(self) -> list[Connection]:
        return [c for _, c in self.loadgen]

    def ours(self) -> list[psutil.Process]:
        assert self.hub is not None
        procs = [*self.hub.processes(), *(psutil.Process(p.pid) for p, _ in self.loadgen)]
        if self.redis is not None and self.redis.proc is not None:
            procs.append(psutil.Process(self.redis.proc.pid))
        return procs

    def run(self) -> dict[str, Any]:
        a = self.a
        try:
            self.redis = RedisServer(os.path.join(self.out, "redis"))
            self.hub = Hub(a, free_port(), self.redis.url, self.out)
            self.hub.start()
            time.sleep(1.0)
            workers = self.hub.workers()
            rss0, fds0 = [rss_bytes([p]) for p in workers], _fds(workers)
            self._start_loadgen()
            self._connect("connect")
            time.sleep(2.0)
            self._memory(workers, rss0, fds0)
            self._idle(workers)
            if a.shared:
                self._broadcasts("broadcast", a.broadcasts)
            self._pushes()
            if a.storm:
                self._storm()
                if a.shared:
                    self._broadcasts("broadcast_after_storm", 1)
            return self.results
        finally:
            self._close()

    def _start_loadgen(self) -> None:
        a = self.a
        ctx = mp.get_context("spawn")
        for k in range(a.loadgen_procs):
            indexes = list(range(k, a.clients, a.loadgen_procs))
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadgen_main, daemon=True,
                            args=(child, self.hub.port if self.hub else 0, indexes,
                                  a.sources, a.connect_concurrency, 30.0, a.shared))
            p.start()
            child.close()
            self.loadgen.append((p, parent))

    def _connect(self, name: str) -> None:
        assert self.hub is not None
        server = self.hub.processes()
        cpu0 = cpu_seconds(server)
        machine = _Machine(self.ours())
        t0 = time.time()
        parts = _ask(self.ctrls(), ("connect",), self.a.phase_limit)
        cpu = cpu_seconds(self.hub.processes()) - cpu0
        connected = sum(p["connected"] for p in parts)
        first, last = min(p["started"] for p in parts), max(p["last"] for p in parts)
        span = max(last - first, 1e-9)
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        figures = {"connected": connected, "failed": sum(p["failed"] for p in parts),
                   "open": sum(p["open"] for p in parts), "seconds": span,
                   "per_s": connected / span, "wall_s": time.time() - t0,
                   "server_cpu_s": cpu,
                   "server_cpu_us_per_handshake": cpu / connected * 1e6 if connected else None,
                   "errors": errors, "other_cores": machine.other_cores(),
                   "load1": os.getloadavg()[0]}
        figures["timeline"] = _timeline(
            first, [t for p in parts for t in array("d", p.get("done_times", b""))],
            [t for p in parts for t in array("d", p.get("failed_times", b""))])
        self.results[name] = figures
        per_handshake = figures["server_cpu_us_per_handshake"] or 0.0
        self.log(f"{name}: {connected} connected ({figures['failed']} failed) in {span:.1f} s: "
                 f"{figures['per_s']:.0f}/s, server CPU {per_handshake:.0f} us/handshake, "
                 f"other cores {figures['other_cores']:.2f}"
                 + (f"; errors {errors}" if errors else ""))
        if connected == 0:
            raise RuntimeError(f"no client connected: {errors}")

    def _memory(self, workers: list[psutil.Process], rss0: list[int], fds0: list[int]) -> None:
        rss1, fds1 = [rss_bytes([p]) for p in workers], _fds(workers)
        per = []
        for r0, r1, f0, f1 in zip(rss0, rss1, fds0, fds1, strict=True):
            conns = f1 - f0
            per.append({"connections": conns, "rss_before_mib": r0 / 2**20,
                        "rss_idle_mib": r1 / 2**20,
                        "kib_per_conn": (r1 - r0) / conns / KIB if conns > 0 else None})
        total = sum(p["connections"] for p in per)
        kib = (sum(rss1) - sum(rss0)) / total / KIB if total else None
        self.results["memory"] = {"workers": per, "kib_per_conn": kib}
        spread = "/".join(str(p["connections"]) for p in per)
        self.log(f"memory: {kib or 0:.2f} KiB per connection (RSS over {len(per)} workers; "
                 f"connections per worker {spread})")

    def _idle(self, workers: list[psutil.Process]) -> None:
        a = self.a
        machine = _Machine(self.ours())
        cpu0, t0 = cpu_seconds(workers), time.monotonic()
        time.sleep(a.idle)
        cpu, wall = cpu_seconds(workers) - cpu0, time.monotonic() - t0
        open_now = sum(r["open"] for r in _ask(self.ctrls(), ("report",), 60))
        pings = open_now * wall / a.ping_interval if a.ping_interval else 0
        figures = {"seconds": wall, "cores": cpu / wall, "open": open_now,
                   "pings_expected": pings,
                   "us_per_ping": cpu / pings * 1e6 if pings else None,
                   "other_cores": machine.other_cores()}
        self.results["idle"] = figures
        self.log(f"idle: {100 * figures['cores']:.2f} % of a core over {wall:.0f} s with "
                 f"{open_now} connections pinged every {a.ping_interval:g} s "
                 f"({figures['us_per_ping'] or 0:.1f} us per ping, all included), "
                 f"other cores {figures['other_cores']:.2f}")

    def _publisher(self) -> Any:
        assert self.redis is not None
        return self.redis.client(timeout=30)

    def _collect(self, until: Any, limit: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + limit
        while True:
            parts = _ask(self.ctrls(), ("report",), 60)
            if until(parts) or time.monotonic() > deadline:
                return parts
            time.sleep(0.25)

    def _broadcasts(self, name: str, count: int) -> None:
        r = self._publisher()
        out = []
        seq0 = len(self.results.get("_seqs", []))
        for k in range(count):
            seq = seq0 + k
            self.results.setdefault("_seqs", []).append(seq)
            open_now = sum(p["open"] for p in _ask(self.ctrls(), ("report",), 60))
            body = orjson.dumps({"k": "b", "s": seq, "t": time.time()})
            r.publish("hub:bench", body)

            def got(parts: list[dict[str, Any]], seq: int = seq) -> int:
                return sum(len(p["latencies"].get(seq, b"")) // 8 for p in parts)

            parts = self._collect(lambda ps, n=open_now: got(ps) >= n, self.a.drain)
            lat = [x for p in parts for x in array("d", p["latencies"].get(seq, b""))]
            fig = {"seq": seq, "open": open_now, "received": len(lat),
                   "lost": open_now - len(lat), "p50_ms": _pct(lat, 50) * 1e3,
                   "p99_ms": _pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3 if lat else None,
                   "quantiles_ms": _quantiles_ms(lat)}
            out.append(fig)
            self.log(f"{name} {seq}: {len(lat)}/{open_now} received, p50 {fig['p50_ms']:.0f} ms "
                     f"p99 {fig['p99_ms']:.0f} ms max {fig['max_ms'] or 0:.0f} ms")
            time.sleep(0.5)
        self.results[name] = out

    def _pushes(self) -> None:
        a = self.a
        if a.pushes <= 0:
            return
        r = self._publisher()
        users = [random.randrange(a.clients) for _ in range(a.pushes)]
        base = sum(p["pushes"] for p in _ask(self.ctrls(), ("report",), 60))
        t0 = time.time()
        pipe = r.pipeline(transaction=False)
        for n, u in enumerate(users, 1):
            pipe.publish(f"hub:user:u{u}", orjson.dumps({"k": "p", "u": u, "t": time.time()}))
            if n % 500 == 0:
                pipe.execute()
        pipe.execute()
        t1 = time.time()
        parts = self._collect(lambda ps: sum(p["pushes"] + p["push_wrong"] for p in ps) - base
                              >= a.pushes, a.drain)
        got = sum(p["pushes"] for p in parts) - base
        wrong = sum(p["push_wrong"] for p in parts)
        last = max((p["push_last"] for p in parts), default=t1)
        span = max(last - t0, 1e-9)
        fig = {"published": a.pushes, "publish_s": t1 - t0, "received": got, "wrong": wrong,
               "lost": a.pushes - got, "per_s": got / span, "seconds": span}
        self.results["pushes"] = fig
        self.log(f"pushes: {got}/{a.pushes} delivered to their user ({wrong} wrong) in "
                 f"{span:.2f} s: {fig['per_s']:.0f}/s (publishing took {t1 - t0:.2f} s)")

    def _storm(self) -> None:
        assert self.hub is not None
        t0 = time.monotonic()
        self.hub.stop()
        stopped = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while sum(p["open"] for p in _ask(self.ctrls(), ("report",), 60)) > 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.hub.start()
        self.log(f"storm: hub stopped in {stopped:.1f} s and started again")
        self._connect("storm")

    def _close(self) -> None:
        for _, c in self.loadgen:
            with contextlib.suppress(Exception):
                c.send(("close",))
        for p, c in self.loadgen:
            with contextlib.suppress(Exception):
                if c.poll(20):
                    c.recv()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)
        if self.hub is not None:
            self.hub.stop()
        if self.redis is not None:
            self.redis.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=(
        "Hold N WebSocket connections against hub serve --workers W and measure memory, "
        "keepalive CPU, broadcast and personal-push delivery and a reconnect storm."))
    p.add_argument("--clients", type=int, default=10000, help="connections N (10000)")
    p.add_argument("--workers", type=int, default=None,
                   help="hub workers W (default: enough for the open-file limit, >= 2)")
    p.add_argument("--loadgen-procs", type=int, default=None,
                   help="load-generator processes (default: enough for the open-file limit)")
    p.add_argument("--sources", type=int, default=None,
                   help="source addresses 127.0.0.2... (default: one per 10000 connections)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="hub --max-connections per worker (default: 1.3 x N/W, within the limit)")
    p.add_argument("--ping-interval", type=float, default=20.0, help="hub --ping-interval (20)")
    p.add_argument("--idle", type=float, default=None,
                   help="seconds of the idle phase (default: one ping interval)")
    p.add_argument("--broadcasts", type=int, default=3, help="messages to all, one at a time (3)")
    p.add_argument("--pushes", type=int, default=None,
                   help="personal pushes to random users (default: N, at most 20000)")
    p.add_argument("--connect-concurrency", type=int, default=64,
                   help="handshakes in flight per load-generator process (64)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds to wait for one phase's deliveries (60)")
    p.add_argument("--phase-limit", type=float, default=300.0,
                   help="seconds a connect phase may take (300)")
    p.add_argument("--no-shared", dest="shared", action="store_false",
                   help="clients subscribe no shared channel (the personal one only); no "
                        "broadcasts")
    p.add_argument("--no-storm", dest="storm", action="store_false",
                   help="skip the restart-and-reconnect storm")
    p.add_argument("--hub-arg", action="append", default=[],
                   help="one more argument for hub serve (repeatable)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--smoke", action="store_true",
                   help="preset: N=40, 2 workers, 2 processes, ping 1 s, 2 s idle, 40 pushes")
    return p


def _settings(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.smoke:
        given = {arg.partition("=")[0] for arg in argv}
        if "--clients" not in given:
            a.clients = 40
        if "--workers" not in given:
            a.workers = 2
        if "--loadgen-procs" not in given:
            a.loadgen_procs = 2
        if "--ping-interval" not in given:
            a.ping_interval = 1.0
        if "--idle" not in given:
            a.idle = 2.0
        if "--drain" not in given:
            a.drain = 20.0
    limit = raise_nofile()
    per_proc = max(100, limit - FD_MARGIN)
    if a.clients <= 0:
        p.error("--clients must be > 0")
    if a.workers is None:
        a.workers = max(2, math.ceil(a.clients * 1.2 / per_proc))
    if a.loadgen_procs is None:
        a.loadgen_procs = max(2, math.ceil(a.clients / per_proc))
    if a.sources is None:
        a.sources = max(1, math.ceil(a.clients / 10000))
    if a.max_connections is None:
        a.max_connections = max(100, min(per_proc, math.ceil(a.clients * 1.3 / a.workers) + 100))
    if a.idle is None:
        a.idle = a.ping_interval
    if a.pushes is None:
        a.pushes = min(a.clients, 20000)
    if a.workers <= 0 or a.loadgen_procs <= 0 or not 0 < a.sources <= 250:
        p.error("--workers and --loadgen-procs must be > 0, --sources 1..250")
    if math.ceil(a.clients / a.loadgen_procs) > per_proc:
        p.error(f"{math.ceil(a.clients / a.loadgen_procs)} connections per load-generator "
                f"process: above the open-file limit ({limit}); raise --loadgen-procs")
    if a.max_connections * a.workers < a.clients:
        p.error("--max-connections x --workers is below --clients")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """Run one session (the module docstring); print the figures, write OUT/scale.json."""
    a = _settings(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"scale-{stamp}")
    os.makedirs(out, exist_ok=True)
    session = Session(a, out)
    print(f"bench.scale: N={a.clients} workers={a.workers} loadgen={a.loadgen_procs} "
          f"sources={a.sources} max-connections={a.max_connections} "
          f"ping-interval={a.ping_interval:g} (open-file limit {raise_nofile()}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f})", flush=True)
    error = None
    try:
        session.run()
    except Exception as exc:  # report what ran, then fail
        error = f"{type(exc).__name__}: {exc}"
        print(f"bench.scale failed: {error}", file=sys.stderr, flush=True)
    results = session.results
    results.pop("_seqs", None)
    results["error"] = error
    results["machine"] = {"cores": os.cpu_count(), "load_end": os.getloadavg()}
    results["argv"] = list(sys.argv[1:] if argv is None else argv)
    results["date"] = stamp
    with open(os.path.join(out, "scale.json"), "wb") as f:
        f.write(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                             default=str))
    print(f"results: {os.path.join(out, 'scale.json')}", flush=True)
    from .plots import plot_run

    plot_run(out, "scale")
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
