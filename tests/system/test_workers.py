"""``hub serve --workers N``: worker processes on one port (SO_REUSEPORT) under a supervisor.

Real ``hub serve --workers 2`` processes against a real redis-server. Which worker holds a
connection is read from the kernel (psutil): the worker whose socket has the client's local port
as its remote port. The supervisor's restart and stop logic is also run with a stand-in for
``hub.server.run`` (a worker that crashes at once, one that ignores SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from hub.supervisor import RESTART_BASE
from tests.helpers import (
    ROOT,
    free_port,
    open_ws,
    recv_json,
    run_python,
    subscribe,
    wait_until,
    wait_until_async,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads "
                                "connections over listeners on Linux only")

CLIENTS = 40


def workers(hub) -> list[int]:
    """Pids of the supervisor's live worker processes."""
    pids = []
    for child in psutil.Process(hub.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def peers_by_worker(pids: list[int], port: int) -> dict[int, set[int]]:
    """For each worker pid: the remote ports of its established connections on ``port``."""
    out: dict[int, set[int]] = {}
    for pid in pids:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        out[pid] = {c.raddr.port for c in conns
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port and c.raddr}
    return out


def worker_of(ws: ClientConnection, peers: dict[int, set[int]]) -> int:
    [pid] = [pid for pid, ports in peers.items() if ws.local_address[1] in ports]
    return pid


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port``."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


async def connect_many(url: str, count: int) -> list[ClientConnection]:
    clients = [await open_ws(url) for _ in range(count)]
    for ws in clients:
        await subscribe(ws, "news")
    return clients


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


async def start_workers(hub_factory, redis_server, *args: str):
    hub = hub_factory("--workers", "2", *args, redis=redis_server)
    pids = await wait_until_async(lambda: len(w := workers(hub)) == 2 and w, 15,
                                  what="two workers")
    # Both listening: the hub's own readiness only proves that one of them is.
    await wait_until_async(lambda: all(any(c.status == psutil.CONN_LISTEN
                                           and c.laddr.port == hub.port
                                           for c in psutil.Process(pid).net_connections(kind="tcp"))
                                       for pid in pids), 15, what="both workers listening")
    return hub, pids


async def test_workers_share_the_port_and_deliver_across_workers(redis_server, hub_factory):
    hub, pids = await start_workers(hub_factory, redis_server, "--client-publish", "room*")
    clients = await connect_many(hub.ws_url + "?user=alice", CLIENTS)
    try:
        peers = peers_by_worker(pids, hub.port)
        on = {pid: [ws for ws in clients if worker_of(ws, peers) == pid] for pid in pids}
        # The kernel spread the connections: both workers hold some (all on one: p = 2**-39).
        assert all(on[pid] for pid in pids), {pid: len(c) for pid, c in on.items()}
        assert sum(len(c) for c in on.values()) == CLIENTS

        # A backend publication reaches every client on both workers, once per worker process.
        redis = redis_server.client()
        assert redis.publish("hub:news", json.dumps({"n": 1})) == 2
        assert redis.publish("hub:user:alice", json.dumps({"n": 2})) == 2
        for ws in clients:
            assert await recv_json(ws) == {"type": "message", "channel": "news", "data": {"n": 1}}
            assert await recv_json(ws) == {"type": "message", "channel": "user:alice",
                                           "data": {"n": 2}}

        # A client on one worker publishes; a client on the other worker receives it.
        sender, receiver = on[pids[0]][0], on[pids[1]][0]
        await subscribe(receiver, "room1", id=2)
        await sender.send(json.dumps({"op": "publish", "channel": "room1", "data": "hi", "id": 3}))
        assert await recv_json(sender) == {"type": "ack", "id": 3}
        got = await recv_json(receiver)
        assert got == {"type": "message", "channel": "room1", "data": "hi",
                       "from": {"user": "alice", "client": got["from"]["client"]}}, got
    finally:
        await close_all(clients)


async def test_a_killed_worker_is_restarted(redis_server, hub_factory):
    hub, pids = await start_workers(hub_factory, redis_server)
    clients = await connect_many(hub.ws_url, CLIENTS)
    reconnected: list[ClientConnection] = []
    try:
        peers = peers_by_worker(pids, hub.port)
        victim, survivor = pids
        lost = [ws for ws in clients if worker_of(ws, peers) == victim]
        kept = [ws for ws in clients if ws not in lost]
        assert lost and kept

        os.kill(victim, signal.SIGKILL)
        for ws in lost:
            with pytest.raises(ConnectionClosed):
                await recv_json(ws, timeout=10)
        new = await wait_until_async(
            lambda: len(w := workers(hub)) == 2 and victim not in w and w, 20,
            what="a new worker in place of the killed one")
        [replacement] = set(new) - {survivor}
        assert hub.http_get("/healthz")[0] == 200
        assert re.search(rf"worker \d \(pid {victim}\) killed by SIGKILL after [\d.]+ s; "
                         rf"restarting in [\d.]+ s", hub.log_text())

        # The lost clients reconnect to the same port; the new worker takes its share.
        await wait_until_async(lambda: any(c.status == psutil.CONN_LISTEN
                                           and c.laddr.port == hub.port
                                           for c in psutil.Process(replacement).net_connections(
                                               "tcp")),
                               15, what="the new worker listening")
        reconnected = await connect_many(hub.ws_url, len(lost))
        more = await connect_many(hub.ws_url, CLIENTS)
        reconnected += more
        peers = peers_by_worker([survivor, replacement], hub.port)
        assert any(worker_of(ws, peers) == replacement for ws in reconnected)

        redis = redis_server.client()
        assert redis.publish("hub:news", json.dumps({"after": "restart"})) == 2
        for ws in kept + reconnected:
            assert await recv_json(ws) == {"type": "message", "channel": "news",
                                           "data": {"after": "restart"}}
    finally:
        await close_all(clients + reconnected)


async def test_sigterm_stops_every_worker_and_exits_0(redis_server, hub_factory):
    hub, pids = await start_workers(hub_factory, redis_server, "--shutdown-timeout", "5")
    clients = await connect_many(hub.ws_url, CLIENTS)
    peers = peers_by_worker(pids, hub.port)
    assert {worker_of(ws, peers) for ws in clients} == set(pids)

    hub.terminate()
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(ws, timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    code = await asyncio.to_thread(hub.wait, 20)
    assert code == 0, hub.log_text()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    log = hub.log_text()
    for pid in pids:
        assert re.search(rf"worker \d \(pid {pid}\) exited with code 0", log), log
    assert "SIGKILL" not in log


async def test_workers_start_at_once_where_a_single_process_hub_left_time_wait(redis_server,
                                                                              hub_factory):
    port = free_port()
    single = hub_factory(redis=redis_server, port=port)
    clients = await connect_many(single.ws_url, 3)
    single.terminate()
    for ws in clients:  # the hub closes first, so the TIME-WAIT sockets are on its port
        with pytest.raises(ConnectionClosed):
            await recv_json(ws, timeout=10)
    assert await asyncio.to_thread(single.wait, 20) == 0
    assert any(c.status == psutil.CONN_TIME_WAIT and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp"))

    # SO_REUSEADDR (asyncio's default for the workers' listeners, and the pre-bind check's
    # too) passes those TIME-WAIT sockets: the workers come up now, not a minute later.
    hub = hub_factory("--workers", "2", redis=redis_server, port=port)
    async with open_ws(hub.ws_url) as ws:
        await subscribe(ws, "news")


async def test_a_second_supervisor_on_a_hub_s_port_is_refused_unless_share_port(redis_server,
                                                                               hub_factory):
    first, first_pids = await start_workers(hub_factory, redis_server)
    args = ("-m", "hub", "serve", "--workers", "2", "--port", str(first.port), "--redis-url",
            redis_server.url)
    result = await asyncio.to_thread(run_python, *args)
    assert result.returncode == 2
    assert result.stderr == (f"hub: processes already listen on 127.0.0.1:{first.port} with "
                             "SO_REUSEPORT (another hub?); stop them or choose another --port, "
                             "or give --share-port to join them (a rolling restart)\n")
    assert workers(first) == first_pids

    # --share-port: a rolling restart. The new hub joins, the old one leaves, no gap.
    second = hub_factory("--workers", "2", "--share-port", redis=redis_server, port=first.port)
    second_pids = await wait_until_async(lambda: len(w := workers(second)) == 2 and w, 15,
                                         what="two workers")
    await wait_until_async(lambda: all(listening(pid, first.port) for pid in second_pids), 15,
                           what="the new workers listening")
    clients = await connect_many(first.ws_url, CLIENTS)
    try:
        peers = peers_by_worker(first_pids + second_pids, first.port)
        # Four listeners share the port: both hubs get clients (all on one: p = 2**-39).
        held = {worker_of(ws, peers) for ws in clients}
        assert held & set(first_pids) and held & set(second_pids), held
    finally:
        await close_all(clients)
    first.terminate()
    assert await asyncio.to_thread(first.wait, 20) == 0
    async with open_ws(first.ws_url) as ws:
        await subscribe(ws, "news")
        assert worker_of(ws, peers_by_worker(second_pids, first.port)) in second_pids


def test_share_port_with_a_single_process_hub_that_does_not_share_exits_2(redis_server,
                                                                           hub_factory):
    single = hub_factory(redis=redis_server)
    result = run_python("-m", "hub", "serve", "--workers", "2", "--share-port", "--port",
                     str(single.port), "--redis-url", redis_server.url)
    assert result.returncode == 2
    assert result.stderr.startswith(f"hub: cannot listen on 127.0.0.1:{single.port}: Address "
                                    "already in use (with SO_REUSEPORT"), result.stderr
    assert len(result.stderr.splitlines()) == 1


async def test_single_process_hubs_share_the_port_with_share_port(redis_server, hub_factory):
    first = hub_factory("--share-port", redis=redis_server)
    second = hub_factory("--share-port", redis=redis_server, port=first.port)
    # /readyz may have been answered by the first hub: wait for the second's own listener.
    await wait_until_async(lambda: listening(second.pid, first.port), 15,
                           what="the second hub listening")
    async with open_ws(first.ws_url) as ws:
        await subscribe(ws, "news")
    first.terminate()
    assert await asyncio.to_thread(first.wait, 20) == 0
    assert second.proc.poll() is None
    async with open_ws(first.ws_url) as ws:
        await subscribe(ws, "news")


def test_workers_without_redis_exit_2():
    result = run_python("-m", "hub", "serve", "--workers", "2", "--port", "8765")
    assert result.returncode == 2
    assert "--workers above 1 needs --redis-url" in result.stderr


def test_workers_on_port_0_exit_2(redis_server):
    result = run_python("-m", "hub", "serve", "--workers", "2", "--port", "0",
                     "--redis-url", redis_server.url)
    assert result.returncode == 2
    assert "--port 0 cannot be used with --workers 2" in result.stderr


def test_workers_on_a_taken_port_exit_2(redis_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_python("-m", "hub", "serve", "--workers", "2", "--port", str(port),
                         "--redis-url", redis_server.url)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# -- the supervisor with a stand-in worker --------------------------------------------------------

STAND_IN = textwrap.dedent("""
    import os, signal, sys, time, types
    import hub.server
    def run(config, *, reuse_port=False):
        assert reuse_port and config.workers == 1
        if os.environ["STAND_IN"] == "crash":
            return 3
        if os.environ["STAND_IN"] == "ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that never stops
        time.sleep(60)
        return 0
    hub.server.run = run
    from hub.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start_stand_in(kind: str, *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    clean.update(PYTHONPATH=str(ROOT) + os.pathsep + clean.get("PYTHONPATH", ""), STAND_IN=kind)
    return subprocess.Popen([sys.executable, "-c", STAND_IN, "serve", "--workers", "2",
                             "--port", str(free_port()), "--redis-url", "redis://127.0.0.1:1/0",
                             *args], stderr=subprocess.PIPE, text=True, env=clean, cwd=ROOT)


def stop_stand_in(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_crash_looping_workers_are_restarted_ever_more_slowly():
    proc = start_stand_in("crash")
    time.sleep(6)
    code, log = stop_stand_in(proc)
    assert code == 0
    delays = [float(d) for d in re.findall(r"worker 1 \(pid \d+\) exited with code 3 after "
                                           r"[\d.]+ s; restarting in ([\d.]+) s", log)]
    # Within 6 s: 2 or 3 exits, restarted after 1-2 s, then 2-4 s, then 4-8 s: no hot loop.
    assert 2 <= len(delays) <= 3, log
    for n, delay in enumerate(delays, 1):
        assert RESTART_BASE * 2 ** n / 2 - 0.05 <= delay <= RESTART_BASE * 2 ** n + 0.05, delays
    assert len(re.findall(r"worker 1 started", log)) == len(delays), log


def test_stragglers_are_killed_after_the_shutdown_timeout():
    proc = start_stand_in("ignore-term", "--shutdown-timeout", "0")
    time.sleep(2)
    pids = [p.pid for p in psutil.Process(proc.pid).children()]
    assert len(pids) == 2
    code, log = stop_stand_in(proc)
    assert code == 0, log
    assert len(re.findall(r"still running after 5.0 s: SIGKILL", log)) == 2, log
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_a_killed_supervisor_takes_its_workers_along():
    # Workers that ignore SIGTERM, like one already in its graceful stop, must go too.
    proc = start_stand_in("ignore-term")
    time.sleep(2)
    workers = [psutil.Process(p.pid) for p in psutil.Process(proc.pid).children()]

    def exited(worker: psutil.Process) -> bool:
        try:
            return worker.status() == psutil.STATUS_ZOMBIE  # not reaped by init: gone too
        except psutil.NoSuchProcess:
            return True

    try:
        assert len(workers) == 2
        proc.kill()
        proc.wait(10)  # not communicate(): surviving workers would hold its stderr open
        # PR_SET_PDEATHSIG: the kernel SIGKILLs each worker when the supervisor dies.
        wait_until(lambda: all(exited(w) for w in workers), 10, interval=0.1,
                   what="every worker gone with its supervisor")
    finally:
        for worker in workers:
            if not exited(worker):
                worker.kill()
        proc.kill()
        proc.communicate(timeout=10)
