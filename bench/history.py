"""``python -m bench.history``: history channels against plain PUBLISH, side by side.

One redis-server, one ``hub serve`` and one set of clients for the whole run. Every client
subscribes to two channels with the same number ``k``: ``plain:c<k>`` (no history) and
``hist:c<k>`` (``history_size`` messages). A *layout* ``CxK`` is C channels with K clients
each (``1x1000``: one channel of 1000 subscribers; ``100x10``: 100 channels of 10). For
every layout and rate, the same publisher process (:class:`hub.AsyncPublisher`, as a
backend would use it) publishes the same number of messages round-robin over the channels,
once with plain ``PUBLISH`` (the ``plain`` channels) and once with ``FCALL hub_publish``
(the ``hist`` channels), interleaved, ``--repeat`` times. Per run it measures deliveries/s,
Redis CPU (``INFO cpu`` used_cpu_sys + used_cpu_user, before/after), where Redis spent it
(``INFO commandstats``, reset before the run), the hub's CPU (psutil, all its processes)
and checks that every client got every message, history offsets contiguous.

Rates are offered **deliveries** per second (msg/s = rate / K), so that a rate loads the
hub's fan-out the same in every layout; ``max`` publishes as fast as one publish in flight
allows. Figures are printed (markdown) and written to ``--out``/history.json; nothing is
asserted. Exit code 0 when every run ran (losses are figures), 1 when the setup failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from typing import Any

import numpy as np
import psutil

from .histkit import (
    HIST,
    PLAIN,
    RedisStats,
    busy_seconds,
    loadgen_main,
    publisher_main,
    recv,
    start_hub,
    terminate,
    wait_ready,
    write_config,
)
from .procs import RedisServer, cpu_seconds, free_port, raise_nofile, tree
from .stacks import REPO

__all__ = ["main"]

#: commandstats entries shown in the table, in this order (others are summed as "other")
SHOWN = ("publish", "fcall", "xadd", "hincrby", "hmget", "pexpire", "xrange", "xrevrange",
         "info", "ping")


def _layout(text: str) -> tuple[int, int]:
    c, _, k = text.lower().partition("x")
    return int(c), int(k)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x1000,100x10",
                   help="comma-separated CxK: C channels of K clients (default 1x1000,100x10)")
    p.add_argument("--rates", default="20000,max",
                   help="offered deliveries/s (msg/s = rate / K), 'max' = as fast as one "
                        "publish in flight allows (default 20000,max)")
    p.add_argument("--duration", type=float, default=5.0,
                   help="seconds of publishing per fixed-rate run; a max run publishes as "
                        "many messages as the largest fixed-rate run (default 5)")
    p.add_argument("--messages", type=int, default=0,
                   help="messages per run instead (0: from --duration; default 0)")
    p.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    p.add_argument("--history-size", type=int, default=100,
                   help="history_size of the hist namespace (default 100)")
    p.add_argument("--repeat", type=int, default=2,
                   help="plain/history pairs per layout x rate, interleaved; tables show "
                        "medians (default 2)")
    p.add_argument("--workers", type=int, default=1, help="hub serve --workers (default 1)")
    p.add_argument("--loadgen-procs", type=int, default=2,
                   help="load-generator processes (default 2)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="seconds to wait for deliveries after the last publish (default 30)")
    p.add_argument("--quiet", type=float, default=5.0,
                   help="stop waiting after this many seconds without a delivery (default 5)")
    p.add_argument("--time-limit", type=float, default=30.0,
                   help="seconds a run may publish (default 30)")
    p.add_argument("--idle", type=float, default=3.0,
                   help="seconds of Redis idle CPU measured per layout, subtracted from every "
                        "run's Redis CPU (default 3)")
    p.add_argument("--redis-cpu", type=int, default=None, metavar="N",
                   help="pin redis-server to CPU N and everything else (hub, publisher, "
                        "load generators) to the other CPUs, as when Redis has a machine of "
                        "its own (default: no pinning, all share every CPU)")
    p.add_argument("--out", default=None,
                   help="output directory (default bench/results/history-<UTC time>/)")
    return p


def _pin(redis_pid: int, cpu: int) -> str:
    """Pin ``redis_pid`` to CPU ``cpu`` and this process (and so every process it starts
    later) to the other CPUs. Returns a line for the report. Raises ValueError when ``cpu``
    is not one this process may run on or is the only one."""
    cpus = os.sched_getaffinity(0)
    if cpu not in cpus or len(cpus) < 2:
        raise ValueError(f"--redis-cpu {cpu}: this process runs on CPUs {sorted(cpus)}; "
                         f"pinning needs CPU {cpu} among them and at least one other")
    os.sched_setaffinity(redis_pid, {cpu})
    others = cpus - {cpu}
    os.sched_setaffinity(0, others)
    return f"redis-server pinned to CPU {cpu}; hub, publisher, load generators on {sorted(others)}"


def _start_loadgen(ctx: Any, url: str, channels: int, per: int, procs: int) -> list:
    n = channels * per
    workers = []
    for w in range(procs):
        specs = [(i, f"{HIST}:c{i % channels}", f"{PLAIN}:c{i % channels}", None)
                 for i in range(w, n, procs)]
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=loadgen_main, daemon=True, args=(child, url, specs, 32))
        proc.start()
        child.close()
        workers.append((proc, parent, specs))
    return workers


def _stop_loadgen(workers: list) -> None:
    for _, conn, _ in workers:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("close",))
    for proc, conn, _ in workers:
        with contextlib.suppress(Exception):
            recv(conn, 15, "load generator close")
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(2)


def _idle_redis(rstats: RedisStats, seconds: float) -> float:
    """Redis CPU cores with the clients connected and nothing published (the hub's probes
    and keepalives): subtracted from every run's Redis CPU."""
    rstats.mark()
    t0 = time.monotonic()
    time.sleep(seconds)
    return rstats.read()[0] / (time.monotonic() - t0)


