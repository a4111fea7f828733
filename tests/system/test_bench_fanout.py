"""Smoke test of ``python -m bench.fanout``: it completes at tiny sizes and prints its three
paths. Timings are figures, never asserted; the write system calls are counts: on Linux a
coalesced burst of 5 messages makes one write per connection where ``fan_out`` makes five.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def test_bench_fanout_completes_and_counts_write_syscalls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.fanout", "--clients", "10", "--messages", "20",
         "--repeat", "1", "--burst", "5"],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert set(lines) == {"broadcast", "fan_out", "burst"}, done.stdout
    calls = {name: float(re.search(r"([0-9.]+) write syscalls/delivery", line).group(1))
             for name, line in lines.items()}
    if os.path.exists("/proc/self/io"):
        assert calls["fan_out"] >= 0.99  # one write per message and connection
        assert calls["burst"] <= 0.21  # one per burst of 5 and connection
