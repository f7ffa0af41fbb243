"""Masked cross-entropy, normalised over the whole global batch.

Megatron-Core's schedules take a loss function returning ``(loss, count, report)``; with
``TransformerConfig.calculate_per_token_loss=True`` they do not divide per micro-batch:
the backward pass runs on the *sum*, the counts are added over micro-batches, and
``finalize_model_grads`` all-reduces the count over data-parallel ranks and scales the
gradients by ``1 / count``. So returning

* ``token`` weighting: ``(sum of masked token losses, number of supervised tokens)``
  gives the mean over every supervised token of the global batch, however the tokens
  fall into micro-batches, ranks or packed sequences;
* ``sample`` weighting: ``(sum over samples of the sample's mean loss, number of
  samples)`` gives the mean over samples of the global batch.

Samples are the segments of ``cu_seqlens`` that hold at least one supervised token (so a
conversation that ``random`` packing cut in two counts as two samples), e.g.
per-token losses of one packed row and its segments::

    losses      .5 .5 .1 .1 .1 .1 | pad
    loss_mask    1  1  1  1  1  0 |  0
    cu_seqlens  [0,    2,          6, 8]
    token:  (0.5+0.5+0.1*3) / 5           = 0.26
    sample: ((0.5+0.5)/2 + (0.1*3)/3) / 2 = 0.3
"""

from __future__ import annotations

import torch

LOSS_WEIGHTINGS = ("token", "sample")


def segment_ids(cu_seqlens: torch.Tensor, num_cu_seqlens: int, total: int) -> torch.Tensor:
    """Segment index of every position of a packed row of ``total`` tokens."""
    bounds = cu_seqlens[: int(num_cu_seqlens)].to(torch.int64)
    if int(bounds[0]) != 0 or int(bounds[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to {total}, got {bounds.tolist()}")
    lens = bounds[1:] - bounds[:-1]
    return torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)


_segment_ids = segment_ids  # masked_loss has an argument of that name


def masked_loss(losses: torch.Tensor, loss_mask: torch.Tensor, weighting: str = "token",
                cu_seqlens: torch.Tensor | None = None, num_cu_seqlens: int | None = None,
                segment_ids: torch.Tensor | None = None, cp_group=None,
                source: torch.Tensor | None = None, num_sources: int = 0):
    """``(loss sum, count, report)`` for Megatron-Core's per-token-loss schedules.

    ``losses`` and ``loss_mask`` have the same shape (``[1, T]`` for a THD row). For
    ``sample`` weighting, ``cu_seqlens`` (THD, ``-1`` padded) and ``num_cu_seqlens`` mark
    the samples. ``report["lm loss"]`` is ``[loss sum, count]``, the pair that is summed
    over micro-batches and ranks before dividing, so logs show the exact objective.

    Context parallelism: a sample's tokens are spread over the CP ranks. ``segment_ids``
    (from :func:`~megatron_pack.data.context_parallel.split_batch_for_cp`) gives each local
    token's sample; each rank divides its part of a sample's loss by the sample's supervised
    tokens over the whole CP group, and only CP rank 0 counts the samples, so the sums over
    ranks are exactly the CP 1 figures.

    Blends: ``source`` is the source id of every token of the row (local tokens under CP, see
    :func:`megatron_pack.training.step.token_sources`); ``report["source loss"]`` then holds
    ``[token loss sum, supervised tokens]`` per source.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    losses = losses.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    if losses.shape != mask.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and loss_mask {tuple(mask.shape)} differ")
    if weighting == "token":
        loss = torch.sum(losses * mask)
        count = mask.sum().to(torch.int)
    else:
        if num_cu_seqlens is None or (cu_seqlens is None and segment_ids is None):
            raise ValueError("sample weighting needs cu_seqlens (or segment_ids) and num_cu_seqlens")
        seg = (segment_ids.reshape(-1).to(losses.device) if segment_ids is not None
               else _segment_ids(cu_seqlens, num_cu_seqlens, losses.numel()))
        n_seg = int(num_cu_seqlens) - 1
        seg_sum = torch.zeros(n_seg, dtype=losses.dtype, device=losses.device).index_add(0, seg, losses * mask)
        seg_cnt = torch.zeros(n_seg, dtype=losses.dtype, device=losses.device).index_add(0, seg, mask)
        if cp_group is not None and cp_group.size() > 1:
            torch.distributed.all_reduce(seg_cnt, group=cp_group)  # counts carry no gradient
        has = seg_cnt > 0
        loss = torch.sum(seg_sum[has] / seg_cnt[has])
        count = has.sum().to(torch.int)
        if cp_group is not None and cp_group.size() > 1 and cp_group.rank() != 0:
            count = torch.zeros_like(count)
    report = {"lm loss": torch.stack([loss.detach().clone(), count.to(loss.dtype)])}
    if source is not None and num_sources:
        report["source loss"] = source_sums(losses.detach(), mask, source.to(losses.device), num_sources)
    return loss, count, report


def source_sums(losses: torch.Tensor, mask: torch.Tensor, source: torch.Tensor, num_sources: int) -> torch.Tensor:
    """``[num_sources, 2]``: masked token-loss sum and supervised-token count per source.
    ``source``: the source of every token, or of each of the equal-length sequences of the row."""
    source = source.to(torch.int64).reshape(-1)
    per_token = (source if source.numel() == losses.numel()
                 else source.repeat_interleave(losses.numel() // source.numel()))
    out = torch.zeros(num_sources, 2, dtype=losses.dtype, device=losses.device)
    out[:, 0].index_add_(0, per_token, losses * mask)
    out[:, 1].index_add_(0, per_token, mask)
    return out


def reduce_source_reports(reports: list, num_sources: int, group=None) -> list:
    """Per-source ``(mean token loss, supervised tokens)`` from the ``"source loss"`` reports,
    summed over micro-batches and all-reduced over ``group`` like :func:`reduce_reports`."""
    total = torch.zeros(num_sources, 2, dtype=torch.float64)
    for r in reports:
        total += r["source loss"].detach().to("cpu", torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = total.to(_collective_device())
        torch.distributed.all_reduce(t, group=group)
        total = t.cpu()
    out = []
    for loss_sum, count in total.tolist():
        n = int(round(count))
        out.append((loss_sum / n if n else float("nan"), n))
    return out


def reduce_reports(reports: list, key: str = "lm loss", group=None) -> tuple[float, int]:
    """Sum the ``[loss sum, count]`` pairs of the micro-batches, all-reduce over ``group``
    (data parallel), return ``(mean loss, count)``. Ranks without reports (not the last
    pipeline stage) pass an empty list and still join the collective."""
    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r[key].detach().to("cpu", torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = _collective_device()
        t = total.to(dev)
        torch.distributed.all_reduce(t, group=group)
        total = t.cpu()
    loss_sum, count = float(total[0]), int(round(float(total[1])))
    return (loss_sum / count if count else float("nan")), count


def _collective_device():
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
