"""Microbenchmark: server CPU per delivery of ``broadcast()`` against ``hub.connection.fan_out``.

Run as ``python -m bench.fanout [--clients 1000] [--messages 300] [--repeat 3]``.

One process serves N real loopback WebSocket connections (``websockets.asyncio.server``,
no compression, uvloop); a second process holds the N clients (``bench.lean``) and only
drains them. The server then sends the same 150-byte text message ``--messages`` times to
all N, alternating between the library's ``broadcast()`` (one ``Frame`` built and
serialized per recipient) and the hub's ``fan_out()`` (one wire frame per message, the same
bytes written to every transport), and prints the process CPU seconds (``time.process_time``,
user + system, the kernel's loopback TCP work included) per delivery of each, in
microseconds. 10 ms pauses between messages let the clients drain, so neither path meets a
full socket buffer. Loopback only; bounded by the counts given.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

from websockets.asyncio.server import ServerConnection, broadcast, serve

from hub.connection import fan_out

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


async def _measure(clients: int, messages: int, repeat: int) -> dict[str, list[float]]:
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        await ws.wait_closed()

    paths = {"broadcast": lambda: broadcast(conns, MESSAGE, text=True),
             "fan_out": lambda: fan_out(conns, MESSAGE)}
    results: dict[str, list[float]] = {name: [] for name in paths}
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
                for name, send in paths.items():
                    cpu = 0.0
                    for _ in range(messages):
                        started = time.process_time()
                        send()
                        cpu += time.process_time() - started
                        await asyncio.sleep(0.01)
                    results[name].append(cpu / (messages * len(conns)) * 1e6)
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
    args = parser.parse_args()
    raise_nofile()
    import uvloop

    results = uvloop.run(_measure(args.clients, args.messages, args.repeat))
    base = statistics.median(results["broadcast"])
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:10s} {med:6.2f} us CPU/delivery (median of "
              f"{', '.join(f'{v:.2f}' for v in values)}), x broadcast {med / base:.2f}")


if __name__ == "__main__":
    main()
