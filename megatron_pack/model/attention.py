"""Core attention for local (non-Transformer-Engine) layers that understands packed sequences.

Megatron-Core's own ``DotProductAttention`` refuses ``PackedSeqParams``; this module takes
its place in the local layer spec. A packed (THD) micro-batch is one row of ``t`` tokens
holding several documents; ``cu_seqlens`` marks where each starts::

    tokens      a a a b b c c c c .      t = 10
    cu_seqlens  [0, 3, 5, 9, 10]         (the padding tail is a segment of its own)

    allowed keys per query (causal inside a document, nothing across one):
        a: a..            b: b.            c: c...           .: .

Each segment is attended on its own, so the cost is sum(s_i^2), never a dense
(sum s_i)^2 mask. The kernel is picked once by the spec provider
(:func:`megatron_pack.model.spec.get_layer_spec`): ``flash`` (flash-attn's
``flash_attn_varlen_func``, CUDA + fp16/bf16), ``varlen`` (PyTorch's own FlashAttention-2
varlen, ``torch.nn.attention.varlen``, CUDA + fp16/bf16, :mod:`megatron_pack.model.fused_varlen`),
``flex`` (compiled ``flex_attention`` with a document block mask; measured by the GPU check) or
``torch`` (``scaled_dot_product_attention`` per segment, any device; it reads ``cu_seqlens``
on the host in every layer). With context parallelism the ``torch`` kernel all-gathers K/V over
the CP group (:mod:`megatron_pack.model.cp_attention`); the other kernels refuse CP (the spec
picks ``torch`` for CP runs without TE).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from megatron_pack.model.cp_attention import cp_varlen
from megatron_pack.model.fused_varlen import flex_varlen, torch_fa_varlen

# --------------------------------------------------------------------------------------------
# Kernels. THD: q [t, hq, d], k/v [t, hkv, d] -> [t, hq, d].  SBHD: q [s, b, hq, d] -> same.
# --------------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, dropout_p: float,
          mask: Optional[Tensor] = None) -> Tensor:
    """SDPA on [b, h, s, d] with grouped-query heads (k/v may have fewer heads than q): SDPA's
    ``enable_gqa`` shares each K/V head over its query group without materialising copies."""
    gqa = k.size(1) != q.size(1)
    if mask is not None:  # boolean, True = may attend; causal already folded in
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                          enable_gqa=gqa)


def torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool,
                 scale: float, dropout_p: float = 0.0) -> Tensor:
    """Per-segment attention with PyTorch; segments of equal length share one SDPA call.

    A length that occurs once (most of a bfd row) is attended on its piece of one ``split``
    of the row; only lengths shared by several segments are gathered with ``index_select``
    into one batch. Measured on CPU (fwd+bwd, 2048 tokens in 11 documents, 8/2 heads): ~half
    the time of gathering every segment and scattering it back with ``index_copy_``, whose
    backward copies the whole row's gradient once per write.
    """
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != q.size(0) or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens {bounds} do not tile the {q.size(0)} packed tokens")
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n:
            by_len.setdefault(n, []).append(i)
    # Outputs are joined with one torch.cat in row order (segments tile the row): its backward
    # hands each piece a view of the gradient, where writing pieces into a preallocated output
    # (index_copy_ / slice assignment) costs a full-row gradient copy per write in backward.
    # Likewise the inputs are cut with one split per tensor (its backward is one cat).
    pieces: list = [None] * len(lengths)
    parts = None
    for n, segs in by_len.items():
        if len(segs) == 1:
            if parts is None:
                parts = [x.split(lengths) for x in (q, k, v)]
            # [n, h, d] -> [1, h, n, d]
            qs, ks, vs = (p[segs[0]].transpose(0, 1).unsqueeze(0).contiguous() for p in parts)
            pieces[segs[0]] = _sdpa(qs, ks, vs, causal, scale, dropout_p)[0].transpose(0, 1)
            continue
        idx = torch.cat([torch.arange(bounds[i], bounds[i] + n, device=q.device) for i in segs])
        # [len(segs) * n, h, d] -> [len(segs), h, n, d]
        qs, ks, vs = (x.index_select(0, idx).view(len(segs), n, x.size(1), x.size(2)).transpose(1, 2)
                      for x in (q, k, v))
        o = _sdpa(qs, ks, vs, causal, scale, dropout_p).transpose(1, 2)  # [len(segs), n, h, d]
        for j, i in enumerate(segs):
            pieces[i] = o[j]
    pieces = [p for p in pieces if p is not None]
    return torch.cat(pieces) if pieces else q.new_empty(q.shape)


def torch_dense(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float = 0.0,
                attention_mask: Optional[Tensor] = None) -> Tensor:
    """[s, b, h, d] attention; ``attention_mask`` is Megatron's (True = masked out), broadcastable
    to [b, 1, sq, sk]."""
    qs, ks, vs = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
    mask = None
    if attention_mask is not None:
        mask = ~attention_mask.to(torch.bool)
        if causal:
            sq, sk = q.size(0), k.size(0)
            mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    o = _sdpa(qs, ks, vs, causal, scale, dropout_p, mask)
    return o.permute(2, 0, 1, 3)


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool,
                 scale: float, dropout_p: float = 0.0) -> Tensor:
    from flash_attn import flash_attn_varlen_func  # GQA natively: hkv divides hq

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), dropout_p=dropout_p,
                                  softmax_scale=scale, causal=causal)


def flash_dense(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float = 0.0,
                attention_mask: Optional[Tensor] = None) -> Tensor:
    if attention_mask is not None:  # flash has no arbitrary masks
        return torch_dense(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, attention_mask=attention_mask)
    from flash_attn import flash_attn_func

    qb, kb, vb = (x.transpose(0, 1) for x in (q, k, v))  # [b, s, h, d]
    return flash_attn_func(qb, kb, vb, dropout_p=dropout_p, softmax_scale=scale, causal=causal).transpose(0, 1)


# name -> (packed THD kernel, padded SBHD kernel)
KERNELS: dict[str, tuple[Callable, Callable]] = {
    "torch": (torch_varlen, torch_dense),
    "flash": (flash_varlen, flash_dense),
    "varlen": (torch_fa_varlen, torch_dense),  # padded rows: SDPA picks its own flash kernel
    "flex": (flex_varlen, torch_dense),
}


class VarlenCoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` (same constructor and forward) with THD support.

    Inputs come after Megatron-Core's ``Attention`` has applied RoPE (restarting per document
    from ``cu_seqlens`` in THD) and split heads over tensor-parallel ranks:
    THD ``q [t, np, hn]``, ``k/v [t, ng, hn]``; SBHD ``q [s, b, np, hn]``, ``k/v [s, b, ng, hn]``,
    ``np``/``ng`` being this rank's query heads / key-value groups. Returns ``[t, np*hn]`` or
    ``[s, b, np*hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        kernel: str = "torch",
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1 and kernel != "torch":
            raise ValueError(f"--context-parallel-size {config.context_parallel_size}: the local backend's {kernel!r} "
                             "kernel has no context-parallel path; use --transformer-impl transformer_engine, or "
                             "the 'torch' kernel (all-gathers K/V over the CP group)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding_causal):
            raise ValueError(f"VarlenCoreAttention supports causal/no_mask attention, got {attn_mask_type}")
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose from {sorted(KERNELS)}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        self.cp_reorder = True  # tests switch it off for the negative control
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.kernel = kernel
        self.num_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        # Query-key layer scaling cancels out in DotProductAttention (scores / L, softmax scale * L).
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self._varlen, self._dense = KERNELS[kernel]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by VarlenCoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type != AttnMaskType.no_mask
        dropout_p = self.dropout_p if self.training else 0.0
        ctx = _dropout_rng(self.config) if dropout_p > 0 else contextlib.nullcontext()
        with ctx:
            if packed_seq_params is not None:
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(
                        f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}")
                q, k, v = (x.squeeze(1) if x.dim() == 4 else x for x in (query, key, value))
                cu = (
                    packed_seq_params.cu_seqlens_q_padded
                    if packed_seq_params.cu_seqlens_q_padded is not None
                    else packed_seq_params.cu_seqlens_q
                )
                if packed_seq_params.cu_seqlens_kv is not None and not torch.equal(
                    packed_seq_params.cu_seqlens_kv, packed_seq_params.cu_seqlens_q
                ):
                    raise ValueError("self-attention needs cu_seqlens_kv == cu_seqlens_q")
                if self.cp_group is not None and self.cp_group.size() > 1:
                    if not causal:
                        raise ValueError("context-parallel VarlenCoreAttention supports causal attention only")
                    if packed_seq_params.cu_seqlens_q_padded is None:
                        raise ValueError("context parallelism needs cu_seqlens_q_padded (per-document padding)")
                    out = cp_varlen(
                        q,
                        k,
                        v,
                        cu,
                        self.cp_group,
                        scale=self.softmax_scale,
                        dropout_p=dropout_p,
                        reorder=self.cp_reorder,
                    )
                    return out.reshape(out.size(0), -1)
                out = self._varlen(
                    q,
                    k,
                    v,
                    cu,
                    packed_seq_params.max_seqlen_q,
                    causal=causal,
                    scale=self.softmax_scale,
                    dropout_p=dropout_p,
                )
                return out.reshape(out.size(0), -1)
            if self.cp_group is not None and self.cp_group.size() > 1:
                raise ValueError("context parallelism needs packed (THD) micro-batches (collate_thd)")
            out = self._dense(
                query,
                key,
                value,
                causal=causal,
                scale=self.softmax_scale,
                dropout_p=dropout_p,
                attention_mask=attention_mask,
            )
            return out.reshape(out.size(0), out.size(1), -1)


def _dropout_rng(config: TransformerConfig):
    """Attention dropout draws from the tensor-parallel RNG stream, as DotProductAttention does."""
    from megatron.core import tensor_parallel

    return contextlib.nullcontext() if config.sequence_parallel else tensor_parallel.get_cuda_rng_tracker().fork()
