"""Collate ``PackedSFTDataset`` items into micro-batches, padded (BSHD) or concatenated (THD).

Two sequences, S = 6, K = 3 (``.`` = padding)::

    item 0  tokens a a a b b .   cu_seqlens [0, 3, 5]    num_cu_seqlens 3
    item 1  tokens c c c c . .   cu_seqlens [0, 4, -1]   num_cu_seqlens 2

:func:`collate_padded` stacks them, one row per sequence (``[B, S]``, ``cu_seqlens [B, K]``);
attention runs per row, with the segments of each row from its own ``cu_seqlens``::

    tokens      [[a a a b b .]
                 [c c c c . .]]

:func:`collate_thd` lays the rows end to end as one packed row ``[1, B*S]`` and shifts
each row's boundaries by its offset, the way Megatron feeds packed batches to
``PackedSeqParams(qkv_format="thd")``. Each row's padding tail becomes a segment of its
own (zero loss) so the segments tile the whole row and no real token attends to padding::

    tokens      [[a a a b b . c c c c . .]]
    cu_seqlens  [0, 3, 5, 6, 10, 12, -1, ...]   (B*K + 1 entries, -1 padded)
                 a     b  .  c      ..
    num_cu_seqlens 6, max_seqlen 4 (over all segments, padding included)
"""

from __future__ import annotations

import torch

_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids")


def collate_padded(batch: list[dict]) -> dict:
    """Stack items: per-token fields ``[B, S]``, ``cu_seqlens [B, K]``, scalars ``[B]``."""
    if not batch:
        raise ValueError("empty batch")
    out = {k: torch.stack([b[k] for b in batch]) for k in (*_PER_TOKEN, "cu_seqlens")}
    for k in ("num_cu_seqlens", "max_seqlen", "num_real_tokens"):
        out[k] = torch.tensor([int(b[k]) for b in batch], dtype=torch.int64)
    return out


def collate_thd(batch: list[dict]) -> dict:
    """Concatenate items into one packed row ``[1, B*S]`` with shifted ``cu_seqlens``.

    Returns per-token fields ``[1, B*S]``, ``cu_seqlens`` int32 ``[B*K + 1]`` (``-1`` padded),
    and scalar tensors ``num_cu_seqlens``, ``max_seqlen``, ``num_real_tokens`` (summed).
    """
    if not batch:
        raise ValueError("empty batch")
    out = {k: torch.cat([b[k] for b in batch]).unsqueeze(0) for k in _PER_TOKEN}
    S, K = batch[0]["tokens"].numel(), batch[0]["cu_seqlens"].numel()
    bounds = [0]
    max_seqlen = 0
    for i, b in enumerate(batch):
        if b["tokens"].numel() != S or b["cu_seqlens"].numel() != K:
            raise ValueError(f"batch item {i} has shape {tuple(b['tokens'].shape)}/{K}, expected ({S},)/{K}")
        cu = b["cu_seqlens"][: int(b["num_cu_seqlens"])].tolist()
        bounds.extend(i * S + c for c in cu[1:])
        if cu[-1] < S:  # the padding tail is its own segment
            bounds.append((i + 1) * S)
            max_seqlen = max(max_seqlen, S - cu[-1])
        max_seqlen = max(max_seqlen, int(b["max_seqlen"]))
    cu_seqlens = torch.full((len(batch) * K + 1,), -1, dtype=torch.int32)
    cu_seqlens[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
    out["cu_seqlens"] = cu_seqlens
    out["num_cu_seqlens"] = torch.tensor(len(bounds), dtype=torch.int64)
    out["max_seqlen"] = torch.tensor(max_seqlen, dtype=torch.int64)
    out["num_real_tokens"] = torch.tensor(sum(int(b["num_real_tokens"]) for b in batch), dtype=torch.int64)
    return out


def trim_to_longest(batch: list[dict], multiple: int = 1) -> list[dict]:
    """Cut every item to the longest one's real tokens, rounded up to ``multiple``: the HF
    collator's "pad to the longest in the micro-batch" (``padding:pad_to=longest``).

    Items keep their ``cu_seqlens``: every boundary lies within the real tokens, which all fit.
    """
    longest = max(int(b["num_real_tokens"]) for b in batch)
    S = batch[0]["tokens"].numel()
    L = min(S, max(multiple, -(-longest // multiple) * multiple))
    return [{**b, **{k: b[k][:L] for k in _PER_TOKEN}} for b in batch]
