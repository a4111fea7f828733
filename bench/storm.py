"""``python -m bench.storm``: a recovery storm after a hub restart.

N clients (``--clients``, default 10000) on ``--channels`` history channels (default 100:
``hist:s0`` .. ``hist:s99``, N/C clients each) of one ``hub serve`` (``--workers``), fed by
a publisher (:class:`hub.AsyncPublisher`, ``FCALL hub_publish``) that keeps publishing at
``--rate`` msg/s round-robin over the channels for the whole run. Once every client is
subscribed (its ack's offset and epoch tracked, every delivery's offset checked) and
``--warm`` seconds of traffic went by, the hub process gets SIGTERM (its graceful stop:
every connection closed with 1001), and as soon as it exited a new ``hub serve`` starts on
the same port. Every client reconnects at once, with the SDKs' backoff (docs/clients.md:
first attempt after random(0, ``--min-delay``), doubling, full jitter, capped at
``--max-delay``), and subscribes again with ``since`` its last offset and epoch; it is
*recovered* once its ack said ``recovered:true`` and its last offset reached the ack's
offset (the head when the hub read the history). After ``--after`` s more of traffic the
publisher stops and every client must be at its channel's final offset.

Figures: the SIGTERM-to-exit and spawn-to-ready times of the hub, the time until every
client was recovered (from the SIGTERM and from the new process's spawn), the connection
rate, each client's reconnect-to-recovered time, Redis CPU (``INFO cpu``) and
``INFO commandstats`` over the storm, the new hub's CPU (start-up and storm apart), and the
checks: every client recovered, no duplicate, no hole, no reordering (per client, offsets
contiguous), nothing lost at the end. Written to ``--out``/storm.json and storm.md.

Exit code 0 when the storm ran and every check passed, 3 when it ran and a check failed
(the figures say which), 1 when the setup failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from typing import Any

import numpy as np
import psutil

from .histkit import (
    HIST,
    RedisStats,
    busy_seconds,
    loadgen_main,
    publisher_main,
    recv,
    source_addresses,
    start_hub,
    tcp_counters,
    terminate,
    wait_ready,
    write_config,
)
from .procs import RedisServer, cpu_seconds, free_port, raise_nofile, tree
from .stacks import REPO

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10000, help="clients N (default 10000)")
    p.add_argument("--channels", type=int, default=100,
                   help="history channels, N/C clients each (default 100)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="msg/s the publisher keeps publishing over all channels (default 100)")
    p.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    p.add_argument("--history-size", type=int, default=1000,
                   help="history_size of the channels (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="hub serve --workers (default 1)")
    p.add_argument("--hub-arg", action="append", default=[],
                   help="extra hub serve argument, repeatable (e.g. "
                        "--hub-arg=--max-pending-handshakes=1024)")
    p.add_argument("--loadgen-procs", type=int, default=0,
                   help="load-generator processes (default: one per 5000 clients, at least 2)")
    p.add_argument("--per-address", type=int, default=8000,
                   help="clients per loopback source address 127.0.0.1, .2, ... (default 8000)")
    p.add_argument("--min-delay", type=float, default=0.25,
                   help="reconnect backoff start in seconds (default 0.25, the SDKs')")
    p.add_argument("--max-delay", type=float, default=10.0,
                   help="reconnect backoff cap in seconds (default 10, the SDKs')")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds a client's TCP connect + handshake may take before it counts "
                        "as failed and backs off (default 10, websockets' open_timeout)")
    p.add_argument("--warm", type=float, default=3.0,
                   help="seconds of traffic before the restart (default 3)")
    p.add_argument("--after", type=float, default=2.0,
                   help="seconds of traffic after every client recovered (default 2)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds the storm may take before it is given up (default 180)")
    p.add_argument("--out", default=None,
                   help="output directory (default bench/results/storm-<UTC time>/)")
    return p


def _ask(workers: list, cmd: tuple, answer_timeout: float = 30.0) -> list:
    for _, conn in workers:
        conn.send(cmd)
    return [recv(conn, answer_timeout, f"load generator {cmd[0]}")[1] for _, conn in workers]


def _pct(values: list[float], qs: tuple[int, ...] = (50, 90, 99, 100)) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [float(x) for x in np.percentile(np.asarray(values), qs)]


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def run_storm(args: argparse.Namespace, out: str) -> dict[str, Any]:
    """Run the storm of the module docstring; return its figures (see :func:`report`)."""
    logdir = os.path.join(out, "logs")
    ctx = mp.get_context("spawn")
    n, channels = args.clients, max(1, min(args.channels, args.clients))
    procs_n = args.loadgen_procs or max(2, math.ceil(n / 5000))
    server = RedisServer(logdir)
    hub_proc = pub_proc = None
    pub = None
    publishing = False
    workers: list = []
    result: dict[str, Any] = {"clients": n, "channels": channels, "workers": args.workers,
                              "rate": args.rate, "loadgen_procs": procs_n,
                              "hub_args": args.hub_arg}
    try:
        config = write_config(os.path.join(out, "hub.toml"), server.url, args.history_size)
        port = free_port()
        max_conns = n + 100

        def hub(tag: str) -> Any:
            return start_hub(port, config, os.path.join(logdir, f"hub-{tag}.log"),
                             workers=args.workers, max_connections=max_conns,
                             extra=args.hub_arg)

        hub_proc = hub("1")
        wait_ready(port, hub_proc, 30)
        rstats = RedisStats(server.url)
        assert server.proc is not None
        redis_proc = psutil.Process(server.proc.pid)
        pub, child = ctx.Pipe()
        pub_proc = ctx.Process(target=publisher_main, daemon=True, args=(child, config))
        pub_proc.start()
        child.close()
        recv(pub, 30, "publisher start")

        sources = source_addresses(n, args.per_address)
        url = f"ws://127.0.0.1:{port}/ws"
        t0 = time.monotonic()
        for w in range(procs_n):
            specs = [(i, f"{HIST}:s{i % channels}", None,
                      sources[i // args.per_address] if len(sources) > 1 else None)
                     for i in range(w, n, procs_n)]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen_main, daemon=True,
                               args=(child, url, specs, 32, args.connect_timeout, args.min_delay,
                                     args.max_delay))
            proc.start()
            child.close()
            workers.append((proc, parent))
        ready = [recv(c, max(120.0, n / 40), "load generator")[1] for _, c in workers]
        acked = sum(r["acked"] for r in ready)
        result["setup_connect_s"] = time.monotonic() - t0
        print(f"storm: {acked}/{n} clients subscribed in {result['setup_connect_s']:.1f} s "
              f"({procs_n} load generators, sources {sources})", flush=True)
        if acked < n:
            raise RuntimeError(f"only {acked} of {n} clients subscribed: "
                               f"{[r['first_error'] for r in ready]} {[r['codes'] for r in ready]}")

        names = [f"{HIST}:s{k}" for k in range(channels)]
        pub.send(("run", 0, names, None, args.rate, args.size, 3600.0))
        publishing = True
        time.sleep(args.warm)
        before = _ask(workers, ("status",))
        result["received_before"] = sum(s["received"] for s in before)

        # -- the storm ------------------------------------------------------------------
        _ask(workers, ("storm",))
        rstats.mark()
        tcp0 = tcp_counters()
        loadgen = [psutil.Process(p.pid) for p, _ in workers]
        lg0, busy0 = cpu_seconds(loadgen), busy_seconds()
        rd0 = cpu_seconds([redis_proc])
        t_term = time.time()
        result["shutdown_s"] = terminate(hub_proc, 60)
        t_spawn = time.time()
        hub_proc = hub("2")
        new_hub = psutil.Process(hub_proc.pid)
        wait_ready(port, hub_proc, 60)
        t_ready = time.time()
        hub_tree = tree(hub_proc)
        hub_cpu_ready = cpu_seconds(hub_tree)
        timeline = []
        t_all = None
        last_print = time.time()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            st = _ask(workers, ("status",))
            now = time.time()
            row: dict[str, Any] = {k: sum(s[k] for s in st)
                                   for k in ("open", "acked", "caught", "closed")}
            phases: dict[str, int] = {}
            for s in st:
                for k, v in s["phases"].items():
                    phases[k] = phases.get(k, 0) + v
            row["phases"] = phases
            timeline.append({"t": now - t_spawn, **row})
            if now - last_print >= 5:
                last_print = now
                print(f"  +{now - t_spawn:.1f} s: {row}", flush=True)
            if row["caught"] >= n:
                t_all = now
                break
            time.sleep(0.2)
        if len(hub_tree) < args.workers + (1 if args.workers > 1 else 0):
            hub_tree = tree(hub_proc)
        hub_cpu_all = cpu_seconds(hub_tree) if hub_tree else cpu_seconds([new_hub])
        redis_cpu, cmdstats = rstats.read()
        rd1 = cpu_seconds([redis_proc])
        tcp1 = tcp_counters()
        lg1, busy1 = cpu_seconds(loadgen), busy_seconds()
        wall = time.time() - t_term
        # CPU the machine spent outside the hub, Redis and the load generators (the
        # publisher's ~0.05 core included): other people's jobs on a shared box
        result["loadgen_cores"] = (lg1 - lg0) / wall
        result["other_cores"] = max(0.0, (busy1 - busy0) - (lg1 - lg0) - (rd1 - rd0)
                                    - hub_cpu_all) / wall
        result["tcp"] = {k: tcp1[k] - tcp0.get(k, 0) for k in tcp1}
        t_end = t_all or time.time()
        result.update(
            recovered_all=t_all is not None,
            restart_to_ready_s=t_ready - t_spawn,
            storm_from_sigterm_s=t_end - t_term, storm_from_spawn_s=t_end - t_spawn,
            storm_from_ready_s=t_end - t_ready,
            redis_cpu_s=redis_cpu, redis_psutil_cpu_s=rd1 - rd0,
            redis_cores=redis_cpu / (t_end - t_term),
            hub_cpu_startup_s=hub_cpu_ready, hub_cpu_storm_s=hub_cpu_all - hub_cpu_ready,
            hub_cores_storm=(hub_cpu_all - hub_cpu_ready) / max(1e-9, t_end - t_ready),
            commandstats=cmdstats, timeline=timeline)
        print(f"storm: every client recovered: {t_all is not None}, "
              f"{result['storm_from_spawn_s']:.1f} s after the new hub's spawn", flush=True)

        time.sleep(args.after)
        pub.send(("stop",))
        publishing = False
        done = recv(pub, 30, "publisher")[1]
        finals = done["positions"]
        result.update(published=done["published"], publish_errors=done["errors"],
                      publish_first_error=done["first_error"])
        reports = _ask(workers, ("expect", finals, time.time() + 30.0), 60.0)

        # -- figures and checks -----------------------------------------------------------
        behind = wrong_epoch = 0
        for rep in reports:
            for _, (channel, last, epoch) in rep.pop("last").items():
                final = finals.get(channel)
                if final is None or last != final[0]:
                    behind += 1
                elif epoch != final[1]:
                    wrong_epoch += 1
        opened = sorted(t - t_spawn for rep in reports for t in rep["opened_at"])
        caught = [t - t_spawn for rep in reports for t in rep["caught_at"]]
        recover = [x for rep in reports for x in rep["recover_s"]]
        codes: dict[str, int] = {}
        samples: dict[str, str] = {}
        for rep in reports:
            samples.update(rep["samples"])
            for k, v in rep["codes"].items():
                codes[k] = codes.get(k, 0) + v
        sums = {k: sum(r[k] for r in reports) for k in
                ("received", "dups", "holes", "missing", "recovered", "failed", "unavailable",
                 "errors", "attempts", "open")}
        attempted = sorted(t - t_spawn for rep in reports for t in rep.get("attempt_at", []))
        span = (opened[-1] - opened[0]) if len(opened) > 1 else 0.0
        per_sec = np.bincount(np.asarray(opened, dtype=float).astype(int).clip(0)) \
            if opened else np.asarray([0])
        result.update(
            checks={"recovered": sums["recovered"], "recovery_failed": sums["failed"],
                    "duplicates": sums["dups"], "holes": sums["holes"],
                    "missing": sums["missing"], "behind_at_end": behind,
                    "wrong_epoch_at_end": wrong_epoch, "errors": sums["errors"],
                    "open_at_end": sums["open"]},
            received=sums["received"], unavailable_retries=sums["unavailable"],
            attempts=sums["attempts"], codes=codes, error_samples=samples,
            reconnected=len(opened),
            opened_pct_s=_pct(opened), caught_pct_s=_pct(caught),
            recover_pct_s=_pct(recover),
            connect_rate_per_s=len(opened) / span if span > 0 else None,
            connect_rate_peak_per_s=int(per_sec.max()),
            first_error=next((r["first_error"] for r in reports if r["first_error"]), None),
            # per client, seconds (the plots): reconnected / recovered from the new hub's
            # spawn, reconnect to recovered; every connect attempt from the spawn (negative:
            # before it, while the old hub stopped); the time of the SIGTERM from the spawn
            per_client={"opened_s": [round(x, 4) for x in opened],
                        "caught_s": [round(x, 4) for x in sorted(caught)],
                        "recover_s": [round(x, 4) for x in sorted(recover)]},
            attempts_s=[round(x, 4) for x in attempted],
            sigterm_s=t_term - t_spawn)
        result["ok"] = bool(t_all is not None and sums["failed"] == 0 and sums["dups"] == 0
                            and sums["holes"] == 0 and behind == 0 and wrong_epoch == 0
                            and sums["errors"] == 0 and sums["recovered"] >= n)
        return result
    finally:
        for _, conn in workers:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("close",))
        for proc, conn in workers:
            with contextlib.suppress(Exception):
                recv(conn, 20, "load generator close")
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        if pub is not None:
            with contextlib.suppress(Exception):
                if publishing:
                    pub.send(("stop",))
                pub.send(("close",))
        if pub_proc is not None:
            pub_proc.join(5)
            if pub_proc.is_alive():
                pub_proc.kill()
        if hub_proc is not None:
            terminate(hub_proc)
        server.close()


def report(r: dict[str, Any]) -> str:
    """The storm's figures as markdown."""
    o, c = r.get("opened_pct_s") or [None] * 4, r.get("caught_pct_s") or [None] * 4
    rv = [(r.get("recover_pct_s") or [None] * 4)[i] for i in (0, 2, 3)]
    stats = r.get("commandstats", {})
    top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:8]
    lines = [
        "| clients | channels | hub workers | publish rate msg/s | hub SIGTERM to exit s "
        "| spawn to ready s | all recovered, from spawn s | from SIGTERM s "
        "| reconnects p50/p90/p99/max s | recovered p50/p90/p99/max s "
        "| reconnect to recovered p50/p99/max s | connect rate /s (peak) | attempts "
        "| Redis CPU s (cores) | hub CPU start-up s | hub CPU storm s (cores) |",
        "|" + "---|" * 16,
        f"| {r['clients']} | {r['channels']} | {r['workers']} | {r['rate']:g} | "
        f"{_f(r.get('shutdown_s'))} | {_f(r.get('restart_to_ready_s'))} | "
        + (f"{_f(r.get('storm_from_spawn_s'))} | {_f(r.get('storm_from_sigterm_s'))} | "
           if r.get("recovered_all") else
           f"{r.get('reconnected')} of {r['clients']} within "
           f"{_f(r.get('storm_from_spawn_s'), 0)} | - | ")
        + f"{'/'.join(_f(x, 1) for x in o)} | {'/'.join(_f(x, 1) for x in c)} | "
        f"{'/'.join(_f(x, 2) for x in rv)} | "
        f"{_f(r.get('connect_rate_per_s'), 0)} ({r.get('connect_rate_peak_per_s', '-')}) | "
        f"{r.get('attempts', '-')} | {_f(r.get('redis_cpu_s'))} "
        f"({_f(r.get('redis_cores'))}) | {_f(r.get('hub_cpu_startup_s'))} | "
        f"{_f(r.get('hub_cpu_storm_s'))} ({_f(r.get('hub_cores_storm'))}) |",
        "",
        f"checks: {r.get('checks')}; ok: {r.get('ok')}",
        f"load generators {_f(r.get('loadgen_cores'))} cores, other jobs on the machine "
        f"{_f(r.get('other_cores'))} cores over the storm",
        f"close codes / connect errors seen by the clients: {r.get('codes')}",
        f"first message of each connect error: {r.get('error_samples')}",
        f"TCP counters over the storm (machine-wide, /proc/net/netstat): {r.get('tcp')}",
        f"'unavailable' retries: {r.get('unavailable_retries')}; published "
        f"{r.get('published')} (errors {r.get('publish_errors')}); deliveries "
        f"{r.get('received')}",
        "Redis over the storm (commandstats, by usec): " + "; ".join(
            f"{k} {v['calls']} calls x {v['usec_per_call']:.1f} us" for k, v in top),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients < 1 or args.channels < 1 or args.rate <= 0:
        print("python -m bench.storm: --clients, --channels and --rate must be positive",
              file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or os.path.join(REPO, "bench", "results", f"storm-{stamp}")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    raise_nofile()
    t0 = time.monotonic()
    errors: list[str] = []
    result: dict[str, Any] = {}
    try:
        result = run_storm(args, out)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    text = report(result) if "checks" in result else "(the storm did not complete)"
    print()
    print(text)
    with open(os.path.join(out, "storm.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": {"argv": sys.argv[1:] if argv is None else argv, "errors": errors,
                            "seconds": time.monotonic() - t0, "nproc": os.cpu_count(),
                            "date": stamp, "load_end": os.getloadavg()},
                   "result": result}, f, indent=1)
    with open(os.path.join(out, "storm.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nwrote {out}/storm.json and storm.md ({time.monotonic() - t0:.0f} s in all)")
    from .plots import plot_run

    plot_run(out, "storm")
    if errors:
        return 1
    return 0 if result.get("ok") else 3


if __name__ == "__main__":
    raise SystemExit(main())
