"""Context parallelism (CP) for packed THD rows: per-document padding and the per-rank split.

Transformer Engine and Megatron-Core cut every document (segment) of a packed row into
``2 * CP`` equal chunks and give CP rank ``r`` chunks ``r`` and ``2*CP - 1 - r`` (the causal
work of an early chunk and a late one balance). So every document is padded to a multiple
of ``2 * CP`` (of ``lcm(2*CP, TP*CP)`` with sequence parallel, so each rank's share also
splits over TP) and two boundary lists travel with the row, as TE's THD attention wants::

    docs a (5 tokens), b (3 tokens), CP = 2 -> multiple 4, row S = 16 (``.`` = padding)

    tokens              a0 a1 a2 a3 a4 .  .  .  b0 b1 b2 .  .  .  .  .
    chunks (of 2 each)  |0 a  |1 a  |2 a  |3 a  |0 b  |1 b  |tail ...
    cu_seqlens          [0, 5, 8, 8]        real tokens per segment, cumulated (TE's cu_seqlens)
    cu_seqlens_padded   [0, 8, 12, 16]      where each segment starts in the row

    CP rank 0 takes chunks 0 and 3 of every segment:  a0 a1 .  .  | b0 b1 .  . | tail 0, 3
    CP rank 1 takes chunks 1 and 2:                   a2 a3 a4 .  | b2 .  .  . | tail 1, 2

Tokens, labels, loss mask and positions are split the same way; padding has zero loss.
Positions stay the global per-document positions (a2 keeps position 2 on rank 1), which
is what Megatron-Core's THD RoPE computes from ``cu_seqlens_padded`` and the CP group.
The packer packs each document at its padded length (``build_plan(pad_multiple=...)``),
so the padded documents of a sequence never exceed ``--seq-length``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids")


def document_multiple(cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """What each document is padded to under CP: ``2*CP``, or ``lcm(2*CP, TP*CP)`` with
    sequence parallel (as Megatron-Bridge does); 1 (no padding) without CP."""
    if cp_size < 1 or tp_size < 1:
        raise ValueError(f"cp_size and tp_size must be >= 1, got {cp_size}, {tp_size}")
    if cp_size == 1:
        return 1
    m = 2 * cp_size
    if sequence_parallel and tp_size > 1:
        m = math.lcm(m, tp_size * cp_size)
    return m


def padded_lengths(lengths, multiple: int) -> np.ndarray:
    """Each length rounded up to ``multiple``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return -(-lengths // multiple) * multiple


def rank_token_index(cu_seqlens_padded, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the global row of the tokens CP rank ``cp_rank`` holds, in its local order:
    for every segment, chunk ``cp_rank`` then chunk ``2*cp_size - 1 - cp_rank``."""
    bounds = torch.as_tensor(cu_seqlens_padded).to(torch.int64).tolist()
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n < 0 or n % (2 * cp_size):
            raise ValueError(f"segment [{start}, {end}) of cu_seqlens_padded {bounds} is not a multiple of "
                             f"2 * CP = {2 * cp_size}; documents must be padded for context parallelism")
        c = n // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + j * c, start + (j + 1) * c))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def gathered_key_index(cu_seqlens_padded, cp_size: int, local_tokens: int) -> torch.Tensor:
    """Inverse of the split: for every global position, where it sits in the CP ranks' local
    rows laid end to end (``[cp_size * local_tokens]``, rank-major, as an all-gather returns)."""
    bounds = torch.as_tensor(cu_seqlens_padded).to(torch.int64).tolist()
    if bounds[-1] != cp_size * local_tokens:
        raise ValueError(f"cu_seqlens_padded ends at {bounds[-1]}, expected CP {cp_size} x {local_tokens} tokens")
    out = torch.empty(bounds[-1], dtype=torch.int64)
    for r in range(cp_size):
        out[rank_token_index(bounds, cp_size, r)] = torch.arange(r * local_tokens, (r + 1) * local_tokens)
    return out


def split_batch_for_cp(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's share of a THD micro-batch (``collate_thd`` output with
    ``cu_seqlens_padded``): per-token fields ``[1, T]`` -> ``[1, T / cp_size]``. The boundary
    lists stay global (TE and the local attention both want them), ``cp_size`` is recorded."""
    if cp_size == 1:
        return batch
    if "cu_seqlens_padded" not in batch:
        raise ValueError("context parallelism needs per-document padding (cu_seqlens_padded); build the "
                         "dataset with document_multiple=document_multiple(cp_size, ...)")
    n = int(batch["num_cu_seqlens"])
    bounds = batch["cu_seqlens_padded"][:n]
    total = batch["tokens"].size(-1)
    if int(bounds[-1]) != total:
        raise ValueError(f"cu_seqlens_padded ends at {int(bounds[-1])}, the row holds {total} tokens")
    idx = rank_token_index(bounds, cp_size, cp_rank)
    out = dict(batch)
    for k in _PER_TOKEN:
        out[k] = batch[k].index_select(-1, idx.to(batch[k].device))
    lens = (bounds[1:] - bounds[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)  # segment of every global position
    out["segment_ids"] = seg.index_select(0, idx).unsqueeze(0)  # for per-sample loss weighting
    out["cp_size"] = cp_size
    return out
