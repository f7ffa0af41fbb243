"""The per-step stream: the padded run's steps, every rank the same micro-batch count, resumable."""

import numpy as np
import pytest
import torch

from megatron_pack.data.balance import BatchBalancer
from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.sampling import DataPosition, TrainStream, epochs_to_iters
from megatron_pack.data.step_dataset import StepPackedDataset
from megatron_pack.data.step_packing import StepTrainStream, train_stream
from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.model.cost import CostModel
from megatron_pack.model.presets import get_preset

GBS, MBS = 8, 2


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(5)
    with SFTDatasetWriter(str(tmp_path / "d")) as w:
        for _ in range(45):
            n = int(rng.integers(3, 40))
            w.add(rng.integers(1, 200, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3), [0, n // 3])
    return str(tmp_path / "d")


def _docs(batch_list):
    """(doc, first token) of every real segment of a step's micro-batches, for set comparison."""
    out = []
    for b in batch_list:
        cu = b["cu_seqlens"][: int(b["num_cu_seqlens"])].tolist()
        toks = b["tokens"].reshape(-1)
        out += [(int(toks[a]), int(e - a)) for a, e in zip(cu, cu[1:]) if b["loss_mask"].reshape(-1)[a:e].sum() > 0]
    return out


def _balancer(dp):
    cost = CostModel.from_architecture(get_preset("tiny"), vocab_size=256)
    return BatchBalancer(cost, dp, MBS)


@pytest.mark.parametrize("dp,fixed", [(1, True), (2, True), (2, False), (4, False)])
def test_steps_take_the_padded_steps_on_every_rank_alike(prefix, tmp_path, dp, fixed):
    kw = dict(seed=7, cache_dir=str(tmp_path / "plans"))
    padded = PackedSFTDataset(prefix, 48, "padding", **kw)
    step = StepPackedDataset(prefix, 48, "bfd", global_batch_size=GBS, **kw)
    assert step.num_steps == len(padded) // GBS == epochs_to_iters(step, GBS, 1.0)
    pad_streams = [TrainStream(padded, GBS, MBS, r, dp) for r in range(dp)]
    step_streams = [train_stream(step, GBS, MBS, r, dp, balancer=_balancer(dp) if dp > 1 else None,
                                 fixed_shapes=fixed) for r in range(dp)]
    assert all(isinstance(s, StepTrainStream) for s in step_streams)
    for k in range(step.num_steps + 2):  # into the next epoch
        want = sorted(d for s in pad_streams for d in _docs(s.next_step()))
        micro = [s.next_step() for s in step_streams]
        assert len({len(m) for m in micro}) == 1  # the same micro-batch count on every rank
        assert sorted(d for m in micro for d in _docs(m)) == want, k
        st = step_streams[0].last_stats
        assert st["rows"] <= GBS and st["samples"] == GBS
        assert st["real_tokens"] == pad_streams[0].last_stats["real_tokens"]
    assert step_streams[0].pos.epoch == 1
    assert step_streams[0].pos.consumed_samples == pad_streams[0].pos.consumed_samples


@pytest.mark.parametrize("fixed", [True, False])
def test_fillers_are_empty_rows(prefix, tmp_path, fixed):
    """Empty rows even out the ranks' micro-batch counts; with fixed shapes (PP) each micro-batch
    is MBS rows, otherwise it keeps its real rows cut to the longest one's real tokens (as
    padding:pad_to=longest) and an all-empty one is a few tokens long."""
    step = StepPackedDataset(prefix, 48, "bfd", global_batch_size=GBS, seed=7, cache_dir=str(tmp_path / "p"))
    rows = step.rows_per_step()
    assert any(r % (2 * MBS) for r in rows)  # some step needs filling at DP 2
    empty = step.empty_row()
    assert float(empty["loss_mask"].sum()) == 0 and int(empty["num_real_tokens"]) == 0
    streams = [train_stream(step, GBS, MBS, r, 2, fixed_shapes=fixed) for r in (0, 1)]
    shorter = 0
    for _ in range(step.num_steps):
        micro = [s.next_step() for s in streams]
        n = streams[0].last_stats["rows"]
        assert len(micro[0]) == len(micro[1]) == -(-n // (2 * MBS))
        sizes = [int(b["tokens"].numel()) for m in micro for b in m]
        if fixed:
            assert set(sizes) == {MBS * 48}
        else:
            assert all(x <= MBS * 48 for x in sizes)
            shorter += any(x < MBS * 48 and x % 48 for x in sizes)  # cut below a full row
        assert sum(sizes) == streams[0].last_stats["capacity"]
        assert sum(int(b["num_real_tokens"]) for m in micro for b in m) == streams[0].last_stats["real_tokens"]
    assert fixed or shorter


@pytest.mark.parametrize("mask", [True, False])
def test_logged_capacity_is_what_runs_under_context_parallel_padding(prefix, tmp_path, mask):
    """With context parallelism each document is padded to a multiple and a micro-batch is cut
    at its longest row's padded end: the logged capacity counts those tokens, not the real ones."""
    step = StepPackedDataset(prefix, 48, "bfd", global_batch_size=GBS, seed=7, cache_dir=str(tmp_path / "p"),
                             document_multiple=8, document_mask=mask)
    stream = train_stream(step, GBS, MBS, 0, 1, fixed_shapes=False)
    cut_at_padded_end = 0
    for _ in range(step.num_steps):
        micro = stream.next_step()
        sizes = [int(b["tokens"].numel()) for b in micro]
        assert sum(sizes) == stream.last_stats["capacity"]
        cut_at_padded_end += any(x < MBS * 48 for x in sizes)
    assert cut_at_padded_end  # some micro-batch is trimmed, so the count is tested


def test_resume_from_position_continues_exactly(prefix, tmp_path):
    kw = dict(seed=3, cache_dir=str(tmp_path / "p"), global_batch_size=GBS)
    full = StepTrainStream(StepPackedDataset(prefix, 48, **kw), GBS, MBS, 0, 1)
    batches = [full.next_step() for _ in range(7)]
    pos = DataPosition(epoch=0, step_in_epoch=3, consumed_samples=3 * GBS)
    resumed = StepTrainStream(StepPackedDataset(prefix, 48, **kw), GBS, MBS, 0, 1, DataPosition(**vars(pos)))
    for k in range(3, 7):
        got = resumed.next_step()
        assert len(got) == len(batches[k])
        for a, b in zip(got, batches[k]):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["cu_seqlens"], b["cu_seqlens"])


def test_step_scope_packs_with_bfd_only(prefix, tmp_path):
    with pytest.raises(ValueError, match="bfd"):
        StepPackedDataset(prefix, 48, "greedy", global_batch_size=GBS, cache_dir=str(tmp_path / "p"))
