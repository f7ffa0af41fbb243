"""Balanced placement: optimal on small cases (brute force), a permutation of the step,
deterministic, resumable, and invariant for a globally normalised loss."""

import itertools

import numpy as np
import pytest

from megatron_pack.data.balance import (
    BatchBalancer,
    _lpt,
    contiguous,
    imbalance,
    partition,
    place,
    sequence_costs,
    sequence_sum_sq,
)
from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.sampling import DataPosition, TrainStream
from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.model.cost import CostModel
from megatron_pack.model.presets import get_preset


def brute_force_max(costs, k):
    """The optimum: smallest possible largest part over every split into k parts of equal count."""
    n, per, best = len(costs), len(costs) // k, [np.inf]

    def rec(rest, worst):
        if not rest:
            best[0] = min(best[0], worst)
            return
        for comb in itertools.combinations(rest[1:], per - 1):
            group = (rest[0],) + comb
            w = max(worst, costs[list(group)].sum())
            if w < best[0]:
                rec([x for x in rest if x not in group], w)

    rec(list(range(n)), 0.0)
    return best[0]


def largest_part(costs, parts):
    return max(costs[p].sum() for p in parts)


def test_partition_matches_brute_force_optimum_on_small_cases():
    rng = np.random.default_rng(0)
    optimal, worst, cases = 0, 1.0, 0
    for _ in range(200):
        k, per = int(rng.integers(2, 4)), int(rng.integers(2, 5))
        if k * per > 12:
            continue
        costs = np.round((rng.pareto(1.2, k * per) + 0.1) * 100)  # long-tailed, with ties
        parts = partition(costs, k)
        assert sorted(i for p in parts for i in p) == list(range(k * per))
        assert all(len(p) == per for p in parts)
        got, opt = largest_part(costs, parts), brute_force_max(costs, k)
        assert got >= opt - 1e-9
        optimal += got <= opt + 1e-9
        worst = max(worst, got / opt)
        cases += 1
    assert cases > 100
    assert optimal >= 0.97 * cases, (optimal, cases)
    assert worst <= 1.05, worst


def test_partition_beats_lpt_where_lpt_is_suboptimal():
    # LPT alone (heaviest first to the lightest part with room): {8,5,4} = 17 / {7,6,1};
    # the optimum is {8,7,1} = 16 / {6,5,4} = 15.
    costs = np.array([8.0, 7, 6, 5, 4, 1])
    assert largest_part(costs, _lpt(costs, 2, 3)) == 17.0
    parts = partition(costs, 2)
    assert largest_part(costs, parts) == brute_force_max(costs, 2) == 16.0


def test_brute_force_negative_control():
    """The reference is not trivially satisfied: the contiguous split is worse than the optimum."""
    costs = np.array([9.0, 8, 1, 1, 2, 1, 1, 1])
    cont = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert largest_part(costs, cont) > brute_force_max(costs, 2) == 12.0


def test_place_is_deterministic_and_a_permutation():
    rng = np.random.default_rng(1)
    costs = rng.pareto(1.0, 64) + 1
    a, b = place(costs, 4, 2), place(costs.copy(), 4, 2)
    assert a == b
    flat = sorted(i for r in a for mb in r for i in mb)
    assert flat == list(range(64))
    assert all(len(r) == 8 and all(len(mb) == 2 for mb in r) for r in a)
    assert imbalance(costs, a) <= imbalance(costs, contiguous(64, 4, 2))


def test_micro_batches_evened_within_rank():
    costs = np.array([10.0, 9, 1, 1, 5, 5, 5, 5])
    (rank,) = place(costs, 1, 2)
    sums = sorted(costs[mb].sum() for mb in rank)
    assert sums == [10.0, 10.0, 10.0, 11.0]


def test_partition_rejects_uneven_split():
    with pytest.raises(ValueError, match="equal count"):
        partition([1.0, 2.0, 3.0], 2)


# ---------------------------------------------------------------- costs from a plan


class _Plan:
    piece_lengths = np.array([3, 2, 4, 1])
    seq_offsets = np.array([0, 2, 3, 4])
    num_sequences = 3

    def sequence_lengths(self):
        return np.array([5, 4, 1])


def test_sequence_sum_sq_document_mask_tail_and_no_mask():
    p = _Plan()
    assert sequence_sum_sq(p).tolist() == [13, 16, 1]
    assert sequence_sum_sq(p, padded_length=6).tolist() == [14, 20, 26]  # + tail (6 - real)^2
    assert sequence_sum_sq(p, document_mask=False).tolist() == [25, 16, 1]
    cm = CostModel(linear_flops_per_token=10.0, attention_flops_per_sq=1.0)
    assert sequence_costs(p, cm, padded_length=6).tolist() == [74, 80, 86]


# ---------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """Long-tailed: many short conversations, a few that fill a 128-token sequence alone."""
    rng = np.random.default_rng(5)
    p = str(tmp_path_factory.mktemp("balance_data") / "sft")
    with SFTDatasetWriter(p) as w:
        for i in range(120):
            n = int(rng.integers(100, 128)) if i % 9 == 0 else int(rng.integers(4, 20))
            w.add([i % 250 + 1] * n, [0] + [1] * (n - 1), [0])
    return p


def _streams(prefix, dp, enabled, pos=None, gbs=8, mbs=2):
    cost = CostModel.from_architecture(get_preset("tiny"), vocab_size=256)
    out = []
    for r in range(dp):
        ds = PackedSFTDataset(prefix, 128, "bfd", use_cache=False)
        out.append(TrainStream(ds, gbs, mbs, r, dp, DataPosition(**(pos or {})),
                               balancer=BatchBalancer(cost, dp, mbs, enabled=enabled)))
    return out


