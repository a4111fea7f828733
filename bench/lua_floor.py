"""What a history publish costs Redis at least: the floor under ``FCALL hub_publish``.

``python -m bench.lua_floor`` starts a private ``redis-server`` (a free loopback port, never
6379), loads the hub's function library (``hub/history/functions.lua``) and a probe library
``hubfloor`` of smaller functions, subscribes one connection to the channels the commands
publish on (as a hub process would be: Redis delivers each message once, to it), and runs
``redis-benchmark`` for each command below, ``--requests`` calls with one client and
``--pipeline`` commands in flight. Redis's CPU per call is ``used_cpu_sys + used_cpu_user``
of ``INFO cpu`` after minus before, less the server's idle CPU over the same time; ``INFO
commandstats`` gives the usec Redis counted inside the command. Per **message**: a batch
function publishes ``--batch`` messages per call, so its figures are divided by that.

The commands, from the plain baseline to the real function:

==============  =========================================================================
``publish``     ``PUBLISH <K> <payload>``: what a channel without history costs
``fcall-empty`` ``FCALL hubfloor_empty 1 <K>``: an empty function (the call's fixed cost)
``fcall-pub``   ``FCALL hubfloor_publish 1 <K> <payload>``: one ``PUBLISH`` inside a function
``fcall-min``   ``FCALL hubfloor_min 1 <K> <payload>``: the least a history publish must
                do (``HINCRBY`` the offset, ``XADD`` with exact ``MAXLEN``, ``PUBLISH``
                ``<offset>:<payload>``), no epoch, no expiry
``fcall-min~``  the same with approximate trimming (``MAXLEN ~``), which the history
                contract excludes today ("trimmed to exactly this many")
``hub_publish`` ``FCALL hub_publish 1 <K> <payload> <size> <ttl>``: the real one (version
                in ``functions.lua``; docs/history-format.md)
``fcall-batch`` ``FCALL hubfloor_batch 1 <K> <payload> x batch``: what the real one does,
                for ``--batch`` messages of one channel in one call (one ``HMGET``, one
                ``HINCRBY`` by the batch, a ``XADD`` and a ``PUBLISH`` per message, the two
                ``PEXPIRE`` once): per message
==============  =========================================================================

Printed: a table (calls, Redis CPU us per message, usec per call from commandstats, the ratio
to ``publish``), and ``OUT/lua_floor.json`` (``--out``, default
``bench/results/lua-floor-<UTC>/``). Figures, never asserted; docs/benchmarks.md "History
and recovery under load" has a run and what it means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import redis

from hub.history.redis import LIBRARY_CODE

from .procs import RedisServer

__all__ = ["FLOOR_LIBRARY", "main"]

#: The probe library: smaller functions than ``hub_publish``, same key layout.
FLOOR_LIBRARY = r"""#!lua name=hubfloor
local function base(keys) return '{' .. keys[1] .. '}' end

redis.register_function('hubfloor_empty', function(keys, args) return 0 end)

redis.register_function('hubfloor_publish', function(keys, args)
  return redis.call('PUBLISH', base(keys) .. ':h', args[1])
end)

redis.register_function('hubfloor_min', function(keys, args)
  local b = base(keys)
  local offset = redis.call('HINCRBY', b .. ':m', 'o', 1)
  local id = string.format('%d', offset)
  redis.call('XADD', b .. ':s', 'MAXLEN', 100, id .. '-0', 'd', args[1])
  redis.call('PUBLISH', b .. ':h', id .. ':' .. args[1])
  return offset
end)

redis.register_function('hubfloor_min_approx', function(keys, args)
  local b = base(keys)
  local offset = redis.call('HINCRBY', b .. ':m', 'o', 1)
  local id = string.format('%d', offset)
  redis.call('XADD', b .. ':s', 'MAXLEN', '~', 100, id .. '-0', 'd', args[1])
  redis.call('PUBLISH', b .. ':h', id .. ':' .. args[1])
  return offset
end)

redis.register_function('hubfloor_batch', function(keys, args)
  local b = base(keys)
  local got = redis.call('HMGET', b .. ':m', 'o', 'e')
  local epoch = got[2] or 'e'
  local last = redis.call('HINCRBY', b .. ':m', 'o', #args)
  local first = last - #args
  for i = 1, #args do
    local id = string.format('%d', first + i)
    redis.call('XADD', b .. ':s', 'MAXLEN', 100, id .. '-0', 'd', args[i])
    redis.call('PUBLISH', b .. ':h', id .. ':' .. epoch .. ':' .. args[i])
  end
  redis.call('PEXPIRE', b .. ':s', 600000)
  redis.call('PEXPIRE', b .. ':m', 2592000000)
  return last
end)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lua_floor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50000, help="calls per command (50000)")
    p.add_argument("--pipeline", type=int, default=1, help="commands in flight (1)")
    p.add_argument("--size", type=int, default=100, help="payload bytes (100)")
    p.add_argument("--batch", type=int, default=10, help="messages per fcall-batch call (10)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each command (2; median)")
    p.add_argument("--out", default=None, help="output directory")
    return p


