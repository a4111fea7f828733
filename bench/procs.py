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
import redis

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
    """A private ``redis-server`` on a loopback port (a free one unless ``port`` is given), no
    persistence unless ``extra`` asks for it; its files and log under a fresh directory inside
    ``workdir``.

    Shared by the bench and the test suite (tests/helpers.py), which also kills it (SIGKILL),
    freezes it (SIGSTOP) and starts it again on the same port with the same options.
    :meth:`start` returns once the server answers PING; the server runs in its own session.
    """

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.extra = tuple(extra)
        self.proc: subprocess.Popen | None = None
        os.makedirs(workdir, exist_ok=True)
        # A port free_port() found may be taken before redis-server binds it (another
        # process's outgoing connection got it): with a port of our choosing, try another.
        for attempt in range(1 if port else 5):
            self.port = port or free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-", dir=workdir)
            self.log_path = os.path.join(self.dir, "redis.log")
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 4 or not self._port_taken():
                    raise

    def _port_taken(self) -> bool:
        """True when the log says the server could not bind its port."""
        try:
            with open(self.log_path, errors="replace") as log:
                return "Address already in use" in log.read()
        except OSError:
            return False

    def start(self) -> None:
        """Start the server (again, after :meth:`kill`) on the same port with the same options;
        return when it answers PING. Raises RuntimeError when it exits first, TimeoutError
        after 10 s."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = start([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", self.dir, *self.extra],
                          log_path=self.log_path)
        try:
            self._wait_pong(10)
        except BaseException:
            self.kill()
            raise

    def _wait_pong(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited with "
                                   f"{self.proc.returncode} (log: {self.log_path})")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.settimeout(0.5)
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on 127.0.0.1:{self.port} not answering PING after "
                           f"{timeout} s (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL the server (thawed first if frozen) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """:meth:`kill`, then :meth:`start` on the same port."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a :meth:`pause`d server (SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and remove its
        directory."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A redis-py client of this server."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def numsub(self, channel: str) -> int:
        """PUBSUB NUMSUB of ``channel``: how many connections subscribe to it."""
        return dict(self.client().pubsub_numsub(channel)).get(channel.encode(), 0)
