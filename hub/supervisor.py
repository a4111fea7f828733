"""``hub serve --workers N``: N hub processes sharing one port, kept alive by a supervisor.

Each worker is a whole hub (:func:`hub.server.run` with ``reuse_port=True``): its own event
loop, registry and Redis connection. The kernel spreads new connections over the workers'
listening sockets (SO_REUSEPORT, Linux), and Redis carries every publication to every worker,
so a client may land on any worker. The supervisor itself serves nothing; it only

* starts the workers and logs one line per worker start and per worker exit;
* restarts a worker that exits while the hub is running, after a capped exponential delay
  with jitter (:func:`restart_delay`); a worker that keeps crashing is retried ever more
  slowly, up to once per :data:`RESTART_CAP` seconds, and never given up;
* on SIGTERM or SIGINT sends SIGTERM to every worker (each closes its clients with 1001),
  waits up to ``shutdown_timeout`` + :data:`STOP_MARGIN` seconds, SIGKILLs the stragglers
  and returns 0.

Workers are started with the ``fork`` start method: the supervisor is single-threaded and
holds no event loop, socket or Redis connection when it forks, so a fork is safe; it is
cheap, keeps the logging set up by :mod:`hub.cli`, and needs no pickling of the config.
``spawn`` would re-import hub in every worker and leave logging unconfigured there.
Each worker asks the kernel for SIGKILL when the supervisor dies (Linux
``PR_SET_PDEATHSIG``), so a supervisor killed with SIGKILL leaves no orphan holding the port.
SIGKILL, not SIGTERM: a worker may already be in its graceful stop (the supervisor was killed
while waiting for it) and would ignore a second SIGTERM.

Before it forks, the supervisor checks what would make every worker fail: the TLS files, and
the address (:func:`_check_bind`). SO_REUSEPORT would also let the workers join the listeners
of a hub already running on the port, so that a forgotten deployment keeps taking a share of
the traffic; the supervisor refuses such a port unless ``--share-port`` asks for exactly that
(a rolling restart: start the new hub with ``--share-port``, then stop the old one).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from redis.backoff import EqualJitterBackoff

from .config import Config, address_error
from .exceptions import ConfigError

__all__ = ["restart_delay", "run_workers"]

logger = logging.getLogger("hub.supervisor")

RESTART_BASE = 1.0
"""Seconds: a worker that ran stably is restarted after 0.5 to 1 times this."""
RESTART_CAP = 30.0
"""Seconds: restarts of a crash-looping worker come at most this far apart (15 to 30 s)."""
STABLE_AFTER = 30.0
"""Seconds: a worker that ran this long before exiting counts as healthy, not crash-looping."""
STOP_MARGIN = 5.0
"""Seconds a graceful stop waits beyond ``shutdown_timeout`` before it SIGKILLs a worker."""

_PR_SET_PDEATHSIG = 1
_MAX_EXPONENT = 16  # 2**16 * RESTART_BASE is far past the cap; keeps 2**n from overflowing


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a worker that failed ``failures`` times in a row.

    ``failures`` >= 0 counts the exits, each after less than :data:`STABLE_AFTER` seconds of
    running, since the worker last ran stably. The delay is ``d/2 + uniform(0, d/2)`` with
    ``d = min(RESTART_CAP, RESTART_BASE * 2**failures)`` ("equal jitter"): never below
    ``RESTART_BASE / 2``, so there is no hot loop, and at most :data:`RESTART_CAP`.
    """
    backoff = EqualJitterBackoff(cap=RESTART_CAP, base=RESTART_BASE)
    return backoff.compute(min(failures, _MAX_EXPONENT))


