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

Items with ``cu_seqlens_padded`` (context parallelism, every segment padded to 2*CP) keep
both lists: ``cu_seqlens_padded`` shifted as above, ``cu_seqlens`` the real tokens cumulated
(TE's convention), the tail segment holding none.
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
    padded = "cu_seqlens_padded" in batch[0]
    bounds, real = [0], [0]  # segment starts in the row; real tokens cumulated (context parallel)
    max_seqlen = 0
    for i, b in enumerate(batch):
        if b["tokens"].numel() != S or b["cu_seqlens"].numel() != K:
            raise ValueError(f"batch item {i} has shape {tuple(b['tokens'].shape)}/{K}, expected ({S},)/{K}")
        if ("cu_seqlens_padded" in b) != padded:
            raise ValueError(f"batch item {i}: some items have cu_seqlens_padded and some do not")
        n = int(b["num_cu_seqlens"])
        cu = (b["cu_seqlens_padded"] if padded else b["cu_seqlens"])[:n].tolist()
        bounds.extend(i * S + c for c in cu[1:])
        if padded:
            base = real[-1]
            real.extend(base + c for c in b["cu_seqlens"][1:n].tolist())
        if cu[-1] < S:  # the padding tail is its own segment
            bounds.append((i + 1) * S)
            real.append(real[-1])  # with no real token in it
            max_seqlen = max(max_seqlen, S - cu[-1])
        max_seqlen = max(max_seqlen, int(b["max_seqlen"]))
    cu_seqlens = torch.full((len(batch) * K + 1,), -1, dtype=torch.int32)
    cu_seqlens[: len(bounds)] = torch.tensor(real if padded else bounds, dtype=torch.int32)
    out["cu_seqlens"] = cu_seqlens
    if padded:
        cu_padded = torch.full((len(batch) * K + 1,), -1, dtype=torch.int32)
        cu_padded[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
        out["cu_seqlens_padded"] = cu_padded
    out["num_cu_seqlens"] = torch.tensor(len(bounds), dtype=torch.int64)
    out["max_seqlen"] = torch.tensor(max_seqlen, dtype=torch.int64)
    out["num_real_tokens"] = torch.tensor(sum(int(b["num_real_tokens"]) for b in batch), dtype=torch.int64)
    if "source" in batch[0]:  # blends: the source of each row, for the per-source loss
        out["source"] = torch.tensor([int(b["source"]) for b in batch], dtype=torch.int64)
    return out


def trim_to_longest(batch: list[dict], multiple: int = 1) -> list[dict]:
    """Cut every item to the longest one's real tokens, rounded up to ``multiple``: the HF
    collator's "pad to the longest in the micro-batch" (``padding:pad_to=longest``).

    Items keep their ``cu_seqlens``: every boundary lies within the real tokens, which all fit;
    with ``cu_seqlens_padded`` (context parallelism) within the last padded document's end.
    """
    L = trimmed_length(max(_used_length(b) for b in batch), multiple, batch[0]["tokens"].numel())
    return [{**b, **{k: b[k][:L] for k in _PER_TOKEN}} for b in batch]


def trimmed_length(longest: int, multiple: int, full: int) -> int:
    """The length :func:`trim_to_longest` cuts a micro-batch to: ``longest`` rounded up to
    ``multiple`` (at least one multiple), at most ``full`` (the sequence length)."""
    return min(full, max(multiple, -(-longest // multiple) * multiple))


def _used_length(item: dict) -> int:
    """Tokens of ``item`` up to its last document's end (CP: its padded end)."""
    if "cu_seqlens_padded" in item:
        return int(item["cu_seqlens_padded"][int(item["num_cu_seqlens"]) - 1])
    return int(item["num_real_tokens"])
