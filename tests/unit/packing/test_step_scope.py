"""Per-step packing plans: the C++ grouped best-fit == its numpy twin, and each step packs
exactly the conversations of the padded run's step."""

import numpy as np
import pytest

from megatron_pack import _packing
from megatron_pack.packing import reference as ref
from megatron_pack.packing.plan import build_plan
from megatron_pack.packing.step_scope import build_step_plan, padded_epoch_order, spread


@pytest.mark.parametrize("seed", range(6))
def test_grouped_bfd_cpp_equals_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n, cap = int(rng.integers(0, 80)), int(rng.integers(1, 50))
        lengths = rng.integers(1, cap + 1, n).astype(np.int64)
        cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 7))))
        groups = np.concatenate([[0], cuts, [n]]).astype(np.int64)
        a = _packing.pack_bfd_groups(lengths, groups, cap)
        b = ref.pack_bfd_groups(lengths, groups, cap)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), (lengths, groups)
        order, offsets, group_seq = a
        assert sorted(order.tolist()) == list(range(n))
        for g in range(len(groups) - 1):  # no row spans two groups
            rows = order[offsets[group_seq[g]]:offsets[group_seq[g + 1]]]
            assert sorted(rows.tolist()) == list(range(groups[g], groups[g + 1]))


def test_grouped_bfd_rejects_bad_groups():
    with pytest.raises(ValueError):
        _packing.pack_bfd_groups(np.array([1, 2]), np.array([0, 1]), 4)  # does not end at len
    with pytest.raises(ValueError):
        ref.pack_bfd_groups([1, 2], [0, 2, 1, 2], 4)  # decreasing


@pytest.mark.parametrize("pad_multiple", [1, 4])
def test_each_step_packs_the_padded_step(pad_multiple):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 70, 203)
    lengths[5] = 0  # empty conversations are left out by every plan alike
    cap, gbs = 64, 16
    padding = build_plan(lengths, cap, "padding", pad_multiple=pad_multiple)
    order = padded_epoch_order(padding.num_sequences, 1234, 2)
    steps = build_step_plan(padding, order, gbs, pad_multiple=pad_multiple)
    assert steps.num_steps == padding.num_sequences // gbs
    plan = steps.plan
    padded_len = -(-plan.piece_lengths // pad_multiple) * pad_multiple
    per_row = np.add.reduceat(padded_len, plan.seq_offsets[:-1])
    assert per_row.max() <= cap
    for k in range(steps.num_steps):
        rows = range(steps.step_offsets[k], steps.step_offsets[k + 1])
        got = sorted(tuple(p) for r in rows for p in plan.sequence(r).tolist())
        want = sorted(tuple(p) for p in padding.pieces[order[k * gbs:(k + 1) * gbs]].tolist())
        assert got == want, k
    rows = steps.rows_per_step()
    assert rows.sum() == plan.num_sequences and rows.max() < gbs  # packing saves rows
    assert spread(rows) == {"min": int(rows.min()), "mean": float(rows.mean()), "max": int(rows.max())}
    again = build_step_plan(padding, order, gbs, pad_multiple=pad_multiple)
    assert np.array_equal(again.plan.pieces, plan.pieces) and np.array_equal(again.step_offsets, steps.step_offsets)
    # the reference engine builds the same plan
    twin = build_step_plan(padding, order, gbs, pad_multiple=pad_multiple, engine="reference")
    assert np.array_equal(twin.plan.pieces, plan.pieces) and np.array_equal(twin.plan.seq_offsets, plan.seq_offsets)


def test_step_plan_needs_a_padding_plan():
    with pytest.raises(ValueError, match="padding plan"):
        bfd = build_plan(np.array([3, 3, 3, 3]), 8, "bfd")
        build_step_plan(bfd, np.arange(bfd.num_sequences), 2)
