"""PackedSFTDataset fields against hand-computed examples, per mode, document mask on and off."""

import numpy as np
import pytest
import torch
from tiny_docs import P, write  # tests/unit/data/tiny_docs.py

from megatron_pack.data.collate import collate_padded, collate_thd
from megatron_pack.data.packed_dataset import PackedSFTDataset, required_multiple
from megatron_pack.packing.plan import build_plan


def items(ds):
    return [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in ds[i].items()} for i in range(len(ds))]


def make(data, mode, document_mask, **kw):
    return PackedSFTDataset(data, 8, mode, seed=0, document_mask=document_mask, use_cache=False,
                            shuffle_sequences=False, **kw)


def row(tokens, labels, loss_mask, position_ids, cu_seqlens, max_seqlen):
    n = [c for c in cu_seqlens if c >= 0]
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "cu_seqlens": cu_seqlens, "num_cu_seqlens": len(n), "max_seqlen": max_seqlen, "num_real_tokens": n[-1]}


EXPECTED = {
    # one conversation per sequence: the mask switch changes nothing
    ("padding", True): [
        row(
            [10, 11, 12, 13, P, P, P, P],
            [11, 12, 13, P, P, P, P, P],
            [0, 1, 1, 0, 0, 0, 0, 0],
            list(range(8)),
            [0, 4],
            4,
        ),
        row(
            [20, 21, 22, P, P, P, P, P], [21, 22, P, P, P, P, P, P], [1, 1, 0, 0, 0, 0, 0, 0], list(range(8)), [0, 3], 3
        ),
        row(
            [30, 31, 32, 33, 34, P, P, P],
            [31, 32, 33, 34, P, P, P, P],
            [0, 1, 1, 1, 0, 0, 0, 0],
            list(range(8)),
            [0, 5],
            5,
        ),
        row([40, 41, P, P, P, P, P, P], [41, P, P, P, P, P, P, P], [1, 0, 0, 0, 0, 0, 0, 0], list(range(8)), [0, 2], 2),
    ],
    # sorted 5 4 3 2: [doc2] (4 does not fit) [doc0 doc1] (2 does not fit) [doc3]
    ("greedy", True): [
        row(
            [30, 31, 32, 33, 34, P, P, P],
            [31, 32, 33, 34, P, P, P, P],
            [0, 1, 1, 1, 0, 0, 0, 0],
            list(range(8)),
            [0, 5, -1],
            5,
        ),
        row(
            [10, 11, 12, 13, 20, 21, 22, P],
            [11, 12, 13, P, 21, 22, P, P],
            [0, 1, 1, 0, 1, 1, 0, 0],
            [0, 1, 2, 3, 0, 1, 2, 3],
            [0, 4, 7],
            4,
        ),
        row(
            [40, 41, P, P, P, P, P, P],
            [41, P, P, P, P, P, P, P],
            [1, 0, 0, 0, 0, 0, 0, 0],
            list(range(8)),
            [0, 2, -1],
            2,
        ),
    ],
    ("greedy", False): [
        row(
            [30, 31, 32, 33, 34, P, P, P],
            [31, 32, 33, 34, P, P, P, P],
            [0, 1, 1, 1, 0, 0, 0, 0],
            list(range(8)),
            [0, 5],
            5,
        ),
        # 13 predicts 20 (no mask): 20 is not supervised, so the loss mask stays 0 there
        row(
            [10, 11, 12, 13, 20, 21, 22, P],
            [11, 12, 13, 20, 21, 22, P, P],
            [0, 1, 1, 0, 1, 1, 0, 0],
            list(range(8)),
            [0, 7],
            7,
        ),
        row([40, 41, P, P, P, P, P, P], [41, P, P, P, P, P, P, P], [1, 0, 0, 0, 0, 0, 0, 0], list(range(8)), [0, 2], 2),
    ],
    # best fit: 5 -> bin0 (3 left), 4 -> bin1 (4 left), 3 -> bin0 (fullest that fits), 2 -> bin1
    ("bfd", True): [
        row(
            [30, 31, 32, 33, 34, 20, 21, 22],
            [31, 32, 33, 34, P, 21, 22, P],
            [0, 1, 1, 1, 0, 1, 1, 0],
            [0, 1, 2, 3, 4, 0, 1, 2],
            [0, 5, 8],
            5,
        ),
        row(
            [10, 11, 12, 13, 40, 41, P, P],
            [11, 12, 13, P, 41, P, P, P],
            [0, 1, 1, 0, 1, 0, 0, 0],
            [0, 1, 2, 3, 0, 1, 2, 3],
            [0, 4, 6],
            4,
        ),
    ],
    ("bfd", False): [
        row(
            [30, 31, 32, 33, 34, 20, 21, 22],
            [31, 32, 33, 34, 20, 21, 22, P],
            [0, 1, 1, 1, 0, 1, 1, 0],
            list(range(8)),
            [0, 8],
            8,
        ),
        row(
            [10, 11, 12, 13, 40, 41, P, P],
            [11, 12, 13, 40, 41, P, P, P],
            [0, 1, 1, 0, 1, 0, 0, 0],
            list(range(8)),
            [0, 6],
            6,
        ),
    ],
    # seed 0 shuffles to [3, 0, 2, 1]; the stream 40 41|10 11 12 13|30 31 ‖ 32 33 34|20 21 22
    # is cut after 8 tokens, splitting doc 2; its tail is a segment of its own
    ("random", True): [
        row(
            [40, 41, 10, 11, 12, 13, 30, 31],
            [41, P, 11, 12, 13, P, 31, P],
            [1, 0, 0, 1, 1, 0, 0, 0],
            [0, 1, 0, 1, 2, 3, 0, 1],
            [0, 2, 6, 8],
            4,
        ),
        row(
            [32, 33, 34, 20, 21, 22, P, P],
            [33, 34, P, 21, 22, P, P, P],
            [1, 1, 0, 1, 1, 0, 0, 0],
            [0, 1, 2, 0, 1, 2, 3, 4],
            [0, 3, 6, -1],
            3,
        ),
    ],
    ("random", False): [
        row(
            [40, 41, 10, 11, 12, 13, 30, 31],
            [41, 10, 11, 12, 13, 30, 31, P],
            [1, 0, 0, 1, 1, 0, 0, 0],
            list(range(8)),
            [0, 8],
            8,
        ),
        row(
            [32, 33, 34, 20, 21, 22, P, P],
            [33, 34, 20, 21, 22, P, P, P],
            [1, 1, 0, 1, 1, 0, 0, 0],
            list(range(8)),
            [0, 6],
            6,
        ),
    ],
    # windows of 2 over the shuffle [3, 0 | 2, 1]: best fit inside each window
    ("windowed_bfd:window=2", True): [
        row(
            [10, 11, 12, 13, 40, 41, P, P],
            [11, 12, 13, P, 41, P, P, P],
            [0, 1, 1, 0, 1, 0, 0, 0],
            [0, 1, 2, 3, 0, 1, 2, 3],
            [0, 4, 6],
            4,
        ),
        row(
            [30, 31, 32, 33, 34, 20, 21, 22],
            [31, 32, 33, 34, P, 21, 22, P],
            [0, 1, 1, 1, 0, 1, 1, 0],
            [0, 1, 2, 3, 4, 0, 1, 2],
            [0, 5, 8],
            5,
        ),
    ],
}
EXPECTED[("padding", False)] = EXPECTED[("padding", True)]


