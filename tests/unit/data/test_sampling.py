"""Training data stream: held-out split, DP sharding, resume position, epochs, eval coverage."""

import numpy as np
import pytest

from megatron_pack.data.eval_batches import eval_batches
from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.sampling import DataPosition, TrainStream, epochs_to_iters
from megatron_pack.data.split import SFTSubset, split_indices
from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    rng = np.random.default_rng(3)
    p = str(tmp_path_factory.mktemp("train_data") / "sft")
    with SFTDatasetWriter(p) as w:
        for i in range(60):
            n = int(rng.integers(5, 60))
            # token ids encode the conversation index so tests can tell them apart
            w.add([i + 1] * n, [0] + [1] * (n - 1), [0])
    return p


def test_split_is_disjoint_seeded_and_mode_free():
    tr, va = split_indices(100, 0.1, seed=5)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert sorted([*tr, *va]) == list(range(100))
    tr2, va2 = split_indices(100, 0.1, seed=5)
    assert (va == va2).all()
    assert not (split_indices(100, 0.1, seed=6)[1] == va).all()
    assert len(split_indices(100, 0.0, seed=5)[1]) == 0


def test_subset_renumbers(prefix):
    base = SFTIndexedDataset(prefix)
    sub = SFTSubset(base, [3, 7])
    assert len(sub) == 2 and list(sub.lengths) == [base.lengths[3], base.lengths[7]]
    toks, mask = sub.get_slice(1, 0, 2)
    assert toks.tolist() == [8, 8]
    assert sub.turns[1].tolist() == [0]


def _stream(prefix, dp_rank, dp_size, pos=None, gbs=4, mbs=1):
    ds = PackedSFTDataset(prefix, 64, "bfd", use_cache=False)
    return ds, TrainStream(ds, gbs, mbs, dp_rank, dp_size, pos)


def _sequences(micro):
    return [tuple(row[row != 0].tolist()) for mb in micro for row in mb["tokens"].reshape(len(mb["tokens"]), -1)]


def test_dp_ranks_split_each_global_batch(prefix):
    _, whole = _stream(prefix, 0, 1, mbs=2)
    _, r0 = _stream(prefix, 0, 2)
    _, r1 = _stream(prefix, 1, 2)
    for _ in range(3):
        w = whole.next_step()
        a, b = r0.next_step(), r1.next_step()
        assert len(a) == len(b) == 2  # 4 sequences / 2 ranks / micro-batch 1
        flat = lambda ms: [m["tokens"].reshape(-1, 64) for m in ms]  # noqa: E731
        assert np.array_equal(np.concatenate([*flat(a), *flat(b)]), np.concatenate(flat(w)))
        assert whole.last_stats == r0.last_stats == r1.last_stats  # global figures, no comms


def test_resume_from_position_continues_exactly(prefix):
    ds, s = _stream(prefix, 0, 1)
    per_epoch = len(ds) // 4
    steps = [s.next_step() for _ in range(per_epoch + 3)]  # crosses into epoch 1
    assert s.pos.epoch == 1 and s.pos.step_in_epoch == 3
    saved = DataPosition(epoch=0, step_in_epoch=per_epoch - 1, consumed_samples=4 * (per_epoch - 1))
    _, again = _stream(prefix, 0, 1, DataPosition.from_state_dict(saved.state_dict()))
    for want in steps[per_epoch - 1:]:
        got = again.next_step()
        assert all(np.array_equal(g["tokens"], w["tokens"]) for g, w in zip(got, want))
    assert (again.pos.epoch, again.pos.step_in_epoch, again.pos.consumed_samples) == \
        (s.pos.epoch, s.pos.step_in_epoch, s.pos.consumed_samples)


