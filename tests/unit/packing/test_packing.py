"""Packing engine: C++ == Python reference, plan invariants, and the paper's rules by hand."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pack.packing import reference as ref
from megatron_pack.packing.modes import PACKING_MODES, WindowedBestFit, get_mode
from megatron_pack.packing.plan import apply_overlong, build_plan

MODES = ["padding", "greedy", "bfd", "windowed_bfd:window=7", "random"]


def random_turns(rng, lengths):
    """Turn starts for every conversation: 0 plus a few sorted offsets."""
    out = []
    for n in lengths:
        k = rng.integers(0, 5)
        extra = rng.integers(1, max(2, n), size=k) if n > 1 else []
        out.append(np.unique(np.concatenate([[0], extra])).astype(np.int32))
    return out


def check_invariants(plan, lengths, cap, overlong):
    """No sequence over capacity; every token placed once or accounted as dropped/truncated."""
    pieces = plan.pieces
    assert pieces.dtype == np.int64 and plan.seq_offsets.dtype == np.int64
    assert plan.seq_offsets[0] == 0 and plan.seq_offsets[-1] == len(pieces)
    assert np.all(np.diff(plan.seq_offsets) >= 1), "empty sequence"
    assert np.all(pieces[:, 1] < pieces[:, 2])
    assert plan.sequence_lengths().max(initial=0) <= cap
    s = plan.stats
    assert s.placed_tokens == int(plan.piece_lengths.sum())
    assert s.placed_tokens + s.truncated_tokens + s.dropped_tokens == s.total_tokens == int(lengths.sum())
    # per conversation, the pieces tile [0, kept) exactly once
    order = np.lexsort((pieces[:, 1], pieces[:, 0]))
    by_doc = {}
    for d, a, b in pieces[order].tolist():
        by_doc.setdefault(d, []).append((a, b))
    for d, n in enumerate(lengths.tolist()):
        if n == 0 or (overlong == "drop" and n > cap):
            assert d not in by_doc
            continue
        kept = min(n, cap) if overlong == "truncate" else n
        spans = by_doc[d]
        assert spans[0][0] == 0 and spans[-1][1] == kept
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def assert_same(a, b):
    np.testing.assert_array_equal(a.pieces, b.pieces)
    np.testing.assert_array_equal(a.seq_offsets, b.seq_offsets)
    assert a.stats == b.stats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overlong", ["truncate", "drop", "cut-at-turns"])
def test_cpp_equals_reference_seeded_sweep(mode, overlong):
    for trial in range(6):
        rng = np.random.default_rng(trial)
        cap = int(rng.integers(1, 64))
        n = int(rng.integers(0, 300))
        lengths = rng.integers(0, 2 * cap + 2, size=n)
        turns = random_turns(rng, lengths)
        kw = dict(seed=trial, epoch=trial % 2, overlong=overlong, turn_starts=turns)
        cpp = build_plan(lengths, cap, mode, engine="cpp", **kw)
        assert_same(cpp, build_plan(lengths, cap, mode, engine="reference", **kw))
        check_invariants(cpp, lengths, cap, overlong)
        assert_same(cpp, build_plan(lengths, cap, mode, **kw))  # deterministic


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=120),
    cap=st.integers(1, 32),
    mode=st.sampled_from(MODES + ["windowed_bfd:window=1"]),
    seed=st.integers(0, 2**63),
)
def test_cpp_equals_reference_hypothesis(lengths, cap, mode, seed):
    lengths = np.asarray(lengths, dtype=np.int64)
    cpp = build_plan(lengths, cap, mode, seed=seed)
    assert_same(cpp, build_plan(lengths, cap, mode, seed=seed, engine="reference"))
    check_invariants(cpp, lengths, cap, "truncate")


def test_shuffle_matches_reference_and_epochs_differ():
    from megatron_pack import _packing

    for n in (0, 1, 2, 17, 1000):
        np.testing.assert_array_equal(_packing.shuffle(n, 99), ref.shuffle(n, 99))
    p = ref.shuffle(1000, 5)
    assert sorted(p.tolist()) == list(range(1000)) and not np.array_equal(p, np.arange(1000))
    assert ref.derive_seed(1, 0) != ref.derive_seed(1, 1) != ref.derive_seed(2, 1)
    # splitmix64 known answer (seed 0, first output) from the reference paper's code
    assert ref.SplitMix64(0).next() == 0xE220A8397B1DCDAF


def test_greedy_is_the_papers_rule():
    # sorted 7 6 5 3 2 1: [7] (6 does not fit) [6] [5 3 2] ... close when the next does not fit
    plan = build_plan([5, 3, 7, 2, 6, 1], 10, "greedy")
    assert [plan.sequence(i)[:, 0].tolist() for i in range(plan.num_sequences)] == [[2], [4], [0, 1, 3], [5]]


def test_bfd_hand_example_and_beats_greedy():
    plan = build_plan([5, 3, 6, 2], 8, "bfd")
    assert plan.pieces.tolist() == [[2, 0, 6], [3, 0, 2], [0, 0, 5], [1, 0, 3]]
    assert plan.seq_offsets.tolist() == [0, 2, 4]
    # best fit: 3 goes to the bin with 3 left (after 7), not the emptier one (after 5)
    plan = build_plan([7, 5, 3], 10, "bfd")
    assert [plan.sequence(i)[:, 0].tolist() for i in range(plan.num_sequences)] == [[0, 2], [1]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 5000)
    bfd, greedy = build_plan(lengths, 512, "bfd"), build_plan(lengths, 512, "greedy")
    assert bfd.lower_bound_sequences <= bfd.num_sequences < greedy.num_sequences
    assert bfd.efficiency > 0.99


def test_padding_one_per_sequence():
    plan = build_plan([4, 0, 9, 2], 5, "padding")
    assert plan.pieces.tolist() == [[0, 0, 4], [2, 0, 5], [3, 0, 2]]
    assert plan.seq_offsets.tolist() == [0, 1, 2, 3]
    assert plan.stats.truncated_tokens == 4 and plan.stats.empty_docs == 1


def test_random_cuts_every_max_length_and_counts_splits():
    lengths = np.array([3, 3, 3, 2])
    plan = build_plan(lengths, 4, "random", seed=3)
    perm = ref.shuffle(4, ref.derive_seed(3, 0)).tolist()
    # walk the shuffled concatenation by hand
    stream = [(d, t) for d in perm for t in range(lengths[d])]
    expect = [stream[i : i + 4] for i in range(0, len(stream), 4)]
    got = [[(d, t) for d, a, b in plan.sequence(i).tolist() for t in range(a, b)] for i in range(plan.num_sequences)]
    assert got == expect
    cut = sum(1 for d in range(4) if (plan.doc == d).sum() > 1)
    assert plan.stats.split_items == cut > 0
    assert plan.sequence_lengths().tolist() == [4, 4, 3]


def test_shuffling_modes_change_with_epoch_and_seed():
    lengths = np.random.default_rng(1).integers(1, 100, 400)
    for mode in ("random", "windowed_bfd:window=50"):
        e0 = build_plan(lengths, 128, mode, seed=1, epoch=0)
        assert not np.array_equal(e0.pieces, build_plan(lengths, 128, mode, seed=1, epoch=1).pieces)
        assert not np.array_equal(e0.pieces, build_plan(lengths, 128, mode, seed=2, epoch=0).pieces)
    # non-shuffling modes ignore the seed
    seeded = [build_plan(lengths, 128, "bfd", seed=s).pieces for s in (1, 9)]
    assert np.array_equal(*seeded)


def test_windowed_bfd_stays_in_its_window_and_one_window_is_bfd():
    lengths = np.random.default_rng(2).integers(1, 100, 300)
    W = 40
    plan = build_plan(lengths, 128, WindowedBestFit(window=W), seed=5)
    perm = ref.shuffle(300, ref.derive_seed(5, 0))
    window_of = np.empty(300, dtype=np.int64)
    window_of[perm] = np.arange(300) // W
    for i in range(plan.num_sequences):
        assert len(set(window_of[plan.sequence(i)[:, 0]].tolist())) == 1
    # windows appear in shuffled order
    first = [window_of[plan.sequence(i)[0, 0]] for i in range(plan.num_sequences)]
    assert first == sorted(first)
    whole = build_plan(lengths, 128, WindowedBestFit(window=10**6))
    bfd = build_plan(lengths, 128, "bfd")
    assert whole.num_sequences == bfd.num_sequences
    np.testing.assert_array_equal(np.sort(whole.sequence_lengths()), np.sort(bfd.sequence_lengths()))


def test_overlong_policies_by_hand():
    lengths = np.array([12, 3, 20])
    turns = [np.array([0, 3, 6, 8]), np.array([0]), np.array([0, 2, 15])]
    items, st_ = apply_overlong(lengths, 6, "cut-at-turns", turns)
    # doc 0: turns |0-3|3-6|6-8|8-12| -> [0,6) [6,12); doc 2: |0-2|2-15|15-20| -> [0,2) then
    # the 13-token turn must be cut inside: [2,8) [8,14), and its tail joins the last turn
    assert items.tolist() == [[0, 0, 6], [0, 6, 12], [1, 0, 3], [2, 0, 2], [2, 2, 8], [2, 8, 14], [2, 14, 20]]
    assert (st_.turn_split_docs, st_.in_turn_cuts, st_.placed_tokens) == (2, 2, 35)
    ref_items, ref_st = apply_overlong(lengths, 6, "cut-at-turns", turns, engine="reference")
    assert ref_items.tolist() == items.tolist() and ref_st == st_
    # unsorted, duplicated and out-of-range turn starts are tolerated the same way
    messy = [np.array([8, 3, 3, 0, 6, 40])]
    assert apply_overlong([12], 6, "cut-at-turns", messy)[0].tolist() == [[0, 0, 6], [0, 6, 12]]
    assert apply_overlong([12], 6, "cut-at-turns", messy, engine="reference")[0].tolist() == [[0, 0, 6], [0, 6, 12]]
    items, st_ = apply_overlong(lengths, 6, "truncate")
    assert items.tolist() == [[0, 0, 6], [1, 0, 3], [2, 0, 6]]
    assert (st_.truncated_docs, st_.truncated_tokens) == (2, 20)
    items, st_ = apply_overlong(lengths, 6, "drop")
    assert items.tolist() == [[1, 0, 3]] and (st_.dropped_docs, st_.dropped_tokens) == (2, 32)
    # without turn starts, cut-at-turns cuts every max_seq_length tokens
    items, st_ = apply_overlong([13], 6, "cut-at-turns")
    assert items.tolist() == [[0, 0, 6], [0, 6, 12], [0, 12, 13]] and st_.in_turn_cuts == 2


def test_registry_and_errors():
    assert set(PACKING_MODES) == {"padding", "greedy", "random", "bfd", "windowed_bfd"}
    assert get_mode("windowed_bfd:window=64") == WindowedBestFit(window=64)
    assert str(get_mode("windowed_bfd:window=64")) == "windowed_bfd:window=64"
    assert get_mode("bfd").key() == {"mode": "bfd"}
    with pytest.raises(ValueError, match="unknown packing mode 'bestfit'"):
        get_mode("bestfit")
    with pytest.raises(ValueError, match="bad option"):
        get_mode("bfd:window=3")
    with pytest.raises(ValueError, match="window must be >= 1"):
        WindowedBestFit(window=0)
    with pytest.raises(ValueError, match="overlong policy"):
        build_plan([3], 4, overlong="cut")
    from megatron_pack import _packing

    with pytest.raises(ValueError, match="item 1 has length 9"):
        _packing.pack_bfd(np.array([3, 9]), 8)
    with pytest.raises(ValueError, match="item 1 has length 9"):
        ref.pack_bfd([3, 9], 8)
