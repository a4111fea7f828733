"""``python -m bench.scale_probe``: where an idle connection's bytes and a handshake's CPU go.

One hub process in this process (uvloop, a private redis-server), N lean clients
(``/ws?user=u<i>``, then ``subscribe bench`` unless ``--no-shared``) in a forked child.

* ``memory`` (default): tracemalloc snapshots before and after the N connections are open
  and idle; prints the Python heap per connection and the biggest allocation sites per
  connection (``--frames`` deep).
* ``profile``: cProfile of the hub while the N connect; prints the hub's CPU per handshake
  (profiled, so inflated) and the top functions (``--sort tottime|cumulative``).

docs/benchmarks.md ("100,000 connections", "Where the bytes and the CPU go") quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import multiprocessing as mp
import pstats
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["main"]


def hold_clients(port: int, n: int, shared: bool, ready: Any, go: Any) -> None:
    """In a child process: open ``n`` lean clients ``/ws?user=u<i>`` to the hub on ``port``
    (64 handshakes in flight; each subscribes ``bench`` too with ``shared``), put the seconds
    it took on ``ready``, hold them until ``go`` is set, then abort them. Shared with
    bench.keepalive_probe."""
    import uvloop

    from .lean import lean_connect

    async def run() -> None:
        conns = []
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                c = await lean_connect(f"ws://127.0.0.1:{port}/ws?user=u{i}", 30)
                if shared:
                    await c.send(b'{"op":"subscribe","channel":"bench","id":1}')
                    await c.recv()
                conns.append(c)

        t0 = time.time()
        await asyncio.gather(*(one(i) for i in range(n)))
        ready.put(time.time() - t0)
        while not go.is_set():
            await asyncio.sleep(0.1)
        for c in conns:
            if c.transport is not None:
                c.transport.abort()

    uvloop.run(run())


@contextlib.asynccontextmanager
async def probe_hub(workdir: str, **options: Any) -> AsyncIterator[Any]:
    """A :class:`hub.server.Hub` in this process on a free port, with a private redis-server
    under ``workdir``; ``options`` are more :class:`hub.config.Config` fields. Stopped, and
    the redis-server with it, on leaving. Shared with bench.keepalive_probe."""
    from hub.config import Config
    from hub.server import Hub

    from .procs import RedisServer

    redis = RedisServer(workdir)
    try:
        hub = Hub(Config(port=0, redis_url=(redis.url,), log_level="warning", **options))
        await hub.start()
        try:
            yield hub
        finally:
            await hub.stop()
    finally:
        redis.close()


@contextlib.asynccontextmanager
async def held_clients(port: int, n: int, shared: bool) -> AsyncIterator[float]:
    """:func:`hold_clients` in a forked child: entered once all ``n`` are open (the value is
    the seconds that took), released (the child aborts them and exits) on leaving."""
    ctx = mp.get_context("fork")
    ready, go = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=hold_clients, args=(port, n, shared, ready, go))
    child.start()
    try:
        while ready.empty():
            await asyncio.sleep(0.05)
        yield ready.get()
    finally:
        go.set()
        child.join(30)


async def _probe(a: argparse.Namespace) -> None:
    async with probe_hub("/tmp/bench-scale-probe",
                         max_connections=max(100, 2 * a.clients)) as hub:
        await asyncio.sleep(0.5)
        gc.collect()
        prof = cProfile.Profile()
        if a.mode == "memory":
            tracemalloc.start(a.frames)
            before = tracemalloc.take_snapshot()
        cpu0 = time.process_time()
        if a.mode == "profile":
            prof.enable()
        async with held_clients(hub.port, a.clients, a.shared) as wall:
            if a.mode == "profile":
                prof.disable()
            cpu = time.process_time() - cpu0
            print(f"{a.clients} connections in {wall:.2f} s ({a.clients / wall:.0f}/s); hub "
                  f"CPU {cpu / a.clients * 1e6:.0f} us per handshake"
                  + (" (profiled)" if a.mode == "profile" else ""))
            if a.mode == "memory":
                await asyncio.sleep(2)
                gc.collect()
                after = tracemalloc.take_snapshot()
                total = sum(st.size_diff for st in after.compare_to(before, "filename"))
                print(f"Python heap per connection: {total / a.clients:.0f} B")
                key = "traceback" if a.frames > 1 else "lineno"
                for st in after.compare_to(before, key)[:a.top]:
                    where = " <- ".join(
                        f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}"
                        for f in st.traceback)
                    print(f"{st.size_diff / a.clients:7.0f} B {st.count_diff / a.clients:5.2f} "
                          f"objects per connection  {where}")
            else:
                pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)


def main(argv: list[str] | None = None) -> int:
    """Run the probe (the module docstring); 0 when done."""
    p = argparse.ArgumentParser(prog="python -m bench.scale_probe")
    p.add_argument("mode", nargs="?", choices=("memory", "profile"), default="memory")
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--no-shared", dest="shared", action="store_false")
    p.add_argument("--frames", type=int, default=1, help="tracemalloc traceback depth (1)")
    p.add_argument("--sort", default="tottime", help="cProfile sort key (tottime)")
    p.add_argument("--top", type=int, default=40, help="lines printed (40)")
    a = p.parse_args(argv)
    import uvloop

    uvloop.run(_probe(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