def _one_run(run: int, mode: str, rate: float, count: int, channels: int, per: int,
             args: argparse.Namespace, pub: Any, workers: list, hub: list[psutil.Process],
             rstats: RedisStats, redis_proc: psutil.Process, idle: float) -> dict[str, Any]:
    ns = HIST if mode == "history" else PLAIN
    names = [f"{ns}:c{k}" for k in range(channels)]
    msg_rate = rate / per if rate > 0 else 0.0
    loadgen = [psutil.Process(p.pid) for p, _, _ in workers]
    rstats.mark()
    hub0, lg0, busy0, rd0 = cpu_seconds(hub), cpu_seconds(loadgen), busy_seconds(), \
        cpu_seconds([redis_proc])
    wall0 = time.time()
    pub.send(("run", run, names, count, msg_rate, args.size, args.time_limit))
    res = recv(pub, args.time_limit + 30, "publisher")[1]
    deadline = time.time() + args.drain
    for _, conn, specs in workers:
        expected = sum(res["counts"].get(f"{ns}:c{int(s[0]) % channels}", 0) for s in specs)
        conn.send(("collect", run, expected, deadline, args.quiet))
    parts = [recv(conn, args.drain + 30, "load generator")[1] for _, conn, _ in workers]
    wall1 = time.time()
    redis_cpu, cmdstats = rstats.read()
    hub1, lg1, busy1, rd1 = cpu_seconds(hub), cpu_seconds(loadgen), busy_seconds(), \
        cpu_seconds([redis_proc])
    received = sum(p["received"] for p in parts)
    expected = res["published"] * per
    lasts = [p["last"] for p in parts if p["last"]]
    span = max(lasts) - res["first"] if lasts else 0.0
    lat = np.concatenate([np.frombuffer(p["latencies_ms"], dtype=np.float32) for p in parts])
    pct = np.percentile(lat, [50, 99]) if lat.size else [float("nan")] * 2
    hub_cpu, lg_cpu = hub1 - hub0, lg1 - lg0
    wall = wall1 - wall0
    raw_redis = redis_cpu
    redis_cpu = max(0.0, redis_cpu - idle * wall)  # net of the idle background
    return {
        "run": run, "mode": mode, "layout": f"{channels}x{per}", "rate": rate,
        "msg_rate": msg_rate, "published": res["published"], "publish_errors": res["errors"],
        "publish_s": res["last"] - res["first"], "publisher_cpu_s": res["cpu"],
        "expected": expected, "received": received, "lost": expected - received,
        "deliveries_per_s": received / span if span > 0 else 0.0,
        "p50_ms": float(pct[0]), "p99_ms": float(pct[1]),
        "redis_cpu_s": redis_cpu, "redis_raw_cpu_s": raw_redis,
        "redis_idle_cores": idle, "redis_psutil_cpu_s": rd1 - rd0,
        "redis_us_per_msg": redis_cpu / res["published"] * 1e6 if res["published"] else None,
        "redis_us_per_delivery": redis_cpu / received * 1e6 if received else None,
        "hub_cpu_s": hub_cpu,
        "hub_us_per_delivery": hub_cpu / received * 1e6 if received else None,
        "loadgen_cores": lg_cpu / wall,
        "other_cores": max(0.0, (busy1 - busy0) - hub_cpu - lg_cpu - (rd1 - rd0)
                           - res["cpu"]) / wall,
        "commandstats": cmdstats, "wall_s": wall,
    }


