"""hub.recovery, pure: the merge of a history read with buffered live publications, and the
per-channel OffsetTracker. Property tests (hypothesis) against a brute-force oracle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.brokers.base import Publication
from hub.recovery import Hole, OffsetTracker, merge

EPOCH = "e1"


def pub(offset: int) -> Publication:
    return Publication("chat:a", b"m%d" % offset, offset, EPOCH)


@st.composite
def covered(draw):
    """A stream 1..n, the client's position, a read that covers since+1..top, and a live buffer
    from at most top+1 up to n with overlaps, duplicates, older offsets and reorderings."""
    n = draw(st.integers(0, 60))
    since = draw(st.integers(0, n))
    top = draw(st.integers(since, n))
    first_held = draw(st.integers(1, since + 1))
    history = [pub(o) for o in range(first_held, top + 1)]
    live_from = draw(st.integers(1, top + 1))
    live = [pub(o) for o in range(live_from, n + 1)]
    extra = draw(st.lists(st.integers(1, max(n, 1)), max_size=20)) if n else []
    live += [pub(o) for o in extra]
    live = draw(st.permutations(live))
    return n, since, top, history, live


@given(covered())
@settings(max_examples=300, deadline=None)
def test_covered_streams_are_delivered_exactly_once_in_order(case):
    n, since, top, history, live = case
    result = merge(since, history, top, live)
    assert result.hole is None
    assert [p.offset for p in result.publications] == list(range(since + 1, n + 1))
    assert result.offset == max(n, since)
    assert result.later == []


@st.composite
def anything(draw):
    n = draw(st.integers(0, 40))
    since = draw(st.integers(0, n))
    top = draw(st.integers(0, n))
    history = [pub(o) for o in sorted(draw(st.sets(st.integers(1, max(n, 1)))))] if n else []
    live = [pub(o) for o in draw(st.lists(st.integers(1, max(n, 1)), max_size=60))] if n else []
    return since, top, history, live


def oracle(since, top, history, live):
    offsets = {p.offset for p in [*history, *live]}
    newest = max([top, *offsets])
    run, o = [], since
    while o < newest and o + 1 in offsets:
        o += 1
        run.append(o)
    if o >= newest:
        return run, o, None, []
    last = o + 1
    while last + 1 <= newest and last + 1 not in offsets:
        last += 1
    return run, o, Hole(o + 1, last), sorted(x for x in offsets if x > last)


@given(anything())
@settings(max_examples=500, deadline=None)
def test_holes_are_reported_exactly(case):
    since, top, history, live = case
    result = merge(since, history, top, live)
    run, offset, hole, later = oracle(since, top, history, live)
    assert [p.offset for p in result.publications] == run
    assert result.offset == offset
    assert result.hole == hole
    assert [p.offset for p in result.later] == later


def test_a_hole_between_history_and_live():
    result = merge(3, [pub(4), pub(5)], 5, [pub(9), pub(8), pub(9)])
    assert [p.offset for p in result.publications] == [4, 5]
    assert result.hole == Hole(6, 7)
    assert [p.offset for p in result.later] == [8, 9]


def test_a_hole_at_the_top_of_the_read():
    result = merge(0, [pub(1)], 3, [])
    assert result.hole == Hole(2, 3) and result.offset == 1 and result.later == []


def test_the_history_copy_wins_over_a_live_duplicate():
    h = Publication("chat:a", b"from history", 1, EPOCH)
    result = merge(0, [h], 1, [pub(1)])
    assert result.publications == [h]


def test_a_publication_without_offset_is_refused():
    with pytest.raises(ValueError):
        merge(0, [], 0, [Publication("chat:a", b"x")])


def tracker_oracle(start, offsets):
    answers, last = [], start
    for o in offsets:
        if last is not None and o <= last:
            answers.append("duplicate")
            continue
        answers.append("deliver" if last is None or o == last + 1 else ("gap", last + 1, o - 1))
        last = o
    return answers, last


@given(st.one_of(st.none(), st.integers(0, 20)), st.lists(st.integers(1, 40), max_size=60))
@settings(max_examples=300, deadline=None)
def test_offset_tracker(start, offsets):
    tracker = OffsetTracker(start)
    answers = [tracker.accept(o) for o in offsets]
    expected, last = tracker_oracle(start, offsets)
    assert answers == expected
    assert tracker.last == last


def test_offset_tracker_examples():
    t = OffsetTracker(0)
    assert t.accept(1) == "deliver"
    assert t.accept(1) == "duplicate"
    assert t.accept(4) == ("gap", 2, 3)
    assert t.accept(3) == "duplicate"
    assert t.accept(5) == "deliver"
    t.reset(None)
    assert t.accept(100) == "deliver"
