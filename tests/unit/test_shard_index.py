"""shard_index: pinned values, range and spread, and how few channels move when shards change
(pure functions; the end-to-end sharding tests are in tests/system/test_sharding.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from hub.sharding import shard_index


def test_shard_index_pinned_values():
    """Changing the function moves channels in every deployment: these values must not move."""
    assert [shard_index("news", n) for n in (1, 2, 3, 4, 5, 8)] == [0, 1, 1, 1, 1, 6]
    assert [shard_index("chat:lobby", n) for n in (1, 2, 3, 4, 5, 8)] == [0, 1, 2, 2, 4, 5]
    assert [shard_index("user:alice", n) for n in (2, 3, 8)] == [0, 0, 0]
    assert [shard_index("a", n) for n in (2, 3, 4, 8)] == [1, 1, 3, 3]


def test_shard_index_range_and_spread():
    names = [f"c{i}" for i in range(20000)]
    assert {shard_index(c, 1) for c in names} == {0}
    for shards in (2, 3, 5, 8):
        counts = Counter(shard_index(c, shards) for c in names)
        assert set(counts) == set(range(shards))
        share = len(names) / shards
        for count in counts.values():  # binomial sd is under 1% of share here
            assert 0.9 * share < count < 1.1 * share, (shards, counts)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_appending_a_shard_moves_about_one_in_n_plus_1(shards):
    names = [f"c{i}" for i in range(20000)]
    moved = [c for c in names if shard_index(c, shards) != shard_index(c, shards + 1)]
    assert all(shard_index(c, shards + 1) == shards for c in moved)  # only to the new one
    expected = len(names) / (shards + 1)
    assert 0.9 * expected < len(moved) < 1.1 * expected


def test_removing_the_last_shard_moves_only_its_channels():
    names = [f"c{i}" for i in range(5000)]
    for c in names:
        if shard_index(c, 4) != 3:
            assert shard_index(c, 3) == shard_index(c, 4)
