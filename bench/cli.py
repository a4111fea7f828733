"""``python -m bench``: the same fan-out workload against several stacks, side by side.

For every client count N and every stack, one session: start the stack's server, connect
N WebSocket clients from ``--loadgen-procs`` processes, then for every rate of ``--rates``
one run: a publisher process publishes ``--messages`` messages of ``--size`` bytes to one
channel through Redis (at that rate in msg/s, 0 = as fast as possible, at most
``--duration-limit`` seconds), and the clients record every delivery's latency.

Prints a table and ratios, writes ``results.json``, ``latency.png`` and ``throughput.png``
under ``--out`` (default ``bench/results/<UTC timestamp>/``). Performance is never asserted;
the exit code is 0 when every session ran (losses are reported, not failures), 1 when a
session failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata

from .procs import RedisServer, raise_nofile
from .report import aggregate, hub_ratios, ratios, table, write_json, write_plots
from .runner import Settings, run_session
from .stacks import NODE_DIR, NODE_PACKAGES, REPO, STACKS

__all__ = ["main"]

QUICK = {"clients": [200], "messages": 100, "rates": [100.0, 0.0], "duration_limit": 20.0}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rates(text: str) -> list[float]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if x:
            out.append(0.0 if x in ("max", "0") else float(x))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", default="ceiling,socketio,hub,hub2",
                   help="comma-separated, from: " + ", ".join(STACKS)
                   + " (default ceiling,socketio,hub,hub2); a stack whose runtime is not "
                   "installed is skipped with a note")
    p.add_argument("--clients", type=_ints, default=None,
                   help="client counts N, comma-separated (default 1000,5000)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per run (default 200)")
    p.add_argument("--rates", type=_rates, default=None,
                   help="offered rates in msg/s, 'max' or 0 = as fast as possible "
                        "(default 5,10,25,50,100,max)")
    p.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    p.add_argument("--duration-limit", type=float, default=None,
                   help="seconds a run may publish (default 20)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="seconds to wait for deliveries after the last publish (default 30); "
                        "what has not arrived by then counts as lost")
    p.add_argument("--quiet", type=float, default=5.0,
                   help="stop waiting after this many seconds without a delivery (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="preset: N=200, 100 messages, rates 100,max, 20 s bound "
                        "(explicit flags win)")
    p.add_argument("--redis-url", default=None,
                   help="Redis to use (default: start our own redis-server on a free port)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole matrix this many times, interleaved; the table shows "
                        "medians (lost: the sum) over repeats (default 1)")
    p.add_argument("--loadgen-procs", type=int, default=2,
                   help="load-generator processes (default 2)")
    p.add_argument("--connect-concurrency", type=int, default=32,
                   help="handshakes in flight per load-generator process (default 32)")
    p.add_argument("--no-uvloop", action="store_true",
                   help="default asyncio loop for the clients, the publisher and the "
                        "ceiling, socketio, hub and channels servers (not the Node ones)")
    p.add_argument("--client", choices=("lean", "websockets"), default="lean",
                   help="load-generator client: lean (bench/lean.py, ~4x less CPU per "
                        "delivery) or websockets (the library's asyncio client) (default lean)")
    p.add_argument("--burst", action="store_true",
                   help="stop the load generator (SIGSTOP) while the servers write each "
                        "run's messages, then let it read them: deliveries/s is the servers' "
                        "fan-out rate with the cores to themselves (no latencies); use with "
                        "--rates max and few --messages (50) so backlogs fit socket buffers")
    p.add_argument("--save-latencies", action="store_true",
                   help="also write every run's latencies (and publish times) to "
                        "OUT/logs/lat-<stack>-<N>-<rate>.npz")
    p.add_argument("--out", default=None,
                   help="output directory (default bench/results/<UTC timestamp>)")
    return p


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("websockets", "redis", "hiredis", "orjson", "uvloop", "python-socketio",
                 "python-engineio", "aiohttp", "psutil", "numpy", "Django", "channels",
                 "channels-redis", "uvicorn", "msgpack"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                     timeout=10, check=False).stdout.strip() or "missing"
    except (OSError, subprocess.TimeoutExpired):
        out["node"] = "missing"
    for pkg in (*NODE_PACKAGES, "engine.io"):
        try:
            with open(os.path.join(NODE_DIR, "node_modules", pkg, "package.json")) as f:
                out["npm:" + pkg] = json.load(f)["version"]
        except (OSError, ValueError, KeyError):
            out["npm:" + pkg] = "missing"
    return out


def _machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clients = args.clients or (QUICK["clients"] if args.quick else [1000, 5000])
    messages = args.messages or (QUICK["messages"] if args.quick else 200)
    rates = args.rates or (QUICK["rates"] if args.quick else [5, 10, 25, 50, 100, 0])
    limit = args.duration_limit or (QUICK["duration_limit"] if args.quick else 20.0)
    names = [x.strip() for x in args.stacks.split(",") if x.strip()]
    unknown = [x for x in names if x not in STACKS]
    if unknown or not names:
        print(f"unknown stack(s) {unknown}; choose from {', '.join(STACKS)}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    for name in names:
        why = STACKS[name].missing()
        if why:
            skipped[name] = why
            print(f"skipping {name}: {why}", file=sys.stderr)
    names = [n for n in names if n not in skipped]
    if not names:
        print("no stack left to run", file=sys.stderr)
        return 2

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or os.path.join(REPO, "bench", "results", stamp)
    os.makedirs(out, exist_ok=True)
    logdir = os.path.join(out, "logs")
    os.makedirs(logdir, exist_ok=True)
    nofile = raise_nofile()

    def log(line: str) -> None:
        print(line, flush=True)

    meta = {"started": stamp, "argv": sys.argv[1:] if argv is None else list(argv),
            "stacks": names, "skipped": skipped, "clients": clients, "messages": messages,
            "rates": rates,
            "size": args.size, "duration_limit": limit, "drain": args.drain,
            "loadgen_procs": args.loadgen_procs, "repeat": args.repeat, "nofile": nofile,
            "client": args.client, "burst": args.burst,
            "machine": _machine(), "versions": _versions(), "errors": []}
    redis_server = None
    runs: list[dict] = []
    started = time.monotonic()
    try:
        if args.redis_url:
            redis_url, redis_pid = args.redis_url, None
        else:
            redis_server = RedisServer(out)
            redis_url, redis_pid = redis_server.url, redis_server.proc.pid
        log(f"bench: stacks {names}, N {clients}, {messages} messages of {args.size} B, "
            f"rates {[r or 'max' for r in rates]}, redis {redis_url}, out {out}")
        settings = Settings(messages=messages, size=args.size, duration_limit=limit,
                            drain=args.drain, quiet=args.quiet,
                            loadgen_procs=args.loadgen_procs,
                            connect_concurrency=args.connect_concurrency,
                            redis_url=redis_url, redis_pid=redis_pid, logdir=logdir,
                            uvloop=not args.no_uvloop, client=args.client, burst=args.burst,
                            save_latencies=args.save_latencies,
                            log=log)
        run_no = 0
        matrix = [(k, n, name) for k in range(args.repeat) for n in clients for name in names]
        for repeat, n, name in matrix:
            stack = STACKS[name]
            if args.no_uvloop:
                stack = type(stack)(**{**stack.__dict__, "uvloop": False})
            if args.repeat > 1:
                log(f"repeat {repeat + 1}/{args.repeat}")
            try:
                session = run_session(stack, n, rates, run_no, settings)
                for run in session:
                    run["repeat"] = repeat
                runs.extend(session)
            except Exception as exc:
                meta["errors"].append(f"{name} N={n}: {type(exc).__name__}: {exc}")
                log(f"  {name} N={n} FAILED: {exc}")
                traceback.print_exc()
            run_no += len(rates)
    finally:
        if redis_server is not None:
            redis_server.close()
        meta["elapsed_s"] = time.monotonic() - started
        write_json(os.path.join(out, "results.json"), meta, runs)

    rows = aggregate(runs)
    print()
    print(table(rows))
    print()
    print(ratios(rows))
    if any(r["stack"] == "hub" for r in rows):
        print()
        print(hub_ratios(rows))
    if rows:
        for path in write_plots(out, rows):
            log(f"wrote {path}")
    log(f"wrote {os.path.join(out, 'results.json')} in {meta['elapsed_s']:.0f} s")
    return 1 if meta["errors"] else 0
