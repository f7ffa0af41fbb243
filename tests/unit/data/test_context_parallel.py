"""Context-parallel data layout: per-document padding, cu_seqlens_padded and the per-rank chunk
split against hand-computed examples; invariants over every packing mode."""

import numpy as np
import pytest
import torch
from tiny_docs import P, write  # tests/unit/data/tiny_docs.py

from megatron_pack.data.collate import collate_thd
from megatron_pack.data.context_parallel import (
    document_multiple,
    gathered_key_index,
    rank_token_index,
    split_batch_for_cp,
)
from megatron_pack.data.packed_dataset import PackedSFTDataset, required_multiple
from megatron_pack.packing.plan import PackingPlan, PlanStats, build_plan


def test_document_multiple():
    assert document_multiple(1) == 1 and document_multiple(1, 4, True) == 1
    assert document_multiple(2) == 4 and document_multiple(3) == 6
    assert document_multiple(2, 2, True) == 4  # lcm(4, 4)
    assert document_multiple(2, 4, True) == 8  # lcm(4, 8): each rank's share also splits over TP 4
    assert document_multiple(2, 4, False) == 4
    assert required_multiple(4, 2, True) == 8 and required_multiple(1, 2) == 4


def _plan(pieces, offsets, cap):
    return PackingPlan(np.asarray(pieces, dtype=np.int64), np.asarray(offsets, dtype=np.int64), cap, "greedy",
                       PlanStats())