def run_workers(config: Config) -> int:
    """Run ``config.workers`` hub processes on ``config.host:config.port`` until SIGTERM/SIGINT.

    Blocks; returns the exit code, 0 after a stop by signal (also when stragglers had to be
    killed). Raises :class:`ConfigError` (``hub serve`` exits 2) when ``config.port`` is 0,
    since every worker would get a different ephemeral port; when a TLS file is unusable;
    when the host does not resolve or the address cannot be bound with SO_REUSEPORT (in use
    by a process of another user or without SO_REUSEPORT, or not a local address); and when
    processes already listen on the address with SO_REUSEPORT, unless
    ``config.share_port``.
    """
    if config.port == 0:
        raise ConfigError(f"--port 0 cannot be used with --workers {config.workers}: each "
                          "worker would listen on a different ephemeral port; give a port")
    config.ssl_context()  # each worker loads the files again; fail here, once, if they are bad
    from .server import loop_runner

    loop_runner(config.loop)  # likewise for a --loop that is not installed
    _check_bind(config.host, config.port, share_port=config.share_port)
    if config.api_port is not None:  # the workers share it too (SO_REUSEPORT)
        if config.api_port == 0:
            raise ConfigError(f"--api-port 0 cannot be used with --workers {config.workers}: "
                              "each worker would listen on a different ephemeral port")
        _check_bind(config.api_host, config.api_port, share_port=config.share_port,
                    flag="--api-port")
    return _Supervisor(config).run()


def _check_bind(host: str, port: int, *, share_port: bool = False, flag: str = "--port"
                ) -> None:
    """Fail early, with one clear :class:`ConfigError`, where every worker would fail to
    listen on ``host:port``, or would join processes already listening there (SO_REUSEPORT)
    while ``share_port`` is False (``flag`` names the port's option in the message).

    Whether something listens is asked of the kernel with a bind, not a connect: a connect
    that succeeds only says that something answers (perhaps through a wildcard address or a
    NAT rule), does not say whether it uses SO_REUSEPORT, and talks to it. Linux refuses a
    bind without SO_REUSEPORT to an address a socket LISTENs on, even with SO_REUSEADDR, while
    SO_REUSEADDR lets a bind pass the TIME-WAIT connections an earlier hub left on the port
    (workers get SO_REUSEADDR from asyncio and uvloop too). So: a bind with SO_REUSEADDR only
    that fails with EADDRINUSE means the port is taken; a second bind that adds SO_REUSEPORT
    and succeeds means it is taken by SO_REUSEPORT listeners of this user, which the workers
    would join. There is a race (a process may start listening between this check and the
    workers' binds); the check is for the operator's mistake, not for an adversary.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise address_error(host, port, exc) from None
    for family, type_, proto, _, address in infos:
        error = _bind_error(family, type_, proto, address, reuse_port=False)
        if error is None:
            continue  # nothing listens there
        if error.errno != errno.EADDRINUSE:
            raise address_error(host, port, error)
        error = _bind_error(family, type_, proto, address, reuse_port=True)
        if error is not None:
            reason = address_error(host, port, error)
            raise ConfigError(f"{reason} (with SO_REUSEPORT: the port is held by a process "
                              "of another user or without SO_REUSEPORT)")
        if not share_port:
            raise ConfigError(f"processes already listen on {host}:{port} with SO_REUSEPORT "
                              f"(another hub?); stop them or choose another {flag}, or give "
                              "--share-port to join them (a rolling restart)")


def _bind_error(family: int, type_: int, proto: int, address: tuple[Any, ...], *,
                reuse_port: bool) -> OSError | None:
    """The error of binding a fresh socket (SO_REUSEADDR, and SO_REUSEPORT when
    ``reuse_port``) to ``address``; None when the bind succeeds. The socket is closed again."""
    with socket.socket(family, type_, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


@dataclass
class _Slot:
    """One worker place: the process filling it now, or when the next one starts."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0  # time.monotonic() of the last start
    failures: int = 0  # quick exits in a row, see restart_delay()
    restart_at: float | None = None  # time.monotonic() of the next start, None: not pending


