"""One session = one stack x one client count: start the server, connect N clients, sweep rates.

The clients stay connected for the whole rate sweep of a session; every rate is one *run*
with its own publisher process and its own run number in the payload, so late deliveries
of one run never count for the next. Every wait has a bound, and the server, the
load-generator and publisher processes are stopped in ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import psutil
import redis

from .client import worker_main
from .procs import cpu_seconds, free_port, rss_bytes, stop, tree
from .publisher import publisher_main
from .stacks import Stack

__all__ = ["Settings", "run_session"]

KIB = 1024.0


@dataclass(frozen=True)
class Settings:
    """The workload of every run (the same for every stack)."""

    messages: int  # messages per run
    size: int  # payload bytes
    duration_limit: float  # seconds a publisher may publish
    drain: float  # seconds after the last publish to wait for deliveries
    quiet: float  # stop waiting after this many seconds without a new delivery
    loadgen_procs: int  # load-generator processes
    connect_concurrency: int  # handshakes in flight per load-generator process
    redis_url: str
    redis_pid: int | None  # our own redis-server, for its CPU figure
    logdir: str
    uvloop: bool = True
    client: str = "lean"  # load-generator client: "lean" (bench.lean) or "websockets"
    # Burst mode: the load generator is stopped (SIGSTOP) while the servers write a run's
    # messages, so the servers have the cores to themselves; deliveries/s is then the
    # servers' fan-out rate (see _one_run) and the latency columns are not reported.
    burst: bool = False
    save_latencies: bool = False  # write every run's latencies to logdir/lat-*.npz
    log: Callable[[str], None] = field(default=print)


def _recv(conn: Connection, timeout: float, what: str) -> tuple[str, Any]:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from {what} within {timeout:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"{what} failed: {msg[1]}")
    return msg


def _listeners(procs: list[psutil.Process], port: int) -> list[psutil.Process]:
    found = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                found.append(p)
    return found


def _spread(procs: list[psutil.Process], port: int) -> dict[str, int]:
    """Established client connections per server process (pid -> count)."""
    spread = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            n = sum(1 for c in p.net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            if n:
                spread[str(p.pid)] = n
    return spread


def _subscribers(redis_url: str, stack: Stack) -> int | None:
    with redis.Redis.from_url(redis_url) as r:
        return stack.subscribers(r)


class _PeakRss(threading.Thread):
    def __init__(self, procs: list[psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.procs, self.peak, self._done = procs, rss_bytes(procs), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, rss_bytes(self.procs))

    def finish(self) -> int:
        self._done.set()
        self.join(2)
        return max(self.peak, rss_bytes(self.procs))


def run_session(stack: Stack, clients: int, rates: list[float], first_run: int,
                s: Settings) -> list[dict]:
    """Run ``rates`` against ``stack`` with ``clients`` connections; one dict per run."""
    ctx = mp.get_context("spawn")
    port = free_port()
    log_path = os.path.join(s.logdir, f"{stack.name}-{clients}.log")
    proc = stack.start(port, s.redis_url, log_path)
    workers: list[tuple[mp.process.BaseProcess, Connection]] = []
    session: dict[str, Any] = {"stack": stack.name, "clients": clients}
    try:
        stack.wait_ready(port, proc, 30)
        deadline = time.monotonic() + 30
        while len(_listeners(tree(proc), port)) < stack.processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stack.name}: fewer than {stack.processes} listeners")
            time.sleep(0.1)
        time.sleep(0.5)
        server = tree(proc)
        rss_before = rss_bytes(server)

        t0 = time.monotonic()
        per = [list(range(k, clients, s.loadgen_procs)) for k in range(s.loadgen_procs)]
        connect_timeout = max(60.0, clients / 50)
        for indexes in per:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, daemon=True,
                            args=(child, stack.protocol, stack.urls(port), indexes,
                                  s.connect_concurrency, 30.0, s.uvloop, s.client))
            p.start()
            child.close()
            workers.append((p, parent))
        ready = [_recv(c, connect_timeout, "load generator")[1] for _, c in workers]
        connected = sum(r["connected"] for r in ready)
        failed = sum(r["failed"] for r in ready)
        session.update(connected=connected, failed=failed, connect_s=time.monotonic() - t0,
                       connect_error=next((r["error"] for r in ready if r["error"]), None))
        s.log(f"  {stack.name} N={clients}: {connected} connected, {failed} failed "
              f"in {session['connect_s']:.1f} s, server pids {[p.pid for p in tree(proc)]}"
              + (f" (first error: {session['connect_error']})" if failed else ""))
        if connected == 0:
            raise RuntimeError(f"{stack.name}: no client connected")

        deadline = time.monotonic() + 15
        while (subs := _subscribers(s.redis_url, stack)) is not None and subs < stack.processes:
            if time.monotonic() > deadline:
                s.log(f"  warning: only {subs} Redis subscriber(s) on {stack.channel}")
                break
            time.sleep(0.1)
        time.sleep(1.0)
        server = tree(proc)
        rss_idle = rss_bytes(server)
        session.update(rss_before=rss_before, rss_idle=rss_idle, spread=_spread(server, port),
                       server_pids=[p.pid for p in server])
        loadgen = [psutil.Process(p.pid) for p, _ in workers]

        results = []
        saturated = None
        for i, rate in enumerate(rates):
            if saturated is not None and rate > saturated:
                s.log(f"  {stack.name} N={clients} rate={_rate(rate)}: skipped, "
                      f"rate {_rate(saturated)} already lost deliveries")
                continue
            run = _one_run(ctx, stack, first_run + i, rate, connected, server, loadgen,
                           [c for _, c in workers], s)
            if run["lost"] > 0 and rate > 0 and saturated is None:
                saturated = rate
            run["late"], run["settle_s"] = _settle([c for _, c in workers], s)
            run.update(session)
            run["rss_idle_kib_per_conn"] = (rss_idle - rss_before) / connected / KIB
            run["rss_loaded_kib_per_conn"] = (run["rss_peak"] - rss_before) / connected / KIB
            s.log(f"  {stack.name} N={clients} rate={_rate(rate)}: "
                  f"{run['deliveries_per_s']:.0f}/s p99 {run['p99_ms']:.1f} ms "
                  f"lost {run['lost']} cpu {run['cpu_us_per_delivery']:.1f} us")
            results.append(run)
        return results
    finally:
        for _, conn in workers:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("close",))
        for p, conn in workers:
            with contextlib.suppress(Exception):
                _recv(conn, 10, "load generator close")
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(2)
        stop(proc)


def _settle(workers: list[Connection], s: Settings) -> tuple[int, float]:
    """Wait until no delivery arrived for ``s.quiet`` s (at most ``s.drain`` s), so that the
    backlog of one run never runs into the next; return (late deliveries, seconds waited)."""
    t0 = time.monotonic()
    for conn in workers:
        conn.send(("settle", s.drain, min(s.quiet, 2.0)))
    late = sum(_recv(c, s.drain + 30, "load generator settle")[1] for c in workers)
    return late, time.monotonic() - t0


def _busy_seconds() -> float:
    """CPU seconds the whole machine was busy (all cores, not idle nor iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(
        t, "guest_nice", 0.0)


def _wait_idle(server: list[psutil.Process], limit: float, quiet: float = 0.3) -> float:
    """``time.time()`` of the last CPU tick of ``server`` before it stayed idle ``quiet`` s.

    Polls user+system CPU (10 ms ticks) every 10 ms, for at most ``limit`` seconds."""
    last_cpu, last_change = cpu_seconds(server), time.time()
    end = time.monotonic() + limit
    while time.monotonic() < end:
        time.sleep(0.01)
        now, cpu = time.time(), cpu_seconds(server)
        if cpu > last_cpu + 0.005:
            last_cpu, last_change = cpu, now
        elif now - last_change >= quiet:
            break
    return last_change


def _rate(rate: float) -> str:
    return "max" if rate == 0 else f"{rate:g}"


def _one_run(ctx: Any, stack: Stack, run: int, rate: float, connected: int,
             server: list[psutil.Process], loadgen: list[psutil.Process],
             workers: list[Connection], s: Settings) -> dict:
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher_main, daemon=True,
                      args=(child, stack.publish, s.redis_url, stack.channel, run,
                            s.messages, rate, s.size, s.duration_limit))
    pub.start()
    child.close()
    redis_proc = [psutil.Process(s.redis_pid)] if s.redis_pid else []
    try:
        _recv(parent, 30, "publisher start")
        time.sleep(0.3)  # let the warm-up message of run -1 drain
        cpu0, lg0, rd0 = cpu_seconds(server), cpu_seconds(loadgen), cpu_seconds(redis_proc)
        busy0 = _busy_seconds()
        wall0 = time.time()
        peak = _PeakRss(server)
        peak.start()
        if s.burst:
            for p in loadgen:
                p.suspend()
        try:
            parent.send(("go",))
            pub_result = _recv(parent, s.duration_limit + 30, "publisher")[1]
            fanout_end = _wait_idle(server, s.drain) if s.burst else None
        finally:
            if s.burst:
                for p in loadgen:
                    with contextlib.suppress(psutil.Error):
                        p.resume()
        deadline = time.time() + s.drain
        for conn in workers:
            conn.send(("collect", run, pub_result["published"], deadline, s.quiet))
        parts = [_recv(c, s.drain + 30, "load generator")[1]
                 for c in workers]
        wall1 = time.time()
        cpu1, lg1, rd1 = cpu_seconds(server), cpu_seconds(loadgen), cpu_seconds(redis_proc)
        busy1 = _busy_seconds()
        rss_peak = peak.finish()
    finally:
        pub.join(10)
        if pub.is_alive():
            pub.kill()
            pub.join(2)

    lat = np.concatenate([np.frombuffer(p["latencies_ms"], dtype=np.float32) for p in parts])
    received = int(lat.size)
    if s.save_latencies:
        sent = np.concatenate([np.frombuffer(p["sent"], dtype=np.float64) for p in parts])
        np.savez_compressed(os.path.join(s.logdir, f"lat-{stack.name}-{connected}-{_rate(rate)}"),
                            latency_ms=lat, sent=sent)
    published = pub_result["published"]
    lasts = [p["last"] for p in parts if p["last"] is not None]
    span = (max(lasts) - pub_result["first"]) if lasts else 0.0
    pct = np.percentile(lat, [50, 90, 99]) if received else [float("nan")] * 3
    max_ms = float(lat.max()) if received else float("nan")
    fanout_s = None
    if fanout_end is not None:
        # Burst: the servers wrote every frame between the first publish and the moment
        # their CPU went idle; the clients read them only afterwards, so latencies measure
        # the pause, not the servers, and are left out.
        fanout_s = fanout_end - pub_result["first"]
        span = fanout_s
        pct, max_ms = [float("nan")] * 3, float("nan")
    return {
        "run": run,
        "rate": rate,
        "published": published,
        "publish_s": pub_result["last"] - pub_result["first"],
        "publisher_cpu_s": pub_result.get("cpu"),
        # messages the channel layer itself refused (RedisChannelLayer over capacity)
        "layer_dropped": pub_result.get("layer_dropped"),
        "expected": published * connected,
        "received": received,
        "lost": published * connected - received,
        "open_after": sum(p["open"] for p in parts),
        "deliveries_per_s": received / span if span > 0 else 0.0,
        "p50_ms": float(pct[0]),
        "p90_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "max_ms": max_ms,
        "burst_fanout_s": fanout_s,
        "wall_s": wall1 - wall0,
        "server_cpu_s": cpu1 - cpu0,
        "cpu_us_per_delivery": (cpu1 - cpu0) / received * 1e6 if received else float("nan"),
        "loadgen_cpu_s": lg1 - lg0,
        "redis_cpu_s": rd1 - rd0 if redis_proc else None,
        # CPU the whole machine spent during the run outside the server, the load
        # generator, redis and the publisher: other people's work on a shared box.
        "other_cores": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (lg1 - lg0) - (rd1 - rd0)
                           - (pub_result.get("cpu") or 0.0)) / (wall1 - wall0),
        "rss_peak": rss_peak,
    }