@pytest.mark.parametrize("mode,document_mask", sorted(EXPECTED, key=str))
def test_fields_match_hand_computed(data, mode, document_mask):
    got = items(make(data, mode, document_mask))
    assert got == EXPECTED[(mode, document_mask)]


def test_dtypes_and_padding_to_multiple(data):
    ds = make(data, "bfd", True, pad_to_multiple_of=required_multiple(tp_size=3, sequence_parallel=True))
    item = ds[1]
    assert item["tokens"].shape == (9,) and ds.padded_length == 9
    assert (
        item["tokens"].dtype,
        item["labels"].dtype,
        item["loss_mask"].dtype,
        item["position_ids"].dtype,
        item["cu_seqlens"].dtype,
    ) == (torch.int64, torch.int64, torch.float32, torch.int64, torch.int32)
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert item["loss_mask"][6:].sum() == 0
    assert required_multiple(4, 1, False) == 1
    assert required_multiple(4, 1, True) == 4
    assert required_multiple(4, 3, True) == 12
    assert required_multiple(1, 2) == 4


def test_invariants_on_random_data(tmp_path):
    """Every supervised label is the next token of the same conversation; nothing on padding."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(60):
        n = int(rng.integers(1, 40))
        docs.append((rng.integers(1, 1000, n).tolist(), rng.integers(0, 2, n).tolist(), [0]))
    data = write(tmp_path / "rand", docs)
    for mode in ("padding", "greedy", "bfd", "windowed_bfd:window=9", "random"):
        ds = PackedSFTDataset(data, 32, mode, use_cache=False, overlong="cut-at-turns")
        total = 0
        for i in range(len(ds)):
            it = ds[i]
            cu = it["cu_seqlens"][: it["num_cu_seqlens"]].tolist()
            R = it["num_real_tokens"]
            assert cu[0] == 0 and cu[-1] == R <= 32 and it["max_seqlen"] == max(np.diff(cu))
            assert it["loss_mask"][R - 1 :].sum() == 0 and (it["tokens"][R:] == P).all()
            for a, b in zip(cu[:-1], cu[1:]):
                assert it["position_ids"][a:b].tolist() == list(range(b - a))
                assert it["loss_mask"][b - 1] == 0
            total += R
            # the labels inside a segment come from the same conversation slice
            seq = ds.plan.sequence(int(ds.order[i]))
            for (d, s, e), a in zip(seq.tolist(), cu[:-1]):
                t, m, _ = docs[d]
                assert it["labels"][a : a + e - s - 1].tolist() == t[s + 1 : e]
                assert it["loss_mask"][a : a + e - s - 1].tolist() == m[s + 1 : e]
        # items with no supervised target are left out, and counted
        assert total + ds.plan.stats.unsupervised_tokens == sum(len(d[0]) for d in docs)
        assert ds.plan.stats.unsupervised_items > 0


def test_set_epoch_reshuffles(data):
    ds = PackedSFTDataset(data, 8, "random", seed=0, use_cache=False, shuffle_sequences=False)
    first = ds.plan.pieces.copy()
    ds.set_epoch(1)
    assert not np.array_equal(first, ds.plan.pieces)  # epoch 1 shuffles to [1, 2, 3, 0]
    assert ds.plan.pieces[:, 0].tolist()[:2] == [1, 2]


def test_shuffle_sequences_is_a_permutation(tmp_path):
    rng = np.random.default_rng(1)
    data = write(tmp_path / "s", [(rng.integers(1, 9, 5).tolist(), [1] * 5, [0]) for _ in range(50)])
    ds = PackedSFTDataset(data, 8, "padding", use_cache=False)
    assert sorted(ds.order.tolist()) == list(range(50)) and ds.order.tolist() != list(range(50))
    assert ds[0]["tokens"][:5].tolist() == data[int(ds.order[0])].tokens.tolist()


def test_custom_plan_and_errors(data):
    plan = build_plan(data.lengths, 8, "bfd")
    ds = PackedSFTDataset(data, 8, plan=plan, shuffle_sequences=False)
    assert ds.plan is plan and len(ds) == 2
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="exceeds seq_length"):
        PackedSFTDataset(data, 4, plan=plan)


def test_collate_padded_and_thd(data):
    ds = make(data, "bfd", True)
    batch = [ds[0], ds[1]]
    pad = collate_padded(batch)
    assert pad["tokens"].shape == (2, 8) and pad["cu_seqlens"].tolist() == [[0, 5, 8], [0, 4, 6]]
    assert pad["num_cu_seqlens"].tolist() == [3, 3] and pad["num_real_tokens"].tolist() == [8, 6]
    thd = collate_thd(batch)
    assert thd["tokens"].shape == (1, 16)
    assert thd["tokens"][0].tolist() == [30, 31, 32, 33, 34, 20, 21, 22, 10, 11, 12, 13, 40, 41, P, P]
    # row 1 starts at 8; its padding tail [14, 16) is a segment of its own
    assert thd["cu_seqlens"].tolist() == [0, 5, 8, 12, 14, 16, -1]
    assert thd["cu_seqlens"].dtype == torch.int32
    assert (int(thd["num_cu_seqlens"]), int(thd["max_seqlen"]), int(thd["num_real_tokens"])) == (6, 5, 14)
    assert thd["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="empty batch"):
        collate_thd([])
