"""Child processes of the benchmark: our own redis-server, the servers under test, psutil figures.

Every process started here is started in its own session and stopped by pid
(SIGTERM, then SIGKILL after a grace period) by :func:`stop`; nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

import psutil

__all__ = [
    "RedisServer",
    "cpu_seconds",
    "free_port",
    "raise_nofile",
    "rss_bytes",
    "start",
    "stop",
    "tree",
    "wait_port",
]


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until 127.0.0.1:port accepts TCP connections.

    Raises RuntimeError when ``proc`` exits first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start(args: Sequence[str], *, log_path: str, cwd: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` in a new session, stdout and stderr to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the child's lifetime
    try:
        return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        log.close()


def tree(proc: subprocess.Popen | psutil.Process) -> list[psutil.Process]:
    """The process and all its descendants that are alive now."""
    try:
        p = proc if isinstance(proc, psutil.Process) else psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Stop ``proc`` and its descendants by pid: SIGTERM, then SIGKILL after ``grace`` s."""
    if proc is None:
        return
    procs = tree(proc)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    with contextlib.suppress(Exception):
        proc.wait(timeout=1)


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` (processes that are gone count 0)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(procs: Sequence[psutil.Process]) -> int:
    """Resident set size of ``procs`` in bytes, summed."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class RedisServer:
    """A private ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="redis-", dir=workdir)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = start([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", self._dir],
                          log_path=os.path.join(self._dir, "redis.log"))
        try:
            wait_port(self.port, 10, self.proc)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)
