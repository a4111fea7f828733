"""Microbenchmark: server CPU and write system calls per delivery of ``broadcast()``, of
``hub.connection.fan_out`` (one write per message and connection) and of coalesced bursts
(``hub.connection.begin_burst``/``end_burst``: one write per connection per burst).

Run as ``python -m bench.fanout [--clients 1000] [--messages 300] [--repeat 3] [--burst 10]
[--out DIR]``; the figures are also written to ``DIR/fanout.json`` and plotted in
``DIR/fanout-burst.png`` (default DIR: ``bench/results/fanout-<UTC time>/``).

One process serves N real loopback WebSocket connections (``websockets.asyncio.server``,
no compression, uvloop); two more processes hold the N clients (``bench.lean``) and only
drain them. The server then sends the same 150-byte text message ``--messages`` times to
all N, alternating between the library's ``broadcast()`` (one ``Frame`` built and
serialized per recipient), the hub's ``fan_out()`` (one wire frame per message, the same
bytes written to every transport) and ``burst N`` (``--burst`` messages at a time fanned out
inside one burst, as the node does with the messages the broker link read at once), and
prints per delivery: the process CPU (``time.process_time``, user + system, the kernel's
loopback TCP work included) in microseconds, and the write system calls (``syscw`` of
``/proc/self/io``: write and writev, which is how uvloop writes to a socket; sendto and
sendmsg are not counted there, see docs/benchmarks.md). 10 ms pauses between messages
(between bursts: ``--burst`` x 10 ms) let the clients drain, so no path meets a full socket
buffer. Loopback only; bounded by the counts given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve

from hub.connection import begin_burst, end_burst, fan_out

from .lean import lean_connect
from .procs import raise_nofile

MESSAGE = (b'{"type":"message","channel":"bench","data":{"r":1,"s":2,"t":1763800000.123456,'
           b'"p":"' + b"x" * 60 + b'"}}')


def _drain(port: int, count: int) -> None:
    import uvloop

    raise_nofile()

    async def main() -> None:
        conns = []
        for _ in range(count):
            conn = await lean_connect(f"ws://127.0.0.1:{port}/", 30)
            conn.on_message = lambda message: None
            conns.append(conn)
        await asyncio.sleep(600)  # killed by the parent long before

    uvloop.run(main())


def syscw() -> int:
    """Write system calls (write, writev) of this process so far, from Linux's
    ``/proc/self/io``; 0 where that file does not exist."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("syscw:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _measure(clients: int, messages: int, repeat: int, burst: int
                   ) -> dict[str, list[tuple[float, float]]]:
    """``{path: [(us CPU per delivery, write syscalls per delivery), ...]}``, one pair per
    repeat."""
    conns: set[Any] = set()  # websockets ServerConnections, fanned out to as the hub does

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        await ws.wait_closed()

    def coalesced() -> None:
        begin_burst()
        for _ in range(burst):
            fan_out(conns, MESSAGE)
        end_burst()

    # name: (send one batch, messages per batch)
    paths: dict[str, tuple[Callable[[], None], int]] = {
        "broadcast": (lambda: broadcast(conns, MESSAGE, text=True), 1),
        "fan_out": (lambda: fan_out(conns, MESSAGE), 1),
        f"burst {burst}": (coalesced, burst),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_drain, args=(port, clients // 2 + k * (clients % 2)),
                             daemon=True) for k in range(2)]
        for proc in procs:
            proc.start()
        try:
            deadline = time.monotonic() + 120
            while len(conns) < clients:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(conns)} of {clients} clients connected")
                await asyncio.sleep(0.1)
            for _ in range(repeat):
                for name, (send, per) in paths.items():
                    batches = max(1, messages // per)
                    cpu = 0.0
                    writes = 0
                    for _ in range(batches):
                        started, calls = time.process_time(), syscw()
                        send()
                        cpu += time.process_time() - started
                        writes += syscw() - calls
                        await asyncio.sleep(0.01 * per)
                    deliveries = batches * per * len(conns)
                    results[name].append((cpu / deliveries * 1e6, writes / deliveries))
        finally:
            for proc in procs:
                proc.kill()
    return results


def main() -> None:
    """Parse the flags, run, print one line per path."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10,
                        help="messages per coalesced burst (default 10)")
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results/fanout-<UTC time>/)")
    args = parser.parse_args()
    if min(args.clients, args.messages, args.repeat, args.burst) < 1:
        parser.error("--clients, --messages, --repeat and --burst must be >= 1")
    raise_nofile()
    import uvloop

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = uvloop.run(_measure(args.clients, args.messages, args.repeat, args.burst))
    base = statistics.median(cpu for cpu, _ in results["broadcast"])
    paths = []
    for name, values in results.items():
        cpus = [cpu for cpu, _ in values]
        med = statistics.median(cpus)
        writes = statistics.median(w for _, w in values)
        paths.append({"path": name, "cpu_us_per_delivery": med,
                      "write_syscalls_per_delivery": writes, "x_broadcast": med / base,
                      "repeats": [{"cpu_us_per_delivery": c, "write_syscalls_per_delivery": w}
                                  for c, w in values]})
        print(f"{name:10s} {med:6.2f} us CPU/delivery (median of "
              f"{', '.join(f'{v:.2f}' for v in cpus)}), x broadcast {med / base:.2f}; "
              f"{writes:.3f} write syscalls/delivery")
    sys.stdout.flush()
    # stdout is the three lines above (tests/system/test_bench_fanout.py); the rest to stderr
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"fanout-{stamp}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fanout.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": {"argv": sys.argv[1:], "date": stamp, "clients": args.clients,
                            "messages": args.messages, "repeat": args.repeat,
                            "burst": args.burst, "nproc": os.cpu_count(),
                            "load_end": os.getloadavg()},
                   "paths": paths}, f, indent=1)
    print(f"wrote {os.path.join(out, 'fanout.json')}", file=sys.stderr, flush=True)
    from .plots import plot_run

    plot_run(out, "fanout", log=sys.stderr)


if __name__ == "__main__":
    main()
