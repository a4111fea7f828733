"""The supervisor's restart delay (pure function; the workers themselves are tested in
tests/system/test_workers.py)."""

from __future__ import annotations

from hub.supervisor import RESTART_BASE, RESTART_CAP, restart_delay


def test_restart_delay_is_capped_exponential_with_jitter():
    for failures in range(40):
        full = min(RESTART_CAP, RESTART_BASE * 2 ** failures)
        for _ in range(20):
            assert full / 2 <= restart_delay(failures) <= full
    assert RESTART_CAP / 2 <= restart_delay(10**6) <= RESTART_CAP