class _Drain(threading.Thread):
    """One subscriber connection that reads and drops everything Redis delivers to it."""

    def __init__(self, port: int, channels: list[str]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        parts = ["SUBSCRIBE", *channels]
        cmd = f"*{len(parts)}\r\n" + "".join(f"${len(x)}\r\n{x}\r\n" for x in parts)
        self.sock.sendall(cmd.encode())
        self.received = 0

    def run(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                self.received += len(chunk)
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()


def _cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _one(client: redis.Redis, port: int, name: str, argv: list[str], per_call: int,
         args: argparse.Namespace, idle_per_s: float) -> dict[str, Any]:
    binary = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    client.config_resetstat()
    before, start = _cpu(client), time.monotonic()
    subprocess.run([binary, "-p", str(port), "-n", str(args.requests), "-c", "1",
                    "-P", str(args.pipeline), "-q", *argv],
                   check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    cpu = _cpu(client) - before - idle_per_s * elapsed
    stats = client.info("commandstats")
    inside = {k.removeprefix("cmdstat_"): v for k, v in stats.items()
              if k not in ("cmdstat_config", "cmdstat_info")}
    top = argv[0].lower()
    usec = float(inside.get(top, {}).get("usec_per_call", 0.0))
    messages = args.requests * per_call
    return {"command": name, "calls": args.requests, "messages": messages,
            "seconds": elapsed, "redis_cpu_s": cpu,
            "cpu_us_per_message": cpu / messages * 1e6,
            "usec_per_call": usec, "usec_per_message": usec / per_call,
            "inside": {k: {"calls": v.get("calls"), "usec_per_call": v.get("usec_per_call")}
                       for k, v in inside.items()}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join("bench", "results",
                                   time.strftime("lua-floor-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    payload = "x" * args.size
    key = "floor"
    commands: list[tuple[str, list[str], int]] = [
        ("publish", ["PUBLISH", key, payload], 1),
        ("fcall-empty", ["FCALL", "hubfloor_empty", "1", key], 1),
        ("fcall-pub", ["FCALL", "hubfloor_publish", "1", key, payload], 1),
        ("fcall-min", ["FCALL", "hubfloor_min", "1", key, payload], 1),
        ("fcall-min~", ["FCALL", "hubfloor_min_approx", "1", key, payload], 1),
        ("hub_publish", ["FCALL", "hub_publish", "1", key, payload, "100", "600"], 1),
        ("fcall-batch", ["FCALL", "hubfloor_batch", "1", key, *([payload] * args.batch)],
         args.batch),
    ]
    work = tempfile.mkdtemp(prefix="lua-floor-")
    server = RedisServer(work)
    drain = None
    try:
        client = redis.Redis(port=server.port)
        client.function_load(LIBRARY_CODE, replace=True)
        client.function_load(FLOOR_LIBRARY, replace=True)
        drain = _Drain(server.port, [key, "{floor}:h"])
        drain.start()
        time.sleep(0.2)
        before = _cpu(client)
        time.sleep(2.0)
        idle_per_s = (_cpu(client) - before) / 2.0
        runs = []
        for rep in range(args.repeat):
            for name, cmd, per in commands:
                row = _one(client, server.port, name, cmd, per, args, idle_per_s)
                row["repeat"] = rep
                runs.append(row)
                print(f"  {name:12} {row['cpu_us_per_message']:7.2f} us/msg Redis CPU "
                      f"({row['usec_per_call']:.2f} usec/call inside)", file=sys.stderr)
        info = client.info("server")
    finally:
        if drain is not None:
            drain.close()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    table = []
    for name, _, _ in commands:
        rows = sorted((r for r in runs if r["command"] == name),
                      key=lambda r: r["cpu_us_per_message"])
        table.append(rows[len(rows) // 2])
    base = table[0]["cpu_us_per_message"]
    print(f"redis {info.get('redis_version')}, {args.requests} calls each, pipeline "
          f"{args.pipeline}, {args.size}-byte payloads, batch {args.batch}, median of "
          f"{args.repeat}; idle {idle_per_s * 1e3:.2f} ms/s subtracted")
    print("| command | Redis CPU us/msg | x publish | usec/msg inside (commandstats) |")
    print("|---|---|---|---|")
    for row in table:
        print(f"| {row['command']} | {row['cpu_us_per_message']:.2f} | "
              f"{row['cpu_us_per_message'] / base:.2f}x | {row['usec_per_message']:.2f} |")
    with open(os.path.join(out, "lua_floor.json"), "w") as f:
        json.dump({"args": vars(args), "redis": info.get("redis_version"),
                   "idle_cpu_s_per_s": idle_per_s, "runs": runs, "table": table}, f, indent=1)
    print(f"written: {out}/lua_floor.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