def test_epochs_reshuffle_and_count(prefix):
    ds, s = _stream(prefix, 0, 1)
    order0 = ds.order.copy()
    for _ in range(len(ds) // 4 + 1):
        s.next_step()
    assert ds.epoch == 1 and not np.array_equal(ds.order, order0)  # a new order each epoch
    assert epochs_to_iters(ds, 4, 2) == 2 * (len(ds) // 4)
    assert epochs_to_iters(ds, 4, 1.5) == len(ds) // 4 + (len(ds) // 4) // 2
    assert ds.epoch == 1  # counting epochs leaves the stream's epoch alone


def _sequences_seen(ds, ranks, global_batch=4, micro=1, dp=2) -> list:
    """The real tokens of every non-empty sequence the given ranks score, as tuples."""
    seen = []
    for rank in ranks:
        for batch in eval_batches(ds, global_batch, micro, rank, dp):
            for m in batch:
                n = int(m["num_real_tokens"])
                if n:
                    seen.append(tuple(m["tokens"][0, :n].tolist()))
    return seen


def test_eval_scores_every_sequence_once_across_ranks(prefix):
    from collections import Counter

    ds = PackedSFTDataset(prefix, 64, "bfd", use_cache=False, shuffle_sequences=False)
    expected = Counter(tuple(ds[i]["tokens"][: int(ds[i]["num_real_tokens"])].tolist()) for i in range(len(ds)))
    assert len(ds) % 4 != 0, "the dataset must leave a partial last global batch to test the tail"
    seen = _sequences_seen(ds, ranks=(0, 1))
    assert len(seen) == len(ds) and Counter(seen) == expected  # each sequence once, on one rank
    # micro-batch counts agree across ranks (the tail is padded with empty sequences)
    counts = [sum(len(b) for b in eval_batches(ds, 4, 1, r, 2)) for r in (0, 1)]
    assert counts[0] == counts[1] >= len(ds) / 2
    # negative control: one rank's share scored twice is caught
    assert Counter(_sequences_seen(ds, ranks=(0, 0))) != expected


def test_pad_to_longest_cuts_each_micro_batch_to_its_longest(prefix):
    """padding:pad_to=longest (the HF collator's behaviour): same tokens as padding, shorter rows."""
    full = PackedSFTDataset(prefix, 64, "padding", use_cache=False, pad_to_multiple_of=4)
    short = PackedSFTDataset(prefix, 64, "padding:pad_to=longest", use_cache=False, pad_to_multiple_of=4)
    a, b = TrainStream(full, 8, 4, 0, 1), TrainStream(short, 8, 4, 0, 1)
    for _ in range(3):
        ma, mb = a.next_step(), b.next_step()
        assert a.last_stats["real_tokens"] == b.last_stats["real_tokens"]
        assert b.last_stats["capacity"] == sum(int(m["capacity"]) for m in mb) < a.last_stats["capacity"]
        for x, y in zip(ma, mb):
            rows_x, rows_y = x["tokens"].reshape(4, 64), y["tokens"].reshape(4, -1)
            L = rows_y.shape[1]
            longest = int(max((r != 0).sum() for r in rows_x))
            assert L % 4 == 0 and longest <= L < longest + 4  # the longest, rounded up to the multiple
            assert np.array_equal(rows_x[:, :L], rows_y) and not rows_x[:, L:].any()
            assert int(y["cu_seqlens"][int(y["num_cu_seqlens"]) - 1]) == 4 * L  # padding tails tile the row
            assert x["loss_mask"].sum() == y["loss_mask"].sum()


def test_pad_to_longest_logs_the_tokens_it_runs_under_context_parallel_padding(prefix):
    """With CP every document is padded to a multiple, and the cut is at the longest row's padded
    end: the logged capacity counts those tokens (the real lengths would undercount)."""
    short = PackedSFTDataset(prefix, 64, "padding:pad_to=longest", use_cache=False, document_multiple=8)
    stream, real_cut = TrainStream(short, 8, 4, 0, 1), 0
    for _ in range(3):
        micro = stream.next_step()
        assert stream.last_stats["capacity"] == sum(int(m["capacity"]) for m in micro)
        real_cut += any(m["tokens"].numel() % 8 == 0 and m["tokens"].numel() < 4 * 64 for m in micro)
    assert real_cut