class _Supervisor:
    def __init__(self, config: Config) -> None:
        self.worker_config = config.replace(workers=1)
        self.slots = [_Slot(i + 1) for i in range(config.workers)]
        self.stop_timeout = config.shutdown_timeout + STOP_MARGIN
        self.context = multiprocessing.get_context("fork")
        self.signals: list[int] = []
        self.pid = os.getpid()
        # Signals write a byte here (signal.set_wakeup_fd) to wake the wait for worker exits.
        self.wake_r, self.wake_w = socket.socketpair()

    def run(self) -> int:
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(self.wake_w.fileno())
        old_handlers = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            c = self.worker_config
            logger.info("supervisor pid %d: %d workers on %s:%d", self.pid, len(self.slots),
                        c.host, c.port)
            for slot in self.slots:
                self._start(slot)
            self._supervise()
            self._stop()
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            self.wake_r.close()
            self.wake_w.close()
        logger.info("supervisor pid %d: stopped", self.pid)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _supervise(self) -> None:
        """Reap and restart workers until a stop signal arrives."""
        while not self.signals:
            pending = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
            multiprocessing.connection.wait([self.wake_r, *self._sentinels()], timeout)
            self._drain_wakeups()
            if self.signals:
                return
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and slot.process.exitcode is not None:
                    ran = now - slot.started
                    slot.failures = slot.failures + 1 if ran < STABLE_AFTER else 0
                    delay = restart_delay(slot.failures)
                    self._reaped(slot, f"after {ran:.1f} s; restarting in {delay:.1f} s")
                    slot.restart_at = now + delay
                elif slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)

    def _stop(self) -> None:
        """SIGTERM every worker, wait for them, SIGKILL those still running at the deadline."""
        live = [(s, s.process) for s in self.slots if s.process is not None]
        logger.info("supervisor pid %d: %s, stopping %d workers (SIGTERM, up to %.1f s)",
                    self.pid, signal.Signals(self.signals[0]).name, len(live), self.stop_timeout)
        for _, process in live:
            process.terminate()
        deadline = time.monotonic() + self.stop_timeout
        while live and (remaining := deadline - time.monotonic()) > 0:
            multiprocessing.connection.wait([p.sentinel for _, p in live], remaining)
            self._drain_wakeups()
            for slot, process in [(s, p) for s, p in live if p.exitcode is not None]:
                self._reaped(slot, "")
                live.remove((slot, process))
        for slot, process in live:
            logger.warning("worker %d (pid %s) still running after %.1f s: SIGKILL", slot.index,
                           process.pid, self.stop_timeout)
            process.kill()
            process.join()
            self._reaped(slot, "")

    def _start(self, slot: _Slot) -> None:
        process = self.context.Process(target=self._worker, name=f"hub-worker-{slot.index}",
                                       args=(slot.index,))
        process.start()
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
        logger.info("worker %d started (pid %s)", slot.index, process.pid)

    def _reaped(self, slot: _Slot, then: str) -> None:
        """Log the exit of ``slot``'s process (already exited) and release it."""
        assert slot.process is not None
        code = slot.process.exitcode
        assert code is not None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        logger.log(logging.INFO if code == 0 or not then else logging.WARNING,
                   "worker %d (pid %s) %s%s", slot.index, slot.process.pid, how,
                   f" {then}" if then else "")
        slot.process.close()
        slot.process = None

    def _sentinels(self) -> list[int]:
        return [s.process.sentinel for s in self.slots if s.process is not None]

    def _drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _worker(self, index: int) -> None:
        """The body of worker ``index`` (in the forked child): run a hub until it stops."""
        signal.set_wakeup_fd(-1)
        self.wake_r.close()
        self.wake_w.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # hub.server.run installs its own handlers
        _die_with_parent(self.pid)
        from .server import run

        try:
            code = run(self.worker_config, reuse_port=True)
        except ConfigError as exc:  # the address was taken after _check_bind, say
            logger.error("worker %d: %s", index, exc)
            code = 2
        sys.exit(code)


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGKILL when the supervisor dies; exit now if it already has."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(0)
