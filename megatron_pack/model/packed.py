"""From a collated micro-batch to ``GPTModel.forward`` arguments, on every pipeline stage.

A THD micro-batch from :func:`megatron_pack.data.collate.collate_thd`::

    tokens          [[a a a b b . c c c c . .]]           [1, t]
    cu_seqlens      [0, 3, 5, 6, 10, 12, -1, ...]          fixed length, -1 padded
    num_cu_seqlens  6                                      valid entries
    max_seqlen      4

becomes ``PackedSeqParams(qkv_format="thd", cu_seqlens_q = cu_seqlens_kv = [0, 3, 5, 6, 10, 12],
max_seqlen_q = max_seqlen_kv = 4)``. Megatron-Core then restarts RoPE at each boundary and the
core attention keeps every query inside its segment.

Pipeline parallelism: ``cu_seqlens`` is needed by *every* stage (each one runs attention
and RoPE), not only the first, which is the only one that needs the tokens. Megatron-LM's
``get_batch`` returns nothing on intermediate stages, so packed runs there silently attend
across documents. The rule here: **every rank (each TP rank, each PP stage) reads the same
micro-batch from its own data iterator** (the packed dataset is deterministic and memory
mapped, so this costs nothing) and calls :func:`model_inputs` on it; the function passes
``packed_seq_params`` whatever the stage. Stages that do not embed tokens ignore
``input_ids``; stages without the output layer ignore ``labels``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def packed_seq_params_from_batch(batch: dict, *, device: Optional[torch.device] = None,
                                 cp_group=None) -> Optional[PackedSeqParams]:
    """``PackedSeqParams`` for a THD batch; ``None`` for a padded batch (one document per row).

    THD batches have a 1-D ``cu_seqlens`` (collate_thd). A padded batch (``[B, K]``
    ``cu_seqlens`` from collate_padded, or none) is attended causally per row, which is exact
    only when each row holds one document: a row with several is refused rather than
    trained with attention across its documents.
    """
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    if cu.dim() == 2:
        n = batch.get("num_cu_seqlens")
        if n is not None and int(torch.as_tensor(n).max()) > 2:
            raise ValueError(
                "padded batch rows hold several documents (num_cu_seqlens > 2) but padded rows are "
                "attended as one causal sequence; collate with collate_thd to keep the document mask")
        return None
    if cu.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D (THD) or 2-D (padded), got shape {tuple(cu.shape)}")
    if "cu_seqlens_padded" in batch:
        return _cp_packed_seq_params(batch, device, cp_group)
    if int(batch.get("cp_size", 1)) > 1:
        raise ValueError("a context-parallel batch needs cu_seqlens_padded")
    n = int(batch["num_cu_seqlens"]) if "num_cu_seqlens" in batch else int((cu >= 0).sum())
    cu = cu[:n].to(dtype=torch.int32)
    total = batch["tokens"].numel() if "tokens" in batch else None
    if n < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or (total is not None and int(cu[-1]) != total):
        raise ValueError(f"cu_seqlens {cu.tolist()} must rise from 0 to the {total} packed tokens")
    if device is not None:
        cu = cu.to(device, non_blocking=True)
    max_seqlen = int(batch["max_seqlen"]) if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def _cp_packed_seq_params(batch: dict, device, cp_group) -> PackedSeqParams:
    """Per-document padded THD (context parallelism): ``cu_seqlens`` counts real tokens,
    ``cu_seqlens_padded`` places the segments in the *global* row (CP x this rank's tokens);
    Megatron-Core's RoPE and attention take the padded list and the CP group."""
    n = int(batch["num_cu_seqlens"])
    cp_size = int(batch.get("cp_size", 1))
    if cp_group is not None and cp_group.size() != cp_size:
        raise ValueError(f"batch split for CP {cp_size} but the CP group has {cp_group.size()} ranks")
    cu = batch["cu_seqlens"][:n].to(torch.int32)
    cu_pad = batch["cu_seqlens_padded"][:n].to(torch.int32)
    total = batch["tokens"].numel() * cp_size
    lens, plens = cu[1:] - cu[:-1], cu_pad[1:] - cu_pad[:-1]
    if (n < 2 or int(cu_pad[0]) != 0 or int(cu[0]) != 0 or int(cu_pad[-1]) != total or bool((lens < 0).any())
            or bool((lens > plens).any()) or bool((plens % (2 * cp_size) != 0).any() if cp_size > 1 else False)):
        raise ValueError(f"cu_seqlens {cu.tolist()} / cu_seqlens_padded {cu_pad.tolist()} do not describe "
                         f"{total} tokens in segments padded to multiples of 2 x CP = {2 * cp_size}")
    if device is not None:
        cu, cu_pad = cu.to(device, non_blocking=True), cu_pad.to(device, non_blocking=True)
    max_seqlen = int(plens.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                           cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
                           cp_group=cp_group)


def model_inputs(batch: dict, *, device: Optional[torch.device] = None, cp_group=None) -> dict:
    """Keyword arguments for ``GPTModel.forward`` from a collated micro-batch, for any stage.

    Returns ``input_ids``, ``position_ids``, ``attention_mask=None`` (causal/segment masking is
    the core attention's job), ``labels`` and ``packed_seq_params`` (``None`` for padded rows).
    The loss mask stays with the caller: ``output * loss_mask`` on the last stage.
    With context parallelism the batch is this rank's share
    (:func:`megatron_pack.data.context_parallel.split_batch_for_cp`) and ``cp_group`` its group.
    """
    def move(x):
        return x if device is None else x.to(device, non_blocking=True)

    return dict(
        input_ids=move(batch["tokens"]),
        position_ids=move(batch["position_ids"]),
        attention_mask=None,
        labels=move(batch["labels"]) if "labels" in batch else None,
        packed_seq_params=packed_seq_params_from_batch(batch, device=device, cp_group=cp_group),
    )
