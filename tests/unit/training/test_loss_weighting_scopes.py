"""One loss normalisation for every packing scope: a padded step and the same step packed per
step give the same token mean and the same per-sample mean, however rows fall into
micro-batches; token and sample weighting differ when conversation lengths differ."""

import numpy as np
import pytest
import torch

from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.sampling import TrainStream
from megatron_pack.data.step_dataset import StepPackedDataset
from megatron_pack.data.step_packing import StepTrainStream
from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.training.loss import masked_loss, reduce_reports

GBS = 8


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(9)
    with SFTDatasetWriter(str(tmp_path / "d")) as w:
        for i in range(40):
            n = int(rng.integers(3, 30))
            mask = [0] * n if i == 4 else [0] * (n // 3) + [1] * (n - n // 3)  # one without a trained token
            w.add(rng.integers(1, 200, n).tolist(), mask, [0])
    return str(tmp_path / "d")


def fake_losses(batch):
    """A per-token 'loss' that depends only on the token and its label, so a conversation gets the
    same losses wherever it sits (what the document mask guarantees for the model)."""
    return (batch["tokens"].double() * 0.013 + batch["labels"].double() * 0.007) % 1.0


def step_loss(micro, weighting):
    reports = [masked_loss(fake_losses(b), b["loss_mask"], weighting, b["cu_seqlens"], b["num_cu_seqlens"])[2]
               for b in micro]
    return reduce_reports(reports)


def test_packed_step_equals_padded_step_for_both_weightings(prefix, tmp_path):
    kw = dict(seed=5, cache_dir=str(tmp_path / "p"))
    padded = TrainStream(PackedSFTDataset(prefix, 64, "padding", **kw), GBS, 2, 0, 1)
    packed = StepTrainStream(StepPackedDataset(prefix, 64, global_batch_size=GBS, **kw), GBS, 1, 0, 1)
    differs = 0
    for _ in range(4):
        a, b = padded.next_step(), packed.next_step()
        assert len(b) < len(a)  # fewer rows than the padded step
        for w in ("token", "sample"):
            (la, ca), (lb, cb) = step_loss(a, w), step_loss(b, w)
            assert ca == cb and la == pytest.approx(lb, rel=1e-6), w  # fp32 sums
        # sample counts conversations with a trained token: what a padded per-sample mean divides by
        assert step_loss(a, "sample")[1] == sum(int(r.sum() > 0) for x in a for r in x["loss_mask"].reshape(2, -1))
        differs += abs(step_loss(a, "token")[0] - step_loss(a, "sample")[0]) > 1e-6
    assert differs  # negative control: the two weightings are different objectives here


def test_sample_weighting_is_the_padded_per_sample_mean(prefix, tmp_path):
    """Independent of masked_loss: the mean over the step's conversations of each one's mean
    trained-token loss, conversations without a trained token left out."""
    kw = dict(seed=5, cache_dir=str(tmp_path / "p"))
    ds = PackedSFTDataset(prefix, 64, "padding", **kw)
    packed = StepTrainStream(StepPackedDataset(prefix, 64, global_batch_size=GBS, **kw), GBS, 1, 0, 1)
    for k in range(3):
        means = []
        for i in range(k * GBS, (k + 1) * GBS):
            row = ds[i]
            m = row["loss_mask"].double()
            if m.sum() > 0:
                means.append(float((fake_losses(row) * m).sum() / m.sum()))
        loss, count = step_loss(packed.next_step(), "sample")
        assert count == len(means) and loss == pytest.approx(np.mean(means), rel=1e-6)


def test_a_step_without_trained_tokens_counts_zero():
    losses = torch.rand(1, 8, dtype=torch.float64)
    mask = torch.zeros(1, 8)
    cu = torch.tensor([0, 3, 8, -1], dtype=torch.int32)
    for w in ("token", "sample"):
        _, count, rep = masked_loss(losses, mask, w, cu, 3)
        assert int(count) == 0 and reduce_reports([rep])[1] == 0  # the training step skips it
