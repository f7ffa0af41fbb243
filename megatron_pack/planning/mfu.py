"""Model FLOPs utilisation of a training run, from its real tokens: one formula for the GPU check
and the transformers comparison.

Per real token, forward + backward (:class:`megatron_pack.model.cost.CostModel`)::

    flops/token = 6 * N_matmul  +  6 * L * a * d * sum_i s_i^2 / sum_i s_i

The attention term already counts the causal half of each document's square (a causally masked
kernel skips the upper triangle), so it is **not** halved again; with the document mask each
document attends only to itself, so ``s_i`` are the documents' lengths whatever the layout.
Padding tokens count for nothing: ``MFU = real tokens/s * flops/token / peak FLOP/s``.
"""

from __future__ import annotations

from typing import Iterable


def flops_per_real_token(cost, lengths: Iterable[int]) -> float:
    """Average model FLOPs per real token of documents of these ``lengths`` (``cost``: a ``CostModel``)."""
    lens = [int(n) for n in lengths]
    tokens = sum(lens)
    if tokens <= 0:
        raise ValueError("no real tokens to count FLOPs over")
    return cost.linear_flops_per_token + cost.attention_flops_per_sq * sum(n * n for n in lens) / tokens


def mfu(real_tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Share of ``peak_flops`` (FLOP/s) that the model's own arithmetic used."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return real_tokens_per_s * flops_per_token / peak_flops
