"""``python -m bench.keepalive_probe``: where an idle connection's keepalive ping costs CPU.

One hub process in this process (uvloop, a private redis-server, ``--ping-interval``
1 s by default), N lean clients (``/ws?user=u<i>``, each answers every ping) in a forked
child. After the connections are open and a few intervals have passed, one window of
``--window`` seconds is measured, and the same window before any client connects (the
hub's fixed background: the Redis probe, the empty timer) is subtracted:

* the hub's CPU per ping, user and system time apart (``resource.getrusage``: system time
  is the kernel's, the ping's ``write`` and the pong's ``recv`` with their loopback
  delivery, and ``epoll_wait``);
* the pongs that took :meth:`hub.connection.HubConnection.data_received`'s fast path;
* cyclic garbage collections during the window (``gc.callbacks``);
* with ``--profile``: cProfile of the hub over the window (top functions by tottime);
* with ``--strace``: ``strace -c -f -p <hub>`` over the window (syscalls per ping);
* with ``--perf``: ``perf stat -e task-clock,instructions -p <hub>`` over the window
  (instructions per ping, load-insensitive);
* ``--micro``: the in-process cost of one pong through ``data_received`` (no socket read),
  the fast path and the library's path, timed over a live connection.

``--gc-freeze`` calls ``gc.freeze()`` once the connections are open; ``--no-fast-path``
sends every pong through the library's parser (``hub.connection._fast_pong`` off: the hub
as before the fast path). docs/benchmarks.md
("100,000 connections", "Keepalive") quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import resource
import subprocess
import time
from typing import Any

from .scale_probe import held_clients, probe_hub

__all__ = ["main"]


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def _window(hub: Any, seconds: float, a: argparse.Namespace,
                  tools: bool) -> dict[str, float]:
    from hub import connection

    collections = [0]

    def counted(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections[0] += 1

    external: list[tuple[str, subprocess.Popen[str]]] = []
    if tools and a.strace:
        external.append(("strace", subprocess.Popen(
            ["timeout", "-s", "INT", str(seconds), "strace", "-c", "-f", "-p", str(os.getpid())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    if tools and a.perf:
        external.append(("perf", subprocess.Popen(
            ["perf", "stat", "-e", "task-clock,instructions", "-p", str(os.getpid()),
             "--", "sleep", str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    prof = cProfile.Profile() if tools and a.profile else None
    visits = [0]  # CPU ns inside Keepalive.visit: the pings' writes, everything included
    keepalive = hub.keepalive
    plain = keepalive.visit

    def timed() -> None:
        t = time.thread_time_ns()
        try:
            plain()
        finally:
            visits[0] += time.thread_time_ns() - t

    keepalive.visit = timed
    gc.callbacks.append(counted)
    pings0 = hub.keepalive.pings_sent
    fast0 = getattr(connection, "fast_pongs", 0)
    u0, s0 = _usage()
    if prof is not None:
        prof.enable()
    await asyncio.sleep(seconds)
    if prof is not None:
        prof.disable()
    u1, s1 = _usage()
    gc.callbacks.remove(counted)
    del keepalive.visit
    out = {"user": u1 - u0, "sys": s1 - s0, "pings": hub.keepalive.pings_sent - pings0,
           "fast": getattr(connection, "fast_pongs", 0) - fast0, "gc": collections[0],
           "visit": visits[0] / 1e9}
    for name, proc in external:
        text, _ = proc.communicate(timeout=seconds + 30)
        print(f"--- {name} ---\n{text.strip()}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    return out


def _micro(hub: Any, rounds: int) -> None:
    """One pong through data_received of a live connection, fast path and library path."""
    import timeit

    from hub import connection

    conn = next((c for members in hub.keepalive.slices for c in members), None)
    if conn is None:
        print("--micro: no open connection to time a pong on")
        return
    pong = bytes([0x8A, 0x84]) + bytes(4) + b"\0\0\0\1"  # masked, with a zero key
    rate = type(conn).frame_rate
    type(conn).frame_rate = 0.0  # no frame budget in the way of many pongs in a row
    saved = getattr(connection, "_fast_pong", None)
    try:
        fast = timeit.timeit(lambda: conn.data_received(pong), number=rounds) / rounds
        if saved is not None:
            connection._fast_pong = False
        slow = timeit.timeit(lambda: conn.data_received(pong), number=rounds) / rounds
    finally:
        if saved is not None:
            connection._fast_pong = saved
        type(conn).frame_rate = rate
    print(f"one pong through data_received (no socket): fast path {fast * 1e6:.2f} us, "
          f"library path {slow * 1e6:.2f} us")


async def _probe(a: argparse.Namespace) -> None:
    async with probe_hub("/tmp/bench-keepalive-probe", ping_interval=a.ping_interval,
                         max_connections=max(100, 2 * a.clients)) as hub:
        await asyncio.sleep(1.0)
        base = await _window(hub, a.window, a, tools=False)
        async with held_clients(hub.port, a.clients, False) as wall:
            print(f"{a.clients} connections open in {wall:.1f} s; settling {a.settle} s")
            gc.collect()
            if a.gc_freeze:
                gc.freeze()
            await asyncio.sleep(a.settle)
            w = await _window(hub, a.window, a, tools=True)
            pings = w["pings"] or 1
            user = (w["user"] - base["user"]) / pings * 1e6
            sys_ = (w["sys"] - base["sys"]) / pings * 1e6
            print(f"window {a.window} s: {w['pings']:.0f} pings ({w['pings'] / a.window:.0f}/s), "
                  f"{w['fast']:.0f} pongs on the fast path, {w['gc']:.0f} gc collections "
                  f"(before any client: {base['gc']:.0f})")
            print(f"hub CPU per ping, background subtracted: {user + sys_:.2f} us "
                  f"(user {user:.2f}, system {sys_:.2f}); "
                  f"{(w['user'] + w['sys']) / a.window * 100:.2f} % of a core in all, "
                  f"{(base['user'] + base['sys']) / a.window * 100:.2f} % before any client")
            visit = w["visit"] / pings * 1e6
            print(f"of which the timer's visits (the ping frame written to each connection, the "
                  f"write system call included): {visit:.2f} us per ping; the rest, the pong "
                  f"(epoll, recv, parse, process_event): {user + sys_ - visit:.2f} us")
            if a.micro:
                _micro(hub, a.micro)


def main(argv: list[str] | None = None) -> int:
    """Run the probe (the module docstring); 0 when done."""
    p = argparse.ArgumentParser(prog="python -m bench.keepalive_probe")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--ping-interval", type=float, default=1.0)
    p.add_argument("--window", type=float, default=10.0, help="seconds measured (10)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the window (3)")
    p.add_argument("--profile", action="store_true", help="cProfile over the window")
    p.add_argument("--strace", action="store_true", help="strace -c over the window")
    p.add_argument("--perf", action="store_true", help="perf stat over the window")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once connected")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="every pong through websockets' parser (as before the fast path)")
    p.add_argument("--micro", type=int, default=0, metavar="ROUNDS",
                   help="time ROUNDS pongs through data_received in-process (0: no)")
    p.add_argument("--top", type=int, default=30, help="profile lines printed (30)")
    a = p.parse_args(argv)
    import uvloop

    from hub import connection

    connection._fast_pong = a.fast_path

    uvloop.run(_probe(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