def test_padded_item_hand_computed(data):
    """docs c (5 tokens) and b (3 tokens), CP 2: padded to 8 and 4 in a row of 16."""
    ds = PackedSFTDataset(data, 16, plan=_plan([[2, 0, 5], [1, 0, 3]], [0, 2], 16), document_multiple=4,
                          shuffle_sequences=False)
    it = ds[0]
    assert it["tokens"].tolist() == [30, 31, 32, 33, 34, P, P, P, 20, 21, 22, P, P, P, P, P]
    assert it["labels"].tolist() == [31, 32, 33, 34, P, P, P, P, 21, 22, P, P, P, P, P, P]
    assert it["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert it["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]
    assert it["cu_seqlens"].tolist() == [0, 5, 8] and it["cu_seqlens_padded"].tolist() == [0, 8, 12]
    assert (it["num_cu_seqlens"], it["max_seqlen"], it["num_real_tokens"]) == (3, 8, 8)

    b = collate_thd([it, it])
    assert b["cu_seqlens_padded"].tolist()[:7] == [0, 8, 12, 16, 24, 28, 32]
    assert b["cu_seqlens"].tolist()[:7] == [0, 5, 8, 8, 13, 16, 16]  # the tails hold no real token
    assert int(b["num_cu_seqlens"]) == 7 and int(b["max_seqlen"]) == 8

    one = collate_thd([it])
    r0, r1 = split_batch_for_cp(one, 2, 0), split_batch_for_cp(one, 2, 1)
    # rank 0: chunks 0 and 3 of each segment (c = 2, 1, 1); rank 1: chunks 1 and 2
    assert r0["tokens"][0].tolist() == [30, 31, P, P, 20, P, P, P]
    assert r1["tokens"][0].tolist() == [32, 33, 34, P, 21, 22, P, P]
    assert r0["position_ids"][0].tolist() == [0, 1, 6, 7, 0, 3, 4, 7]
    assert r1["position_ids"][0].tolist() == [2, 3, 4, 5, 1, 2, 5, 6]
    assert r0["loss_mask"][0].tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    assert r1["labels"][0].tolist() == [33, 34, P, P, 22, P, P, P]
    assert r0["cu_seqlens_padded"].tolist() == one["cu_seqlens_padded"].tolist()  # stays global
    assert rank_token_index([0, 8, 12, 16], 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    gathered = torch.cat([rank_token_index([0, 8, 12, 16], 2, r) for r in range(2)])
    assert torch.equal(gathered[gathered_key_index([0, 8, 12, 16], 2, 8)], torch.arange(16))


def test_document_mask_off_is_one_padded_segment(data):
    ds = PackedSFTDataset(data, 16, plan=_plan([[2, 0, 5], [1, 0, 3]], [0, 2], 16), document_multiple=4,
                          document_mask=False, shuffle_sequences=False)
    it = ds[0]
    assert it["tokens"].tolist()[:9] == [30, 31, 32, 33, 34, 20, 21, 22, P]
    assert it["labels"].tolist()[:8] == [31, 32, 33, 34, 20, 21, 22, P]  # c4 predicts b0
    assert it["cu_seqlens"].tolist() == [0, 8] and it["cu_seqlens_padded"].tolist() == [0, 8]
    assert it["position_ids"].tolist() == list(range(16))


def test_bad_input_names_the_argument(data):
    with pytest.raises(ValueError, match="seq_length 10 is not a multiple of document_multiple 4"):
        PackedSFTDataset(data, 10, "bfd", document_multiple=4, use_cache=False)
    with pytest.raises(ValueError, match="not a multiple of 2 \\* CP = 4"):
        rank_token_index([0, 6, 8], 2, 0)
    item = PackedSFTDataset(data, 8, "bfd", use_cache=False)[0]
    with pytest.raises(ValueError, match="cu_seqlens_padded"):
        split_batch_for_cp(collate_thd([item]), 2, 0)


@pytest.mark.parametrize("mode", ["padding", "greedy", "random", "bfd", "windowed_bfd"])
@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("document_mask", [True, False])
def test_invariants(tmp_path, mode, cp, document_mask):
    rng = np.random.default_rng(cp)
    docs = []
    for i in range(40):
        n = int(rng.integers(1, 30)) if i % 5 else int(rng.integers(1, 2 * cp))  # some shorter than 2*CP
        toks = rng.integers(1, 200, n).tolist()
        docs.append((toks, rng.integers(0, 2, n).tolist(), [0]))
    data = write(tmp_path / "d", docs)
    m = document_multiple(cp)
    S = 8 * m
    ds = PackedSFTDataset(data, S, mode, document_multiple=m, document_mask=document_mask, use_cache=False,
                          overlong="truncate")
    plan = ds.plan
    padded = -(-plan.piece_lengths // m) * m
    per_seq = np.add.reduceat(padded, plan.seq_offsets[:-1])
    assert per_seq.max() <= S  # no sequence over capacity after per-document padding
    # items with no trained target are left out of the plan (counted), the rest placed whole
    kept = [min(len(t), S) for t, mk, _ in docs if any(mk[1:min(len(t), S)])]
    assert plan.stats.unsupervised_items == len(docs) - len(kept)
    assert plan.stats.placed_tokens == int(plan.piece_lengths.sum()) == sum(kept)
    seen_tokens = 0
    for i in range(len(ds)):
        it = ds[i]
        n = it["num_cu_seqlens"]
        cu, cup = it["cu_seqlens"][:n], it["cu_seqlens_padded"][:n]
        assert bool(((cup[1:] - cup[:-1]) % (2 * cp) == 0).all()) and int(cup[-1]) <= S
        assert bool(((cu[1:] - cu[:-1]) <= (cup[1:] - cup[:-1])).all())
        real = torch.zeros(S, dtype=torch.bool)
        for a, b, ra, rb in zip(cup[:-1].tolist(), cup[1:].tolist(), cu[:-1].tolist(), cu[1:].tolist()):
            real[a:a + rb - ra] = True
        assert int(real.sum()) == it["num_real_tokens"]
        assert float(it["loss_mask"][~real].abs().sum()) == 0.0  # padding has zero loss
        batch = collate_thd([it])
        owners = torch.zeros(S, dtype=torch.int64)
        for r in range(cp):
            owners[rank_token_index(batch["cu_seqlens_padded"][:int(batch["num_cu_seqlens"])], cp, r)] += 1
            part = split_batch_for_cp(batch, cp, r)
            assert part["tokens"].numel() == S // cp
        assert bool((owners == 1).all())  # every token (real or not) on exactly one CP rank
        seen_tokens += it["num_real_tokens"]
    assert seen_tokens == plan.stats.placed_tokens


def test_random_mode_cuts_at_padded_multiples():
    lengths = np.array([7, 9, 3, 12, 5, 1, 30, 2])
    plan = build_plan(lengths, 16, "random", seed=3, pad_multiple=4)
    padded = -(-plan.piece_lengths // 4) * 4
    assert np.add.reduceat(padded, plan.seq_offsets[:-1]).max() <= 16
    assert int(plan.piece_lengths.sum()) == plan.stats.placed_tokens == int(np.minimum(lengths, 16).sum())
    assert (plan.piece_lengths > 0).all()
    with pytest.raises(ValueError, match="not a multiple"):
        build_plan(lengths, 18, "bfd", pad_multiple=4)


def test_plan_cache_keys_the_padding(tmp_path):
    data = write(tmp_path / "c", [(list(range(1, n + 1)), [1] * n, [0]) for n in (5, 3, 7, 2, 9, 1, 6)])
    cached = PackedSFTDataset(data, 16, "bfd", document_multiple=4, cache_dir=str(tmp_path / "plans"))
    plain = PackedSFTDataset(data, 16, "bfd", cache_dir=str(tmp_path / "plans"))
    fresh = PackedSFTDataset(data, 16, "bfd", document_multiple=4, use_cache=False)
    assert np.array_equal(cached.plan.pieces, fresh.plan.pieces)
    assert not np.array_equal(np.asarray(plain.plan.seq_offsets), np.asarray(cached.plan.seq_offsets))
    stems = sorted(p.name for p in (tmp_path / "plans").glob("*.json"))
    assert len(stems) == 2 and sum("_P4_" in s for s in stems) == 1
