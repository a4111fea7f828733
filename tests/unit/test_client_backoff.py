"""hub.client.policy: the backoff figures, the jitter bounds and the close-code policy
(docs/clients.md), and when a token is refreshed."""

from __future__ import annotations

import random

import pytest

from hub.client.client import refresh_delay
from hub.client.policy import Action, Backoff, for_close_code, for_status


def ceilings(backoff: Backoff, count: int, slow: bool = False) -> list[float]:
    out = []
    for _ in range(count):
        out.append(backoff.ceiling(slow))
        backoff.next_delay(slow)
    return out


def test_the_figures_double_from_a_quarter_second_up_to_ten():
    assert ceilings(Backoff(), 8) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_full_jitter_stays_within_zero_and_the_ceiling():
    rng = random.Random(7)
    backoff = Backoff(rng=rng.random)
    for _ in range(200):
        ceiling = backoff.ceiling()
        assert 0.0 <= backoff.next_delay() <= ceiling <= 10.0
    assert Backoff(rng=lambda: 0.0).next_delay() == 0.0
    assert Backoff(rng=lambda: 0.999999).next_delay() == pytest.approx(0.25, rel=1e-5)


def test_a_longer_backoff_is_four_times_the_ceiling_still_capped():
    assert ceilings(Backoff(), 5, slow=True) == [1.0, 2.0, 4.0, 8.0, 10.0]
    backoff = Backoff(rng=lambda: 1.0)
    assert backoff.next_delay(slow=True) == 1.0 and backoff.next_delay() == 0.5


def test_a_connection_up_ten_seconds_resets_the_count():
    backoff = Backoff()
    for _ in range(5):
        backoff.next_delay()
    backoff.connected_for(9.9)
    assert backoff.ceiling() == 8.0
    backoff.connected_for(10.0)
    assert backoff.attempts == 0 and backoff.ceiling() == 0.25


def test_bad_figures_are_refused():
    for bad in ({"min_delay": 0}, {"min_delay": 2, "max_delay": 1}, {"slow_factor": 0.5},
                {"reset_after": -1}):
        with pytest.raises(ValueError):
            Backoff(**bad)


POLICY = {
    None: Action.RECONNECT, 1001: Action.RECONNECT, 1006: Action.RECONNECT,
    1011: Action.RECONNECT, 1012: Action.RECONNECT, 1013: Action.RECONNECT,
    4005: Action.RECONNECT, 4008: Action.RECONNECT, 1000: Action.RECONNECT,
    4009: Action.RECONNECT_SLOW, 4029: Action.RECONNECT_SLOW,
    4001: Action.REFRESH_TOKEN,
    4002: Action.STOP, 4003: Action.STOP, 4006: Action.STOP, 4000: Action.STOP,
    4999: Action.STOP, 4400: Action.STOP, 1002: Action.STOP, 1007: Action.STOP,
    1008: Action.STOP, 1009: Action.STOP,
}


@pytest.mark.parametrize("code", list(POLICY), ids=str)
def test_close_code_policy(code):
    assert for_close_code(code) is POLICY[code]


@pytest.mark.parametrize(("status", "action"), [
    (401, Action.STOP), (403, Action.STOP), (400, Action.STOP), (404, Action.STOP),
    (426, Action.STOP), (429, Action.RECONNECT_SLOW), (503, Action.RECONNECT_SLOW),
    (500, Action.RECONNECT), (502, Action.RECONNECT), (504, Action.RECONNECT)])
def test_handshake_status_policy(status, action):
    assert for_status(status) is action


def test_4029_waits_longer_than_a_network_loss():
    normal, slow = Backoff(rng=lambda: 1.0), Backoff(rng=lambda: 1.0)
    for _ in range(3):
        assert (slow.next_delay(for_close_code(4029) is Action.RECONNECT_SLOW)
                > normal.next_delay(for_close_code(1006) is Action.RECONNECT_SLOW))


def test_refresh_comes_when_four_fifths_of_the_life_are_gone_at_most_30s_before_exp():
    assert refresh_delay(5.0) == pytest.approx(4.0)
    assert refresh_delay(100.0) == pytest.approx(80.0)
    assert refresh_delay(3600.0) == pytest.approx(3570.0)
    assert refresh_delay(-3.0) == 0.0
