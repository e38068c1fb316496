"""The pure scheduling module: chunks, windows and cuts as plain integers."""

import pytest
from hypothesis import given, strategies as st

from ignite_tbptt.schedule import (
    ARTBP, Chunk, Reach, check_steps, later_window_starts, plan_batch, plan_chunks, segment_spans,
)


def test_spec_example_table():
    # docs/contract.md: T = 10, k1 = 3, k2 = 5.
    assert [(c.start, c.stop, c.window_start) for c in plan_chunks(10, 3, 5)] == [
        (0, 3, 0), (3, 6, 1), (6, 9, 4), (9, 10, 7),
    ]


def test_k2_equal_k1_windows_are_the_chunks():
    assert all(c.window_start == c.start for c in plan_chunks(11, 4, 4))


def test_windows_of_a_later_batch_reach_back_into_the_stream():
    chunks = plan_chunks(6, 2, 9, offset=10)
    assert [c.window_start for c in chunks] == [3, 5, 7]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.window_start for c in plan_chunks(6, 2, 30, offset=10)] == [0, 0, 0]


@given(T=st.integers(1, 60), k1=st.integers(1, 9), extra=st.integers(0, 20))
def test_chunks_tile_the_sequence(T, k1, extra):
    chunks = plan_chunks(T, k1, k1 + extra)
    assert chunks[0].start == 0 and chunks[-1].stop == T
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert all(c.length == k1 for c in chunks[:-1]) and 1 <= chunks[-1].length <= k1
    assert all(c.stop - c.window_start <= k1 + extra for c in chunks)  # window length is at most k2
    assert all(c.window_start == max(0, c.start - extra) for c in chunks)


@given(T=st.integers(1, 60), k1=st.integers(1, 9), extra=st.integers(0, 20))
def test_later_window_starts_are_the_windows_of_later_chunks(T, k1, extra):
    chunks = plan_chunks(T, k1, k1 + extra)
    for c in chunks:
        expected = sorted({d.window_start for d in chunks[c.index + 1:] if d.window_start < c.stop})
        assert later_window_starts(c, T, k1, k1 + extra, stream=False) == expected


@given(T1=st.integers(1, 30), T2=st.integers(1, 30), k1=st.integers(1, 6), extra=st.integers(0, 12))
def test_streamed_later_starts_include_the_next_batch(T1, T2, k1, extra):
    # Two batches of a stream: the first batch must cut where any window of the second batch starts
    # inside it, as long as the second batch does not end before the windows that reach back.
    k2 = k1 + extra
    first, second = plan_chunks(T1, k1, k2), plan_chunks(T2, k1, k2, offset=T1)
    last = first[-1]
    got = later_window_starts(last, T1, k1, k2, stream=True)
    needed = {c.window_start for c in second if c.window_start < last.stop}
    assert needed <= set(got)
    assert got == sorted(got) and all(w < last.stop for w in got)


def test_segment_spans():
    assert segment_spans(0, 5, []) == [(0, 5)]
    assert segment_spans(0, 5, [0, 5, 7, -1]) == [(0, 5)]
    assert segment_spans(3, 9, [8, 4, 4]) == [(3, 4), (4, 8), (8, 9)]


def test_check_steps():
    check_steps(1, 1)
    with pytest.raises(ValueError, match="tbtt_step must be >= 1"):
        check_steps(0, 3)
    with pytest.raises(TypeError, match="k2 must be an int"):
        check_steps(2, True)
    with pytest.raises(ValueError, match="at least one time step"):
        plan_chunks(0, 2, 2)


def test_chunk_length():
    assert Chunk(0, 4, 9, 2).length == 5


def test_a_batch_plan_carries_what_the_next_batch_plan_starts_from():
    fixed = plan_batch(7, 3, 2, 5, stream=True)
    assert (fixed.k2, fixed.truncations, fixed.reach) == (5, None, None)
    assert [c.window_start for c in fixed.chunks] == [0, 2, 4, 6]
    assert [fixed.later_of(c) for c in fixed.chunks] == [[2, 4], [4, 6], [6, 7], [7, 9]]  # 7, 9: the next batch's
    random = plan_batch(7, 0, 2, ARTBP(0.5, seed=3), stream=True)
    assert random.k2 is None and random.truncations is not None and random.reach is None
    per_batch = plan_batch(8, 8, 2, Reach(overlap=1, next_overlap=5, floor=7), stream=True)
    assert per_batch.k2 == 3 and per_batch.reach == Reach(5, 5, 11) and per_batch.truncations is None
