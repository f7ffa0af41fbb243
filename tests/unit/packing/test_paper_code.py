"""The paper's released-code rules as mode knobs: hand-worked cases, fast path == literal loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pack.packing import paper_code
from megatron_pack.packing import reference as ref
from megatron_pack.packing.modes import get_mode
from megatron_pack.packing.plan import build_plan


def seqs(plan):
    return [plan.sequence(i).tolist() for i in range(plan.num_sequences)]


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_greedy_chunk_by_hand_with_silent_drop_counted(engine):
    # capacity 8, chunks of 3 in dataset order: [5, 9, 2] and [6, 3].
    # chunk 0 sorted 9 5 2: the sequence opened at 9 (over-long) takes 5 and 2; 9 is never placed.
    # chunk 1 sorted 6 3: 6 + 3 > 8, two sequences. Unchunked greedy would put 6 and 2 together.
    plan = build_plan([5, 9, 2, 6, 3], 8, "greedy:chunk=3", engine=engine)
    assert seqs(plan) == [[[0, 0, 5], [2, 0, 2]], [[3, 0, 6]], [[4, 0, 3]]]
    s = plan.stats
    assert (s.mode_dropped_docs, s.mode_dropped_tokens) == (1, 9)
    assert (s.dropped_docs, s.dropped_tokens, s.truncated_docs) == (1, 9, 0)  # --overlong truncate did not apply
    assert s.placed_tokens + s.dropped_tokens == s.total_tokens == 25
    # the same lengths without chunks: the over-long one is truncated by the policy, nothing dropped
    whole = build_plan([5, 9, 2, 6, 3], 8, "greedy", engine=engine)
    assert whole.stats.mode_dropped_docs == 0 and whole.stats.truncated_docs == 1


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_greedy_chunk_boundaries_keep_items_apart(engine):
    # capacity 10, chunk 2: [6, 3] [4, 1]. Across chunks 6+4 would fill one; within chunks they cannot meet.
    plan = build_plan([6, 3, 4, 1], 10, "greedy:chunk=2", engine=engine)
    assert seqs(plan) == [[[0, 0, 6], [1, 0, 3]], [[2, 0, 4], [3, 0, 1]]]
    # chunk >= n is first-fit decreasing over the whole set: 6+4, 3+1
    assert seqs(build_plan([6, 3, 4, 1], 10, "greedy:chunk=4", engine=engine)) == [
        [[0, 0, 6], [2, 0, 4]], [[1, 0, 3], [3, 0, 1]]]


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_greedy_chunk_scans_past_items_that_do_not_fit(engine):
    # capacity 10, one chunk, sorted 7 5 3: the sequence at 7 skips 5 and takes 3 (first fit),
    # where the paper's *text* (greedy, no chunk) closes it at 5: [7] [5 3].
    assert seqs(build_plan([5, 7, 3], 10, "greedy:chunk=1000", engine=engine)) == [
        [[1, 0, 7], [2, 0, 3]], [[0, 0, 5]]]
    assert seqs(build_plan([5, 7, 3], 10, "greedy", engine=engine)) == [[[1, 0, 7]], [[0, 0, 5], [2, 0, 3]]]


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_greedy_chunk_all_overlong_chunk_makes_no_sequence(engine):
    plan = build_plan([12, 11, 3], 10, "greedy:chunk=2", engine=engine)
    assert seqs(plan) == [[[2, 0, 3]]]
    assert (plan.stats.mode_dropped_docs, plan.stats.mode_dropped_tokens) == (2, 23)


@pytest.mark.parametrize("engine", ["cpp", "reference"])
def test_random_chunk_by_hand_remainders_dropped_and_counted(engine):
    # capacity 4, chunks of 2: [5, 9] -> 14 tokens, keep 12 = 3 blocks, doc 1 loses 2;
    # [2, 6] -> 8 tokens, 2 blocks; [3] -> shorter than one block: dropped whole.
    plan = build_plan([5, 9, 2, 6, 3], 4, "random:chunk=2", engine=engine)
    assert seqs(plan) == [[[0, 0, 4]], [[0, 4, 5], [1, 0, 3]], [[1, 3, 7]], [[2, 0, 2], [3, 0, 2]], [[3, 2, 6]]]
    s = plan.stats
    assert (s.mode_dropped_docs, s.mode_dropped_tokens, s.dropped_tokens) == (1, 5, 5)
    assert s.split_items == 3 and s.placed_tokens == 20
    assert all(n == 4 for n in plan.sequence_lengths())  # every block full


def test_random_chunk_is_dataset_order_and_does_not_depend_on_seed():
    mode = get_mode("random:chunk=3")
    assert not mode.shuffles and get_mode("random").shuffles
    a = build_plan([3, 4, 5, 6, 7, 8, 9], 5, mode, seed=1, epoch=0)
    b = build_plan([3, 4, 5, 6, 7, 8, 9], 5, mode, seed=2, epoch=3)
    np.testing.assert_array_equal(a.pieces, b.pieces)
    assert a.pieces[:, 0].tolist() == sorted(a.pieces[:, 0].tolist())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=60), st.integers(5, 30), st.integers(1, 25))
def test_fast_paths_equal_the_literal_loops(lengths, cap, chunk):
    """First-fit decreasing (fast) == the code's open-and-scan loop (literal), same order."""
    for fast, slow in ((paper_code.pack_greedy_chunked, ref.pack_greedy_chunked),):
        o1, f1 = fast(lengths, cap, chunk)
        o2, f2 = slow(lengths, cap, chunk)
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(f1, f2)
    r1, r2 = paper_code.pack_random_chunked(lengths, cap, chunk), ref.pack_random_chunked(lengths, cap, chunk)
    for x, y in zip(r1[:4], r2[:4]):
        np.testing.assert_array_equal(x, y)
    assert r1[4] == r2[4]


def test_fast_greedy_is_not_next_fit():
    """Negative control for the equality above: next-fit (the unchunked greedy) differs."""
    o1, f1 = paper_code.pack_greedy_chunked([5, 7, 3], 10, 1000)
    o2, f2 = ref.pack_greedy([5, 7, 3], 10)
    assert (o1.tolist(), f1.tolist()) != (o2.tolist(), f2.tolist())


def test_mode_spelling_and_errors():
    assert str(get_mode("greedy:chunk=1000")) == "greedy:chunk=1000" and str(get_mode("greedy")) == "greedy"
    assert str(get_mode("random:chunk=7")) == "random:chunk=7"
    assert str(get_mode("padding:pad_to=longest")) == "padding:pad_to=longest"
    assert get_mode("padding:pad_to=longest").pads_to_longest and not get_mode("padding").pads_to_longest
    assert get_mode("padding:pad_to=longest").key() == get_mode("padding").key()  # same plan, same cache file
    assert get_mode("greedy:chunk=5").keeps_overlong and not get_mode("greedy").keeps_overlong
    for bad, msg in (("greedy:chunk=x", "integer"), ("greedy:chunk=-1", ">= 0"), ("padding:pad_to=mean", "pad_to"),
                     ("random:window=3", "bad option")):
        with pytest.raises(ValueError, match=msg):
            get_mode(bad)