def _med(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _rate(rate: float) -> str:
    return "max" if rate == 0 else f"{rate:g}"


def report(rows: list[dict]) -> str:
    """Markdown tables (medians over repeats) of ``rows``: figures, ratios, commandstats."""
    keys: list[tuple[str, float]] = []
    for r in rows:
        if (r["layout"], r["rate"]) not in keys:
            keys.append((r["layout"], r["rate"]))
    out = ["| layout | deliveries/s offered | mode | published | deliveries/s | p50 ms | p99 ms "
           "| lost | Redis CPU us/msg (net of idle) | Redis CPU us/delivery | hub CPU us/delivery "
           "| loadgen cores | other cores |", "|" + "---|" * 13]
    ratio = ["| layout | deliveries/s offered | Redis CPU history/plain | hub CPU history/plain "
             "| deliveries/s history/plain | goal (Redis <= 2x) |", "|" + "---|" * 6]
    cmd = ["| layout | deliveries/s offered | mode | command: calls per message, usec per call |",
           "|---|---|---|---|"]
    for layout, rate in keys:
        med: dict[str, dict[str, Any]] = {}
        for mode in ("plain", "history"):
            sel = [r for r in rows if r["layout"] == layout and r["rate"] == rate
                   and r["mode"] == mode]
            if not sel:
                continue
            m = {k: _med(sel, k) for k in ("deliveries_per_s", "p50_ms", "p99_ms",
                                            "redis_us_per_msg", "redis_us_per_delivery",
                                            "hub_us_per_delivery", "loadgen_cores",
                                            "other_cores")}
            m["published"] = sum(r["published"] for r in sel)
            m["lost"] = sum(r["lost"] for r in sel)
            med[mode] = m
            out.append(f"| {layout} | {_rate(rate)} | {mode} | {m['published']} | "
                       f"{_f(m['deliveries_per_s'], 0)} | {_f(m['p50_ms'])} | "
                       f"{_f(m['p99_ms'])} | {m['lost']} | {_f(m['redis_us_per_msg'])} | "
                       f"{_f(m['redis_us_per_delivery'], 3)} | "
                       f"{_f(m['hub_us_per_delivery'])} | {_f(m['loadgen_cores'], 2)} | "
                       f"{_f(m['other_cores'], 2)} |")
            calls: dict[str, list[float]] = {}
            usec: dict[str, list[float]] = {}
            for r in sel:
                for name, st in r["commandstats"].items():
                    calls.setdefault(name, []).append(st["calls"] / max(1, r["published"]))
                    usec.setdefault(name, []).append(st["usec_per_call"])
            parts = [f"{n} {statistics.median(calls[n]):.2f} x {statistics.median(usec[n]):.2f}"
                     for n in sorted(calls, key=lambda n: -statistics.median(calls[n])
                                     * statistics.median(usec[n]))]
            cmd.append(f"| {layout} | {_rate(rate)} | {mode} | {'; '.join(parts)} |")
        if "plain" in med and "history" in med:
            p, h = med["plain"], med["history"]

            def x(key: str, p: dict = p, h: dict = h) -> float | None:
                return h[key] / p[key] if p.get(key) and h.get(key) is not None else None

            rr = x("redis_us_per_delivery")
            ratio.append(f"| {layout} | {_rate(rate)} | {_f(rr, 2)}x | "
                         f"{_f(x('hub_us_per_delivery'), 2)}x | "
                         f"{_f(x('deliveries_per_s'), 2)}x | "
                         f"{'-' if rr is None else ('met' if rr <= 2 else 'not met')} |")
    return "\n".join([*out, "", *ratio, "", *cmd])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layouts = [_layout(x) for x in args.layouts.split(",") if x.strip()]
        rates = [0.0 if x.strip().lower() in ("max", "0") else float(x)
                 for x in args.rates.split(",") if x.strip()]
    except ValueError as exc:
        print(f"python -m bench.history: {exc}", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or os.path.join(REPO, "bench", "results", f"history-{stamp}")
    logdir = os.path.join(out, "logs")
    os.makedirs(logdir, exist_ok=True)
    raise_nofile()
    ctx = mp.get_context("spawn")
    server = RedisServer(logdir)
    if args.redis_cpu is not None:
        assert server.proc is not None
        try:
            print(_pin(server.proc.pid, args.redis_cpu), flush=True)
        except ValueError as exc:
            server.kill()
            print(f"python -m bench.history: {exc}", file=sys.stderr)
            return 2
    hub_proc = pub_proc = None
    pub = None
    rows: list[dict] = []
    errors: list[str] = []
    t_start = time.monotonic()
    try:
        config = write_config(os.path.join(out, "hub.toml"), server.url, args.history_size)
        port = free_port()
        most = max(c * k for c, k in layouts)
        hub_proc = start_hub(port, config, os.path.join(logdir, "hub.log"),
                             workers=args.workers, max_connections=most + 100)
        wait_ready(port, hub_proc, 30)
        time.sleep(0.3 if args.workers == 1 else 1.0)
        hub = tree(hub_proc)
        rstats = RedisStats(server.url)
        assert server.proc is not None
        redis_proc = psutil.Process(server.proc.pid)
        pub, child = ctx.Pipe()
        pub_proc = ctx.Process(target=publisher_main, daemon=True, args=(child, config))
        pub_proc.start()
        child.close()
        recv(pub, 30, "publisher start")
        run = 0
        for channels, per in layouts:
            workers = _start_loadgen(ctx, f"ws://127.0.0.1:{port}/ws", channels, per,
                                     args.loadgen_procs)
            try:
                ready = [recv(c, max(90.0, channels * per / 40), "load generator")[1]
                         for _, c, _ in workers]
                acked = sum(r["acked"] for r in ready)
                print(f"layout {channels}x{per}: {acked} clients subscribed in "
                      f"{max(r['seconds'] for r in ready):.1f} s", flush=True)
                if acked < channels * per:
                    raise RuntimeError(f"only {acked} of {channels * per} clients subscribed "
                                       f"({ready[0]['first_error']}, {ready[0]['codes']})")
                for mode in ("plain", "history"):  # warm-up, run -1: ignored by the counts
                    ns = HIST if mode == "history" else PLAIN
                    pub.send(("run", -1, [f"{ns}:c{k}" for k in range(channels)], channels,
                              0.0, args.size, 10.0))
                    recv(pub, 40, "publisher warm-up")
                time.sleep(1.0)
                idle = _idle_redis(rstats, args.idle)
                print(f"  Redis idle (clients connected, nothing published): "
                      f"{idle * 1e3:.2f} ms CPU per s", flush=True)
                fixed = [r for r in rates if r > 0]
                for rate in rates:
                    if args.messages:
                        count = args.messages
                    else:
                        basis = rate if rate > 0 else max(fixed, default=20000.0)
                        count = max(channels, round(basis / per * args.duration))
                    for rep in range(args.repeat):
                        for mode in (("plain", "history") if rep % 2 == 0
                                     else ("history", "plain")):
                            row = _one_run(run, mode, rate, count, channels, per, args, pub,
                                           workers, hub, rstats, redis_proc, idle)
                            run += 1
                            rows.append(row)
                            print(f"  {row['layout']} rate={_rate(rate)} {mode}: "
                                  f"{row['published']} msgs, "
                                  f"{row['deliveries_per_s']:.0f} deliveries/s, lost "
                                  f"{row['lost']}, Redis {row['redis_us_per_msg']:.1f} us/msg, "
                                  f"hub {_f(row['hub_us_per_delivery'])} us/delivery",
                                  flush=True)
                for _, c, _ in workers:
                    c.send(("expect", {}, time.time()))
                checks = [recv(c, 30, "load generator report")[1] for _, c, _ in workers]
                for chk in checks:
                    chk.pop("last", None)
                check = {k: sum(c[k] for c in checks) for k in
                         ("received", "dups", "holes", "missing", "errors", "failed")}
                print(f"  layout {channels}x{per} history offsets: {check}", flush=True)
                for row in rows:
                    if row["layout"] == f"{channels}x{per}":
                        row["offset_check"] = check
            finally:
                _stop_loadgen(workers)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        if pub is not None:
            with contextlib.suppress(Exception):
                pub.send(("close",))
        if pub_proc is not None:
            pub_proc.join(5)
            if pub_proc.is_alive():
                pub_proc.kill()
        if hub_proc is not None:
            terminate(hub_proc)
        server.close()
    text = report(rows) if rows else "(no runs)"
    print()
    print(text)
    with open(os.path.join(out, "history.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": {"argv": sys.argv[1:] if argv is None else argv, "errors": errors,
                            "seconds": time.monotonic() - t_start, "nproc": os.cpu_count(),
                            "date": stamp, "load_end": os.getloadavg()},
                   "runs": rows}, f, indent=1)
    with open(os.path.join(out, "history.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nwrote {out}/history.json and history.md "
          f"({time.monotonic() - t_start:.0f} s in all)")
    from .plots import plot_run

    plot_run(out, "history")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