def _rows(micro):
    return [tuple(row.tolist()) for mb in micro for row in mb["tokens"].reshape(-1, 128)]


def test_balanced_stream_takes_the_same_sequences_per_step_and_lowers_imbalance(prefix):
    bal, off = _streams(prefix, 2, True), _streams(prefix, 2, False)
    before, after, moved = [], [], 0
    for _ in range(6):
        b = [s.next_step() for s in bal]
        o = [s.next_step() for s in off]
        assert sorted(_rows(b[0]) + _rows(b[1])) == sorted(_rows(o[0]) + _rows(o[1]))
        moved += sorted(_rows(b[0])) != sorted(_rows(o[0]))
        assert bal[0].last_stats["imbalance unbalanced"] == off[0].last_stats["imbalance"]
        before.append(off[0].last_stats["imbalance"])
        after.append(bal[0].last_stats["imbalance"])
        assert after[-1] <= before[-1] + 1e-12
        # a rank's micro-batch figures match what every rank computed for the step
        assert bal[0].last_stats == bal[1].last_stats
    assert moved >= 1 and max(before) > max(after)


def test_balanced_stream_resumes_at_any_step(prefix):
    full = _streams(prefix, 2, True, gbs=8)
    steps = [[s.next_step() for s in full] for _ in range(20)]  # crosses epoch boundaries
    for k in (3, 11):
        probe = _streams(prefix, 2, True)
        for _ in range(k):
            [s.next_step() for s in probe]
        resumed = _streams(prefix, 2, True, pos=probe[0].pos.state_dict())
        for j in range(k, min(k + 4, 20)):
            got = [s.next_step() for s in resumed]
            for r in range(2):
                assert _rows(got[r]) == _rows(steps[j][r]), (k, j, r)
    assert full[0].pos.epoch >= 2  # the run crossed epoch boundaries (new plan order each)


def test_placement_does_not_change_a_globally_normalised_loss(prefix):
    """Token-weighted mean over the global batch is placement-free; the negative control, a
    per-rank mean then averaged over ranks (Megatron without per-token loss), is not."""
    rng = np.random.default_rng(0)
    table = rng.random(256)  # a fixed "loss" per token id stands in for the model
    bal, off = _streams(prefix, 2, True), _streams(prefix, 2, False)
    diffs = []
    for _ in range(6):
        results = []
        for streams in (bal, off):
            sums, counts = [], []
            for s in streams:
                micro = s.next_step()
                sums.append(sum(float((table[m["labels"]] * m["loss_mask"].numpy()).sum()) for m in micro))
                counts.append(sum(float(m["loss_mask"].sum()) for m in micro))
            results.append((sum(sums) / sum(counts), np.mean([a / b for a, b in zip(sums, counts)])))
        (g_bal, r_bal), (g_off, r_off) = results
        assert abs(g_bal - g_off) <= 1e-12 * abs(g_off)
        diffs.append(abs(r_bal - r_off))
    assert max(diffs) > 1e-4  # the per-rank mean would have changed


# ---------------------------------------------------------------- evaluation


def _eval_steps(ds, dp, balancer, gbs=8, mbs=2):
    """Per step, per rank: the rows (real tokens) of each micro-batch eval_batches hands it."""
    from megatron_pack.data.eval_batches import eval_batches

    per_rank = [list(eval_batches(ds, gbs, mbs, r, dp, balancer=balancer)) for r in range(dp)]
    return [[[[tuple(t for t in row.tolist() if t) for row in mb["tokens"].reshape(-1, ds.padded_length)]
               for mb in per_rank[r][s]] for r in range(dp)] for s in range(len(per_rank[0]))]


def test_eval_batches_are_balanced_like_training(prefix):
    """Held-out batches go through the training balancer: each step's placement is the one
    BatchBalancer gives those sequences (fillers of the partial last step free), every sequence
    is scored once, every rank runs the same number of micro-batches, and the busiest rank does
    less than under the contiguous placement (the negative control: balancer=None)."""
    from collections import Counter

    from megatron_pack.data.balance import contiguous, imbalance

    cost = CostModel.from_architecture(get_preset("tiny"), vocab_size=256)
    ds = PackedSFTDataset(prefix, 128, "bfd", use_cache=False, shuffle_sequences=False)
    gbs, dp, mbs = 8, 2, 2
    assert len(ds) % gbs, "the dataset must leave a partial last step"
    bal = BatchBalancer(cost, dp, mbs)
    balanced, plain = _eval_steps(ds, dp, bal), _eval_steps(ds, dp, None)
    row = {i: tuple(t for t in ds[i]["tokens"].tolist() if t) for i in range(len(ds))}
    costs = bal.costs(ds)
    worse = 0
    for s, (got, base) in enumerate(zip(balanced, plain)):
        lo, real = s * gbs, min(gbs, len(ds) - s * gbs)
        want, stats = bal.placement(ds, ds.order[lo:lo + real], fillers=gbs - real)
        assert got == [[[row[lo + p] if p < real else () for p in mb] for mb in want[r]] for r in range(dp)]
        assert base == [[[row[lo + p] if p < real else () for p in mb] for mb in r]
                        for r in contiguous(gbs, dp, mbs)]
        assert len(got[0]) == len(got[1]) == gbs // dp // mbs
        c = np.concatenate([costs[ds.order[lo:lo + real]], np.zeros(gbs - real)])
        assert imbalance(c, want) <= imbalance(c, contiguous(gbs, dp, mbs)) + 1e-12
        worse += imbalance(c, want) < imbalance(c, contiguous(gbs, dp, mbs)) - 1e-9
    every = Counter(r for step in balanced for rank in step for mb in rank for r in mb if r)
    assert every == Counter(row.values())  # each held-out sequence once, on one rank
    assert worse >= 1 and balanced != plain
