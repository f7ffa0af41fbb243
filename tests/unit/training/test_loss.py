"""Masked token loss and its global-batch normalisation."""

import pytest
import torch

from megatron_pack.training.loss import masked_loss, reduce_reports, segment_ids


def test_token_weighting_sums_and_counts():
    losses = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    loss, count, rep = masked_loss(losses, mask, "token")
    assert loss.item() == pytest.approx(1.3)
    assert int(count) == 5
    assert rep["lm loss"].tolist() == pytest.approx([1.3, 5.0])
    assert (loss / count).item() == pytest.approx(0.26)


def test_sample_weighting_is_mean_of_sample_means():
    # the example of the module docstring: segments [0,2) [2,6) and a padding tail [6,8)
    losses = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    cu = torch.tensor([0, 2, 6, 8, -1, -1], dtype=torch.int32)
    loss, count, _ = masked_loss(losses, mask, "sample", cu, 4)
    assert loss.item() == pytest.approx(0.5 + 0.1)  # sum of means; the padding segment has no tokens
    assert int(count) == 2
    assert (loss / count).item() == pytest.approx(0.3)


def test_global_normalisation_is_independent_of_the_micro_batch_split():
    """Mean over all supervised tokens of the global batch, however they are split."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(1, 64, generator=g)
    mask = (torch.rand(1, 64, generator=g) > 0.3).float()
    whole = (losses * mask).sum() / mask.sum()
    for cut in (5, 17, 40):
        parts = [masked_loss(losses[:, :cut], mask[:, :cut])[2], masked_loss(losses[:, cut:], mask[:, cut:])[2]]
        mean, count = reduce_reports(parts)
        assert mean == pytest.approx(whole.item(), rel=1e-6)
        assert count == int(mask.sum())
    # a per-micro-batch mean would differ: the two halves hold different token counts
    a, b = masked_loss(losses[:, :5], mask[:, :5]), masked_loss(losses[:, 5:], mask[:, 5:])
    naive = ((a[0] / a[1]) + (b[0] / b[1])) / 2
    assert abs(naive.item() - whole.item()) > 1e-3


def test_gradient_of_token_loss_weights_every_token_equally():
    x = torch.zeros(1, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.float32)
    loss, count, _ = masked_loss(x + 1.0, mask)
    (loss / count).backward()
    assert x.grad[0].tolist() == pytest.approx([0.2, 0.2, 0.0, 0.2, 0.2, 0.2])


def test_segment_ids_and_bad_bounds():
    cu = torch.tensor([0, 2, 5, 6, -1], dtype=torch.int32)
    assert segment_ids(cu, 4, 6).tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_ids(cu, 4, 7)
    with pytest.raises(ValueError, match="weighting"):
        masked_loss(torch.zeros(3), torch.ones(3), "mean")
    with pytest.raises(ValueError, match="cu_seqlens"):
        masked_loss(torch.zeros(3), torch.ones(3), "sample")


def test_empty_report_gives_nan():
    mean, count = reduce_reports([])
    assert count == 0 and mean != mean


def test_per_source_sums_split_the_token_loss():
    from megatron_pack.training.loss import reduce_source_reports

    torch.manual_seed(0)
    losses = torch.rand(1, 12)
    mask = (torch.rand(1, 12) > 0.3).float()
    source = torch.tensor([2, 0, 2])  # three sequences of 4 tokens laid end to end
    loss, count, rep = masked_loss(losses, mask, "token", source=source, num_sources=3)
    sums = rep["source loss"]
    assert sums.shape == (3, 2)
    assert torch.allclose(sums[:, 0].sum(), loss) and int(sums[:, 1].sum()) == int(count)
    assert float(sums[1, 1]) == 0.0  # source 1 has no sequence here
    expect0 = float((losses[0, 4:8] * mask[0, 4:8]).sum())
    assert float(sums[0, 0]) == pytest.approx(expect0)
    by = reduce_source_reports([rep, rep], 3)
    assert by[0] == (pytest.approx(expect0 / float(mask[0, 4:8].sum())), 2 * int(mask[0, 4:8].sum()))
    assert by[1][1] == 0
    # negative control: swapping the sources moves the sums
    _, _, rep2 = masked_loss(losses, mask, "token", source=torch.tensor([0, 2, 0]), num_sources=3)
    assert not torch.equal(rep2["source loss"], sums)
    # no source, no per-source report (plain runs are unchanged)
    assert "source loss" not in masked_loss(losses, mask)[2]

def test_sample_weighting_from_segment_ids_equals_cu_seqlens():
    """The context-parallel path (segment of every local token, as split_batch_for_cp gives it)
    is the same computation as segments from cu_seqlens."""
    import torch

    from megatron_pack.training.loss import masked_loss

    losses = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.7, 0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    cu = torch.tensor([0, 2, 6, 8, -1], dtype=torch.int32)
    a = masked_loss(losses, mask, "sample", cu, 4)
    seg = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]])
    perm = torch.tensor([6, 2, 0, 7, 3, 1, 5, 4])  # any token order, as CP chunks reorder them
    b = masked_loss(losses[:, perm], mask[:, perm], "sample", None, 4, segment_ids=seg[:, perm])
    assert abs(float(a[0]) - 0.6) < 1e-6 and abs(float(b[0]) - 0.6) < 1e-6 and int(a[1]) == int(b[1]) == 2
