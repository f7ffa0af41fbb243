"""Context-parallel packed attention without Transformer Engine (CPU/gloo, any device).

Each CP rank holds, for every segment of the row, chunks ``r`` and ``2*CP-1-r`` of its
``2*CP`` equal chunks (:mod:`megatron_pack.data.context_parallel`). Keys and values are
all-gathered over the CP group (autograd: the backward all-reduces the key/value gradients
and keeps this rank's share) and put back in global order; then each local query chunk
``j`` of a segment attends to that segment's keys ``[0, (j+1)*c)`` with the causal diagonal
offset by ``j*c``::

    segment of 8 tokens, CP 2, chunks of c = 2:   k0 k1 | k2 k3 | k4 k5 | k6 k7
    rank 0, chunk 0 (q0 q1)   -> keys k0..k1      (plain causal)
    rank 0, chunk 3 (q6 q7)   -> keys k0..k7      q6 sees k0..k6, q7 sees k0..k7

Memory is O(tokens) per segment (fused causal kernels, no mask tensor), never a dense
(sum s)^2 mask; chunk j computes (j+1)^2 c^2 / 2 scores, its dummy rows included. This
is the simple "all-gather K/V" scheme (Megatron-LM's ``--cp-comm-type allgather``); it is
what runs on every commit, and the reference TE's ring (p2p) exchange is checked against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_pack.data.context_parallel import gathered_key_index


class _AllGather(torch.autograd.Function):
    """``[t, ...] -> [cp * t, ...]`` (rank-major); backward sums the gradients of every rank
    (all-reduce, which gloo has; reduce-scatter it has not) and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.rank, ctx.t = group, group.rank(), x.size(0)
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.t:(ctx.rank + 1) * ctx.t], None


def all_gather_with_grad(x: Tensor, group) -> Tensor:
    return _AllGather.apply(x, group)


def _attend(q: Tensor, k: Tensor, v: Tensor, offset: int, scale: float, dropout_p: float) -> Tensor:
    """q [c, hq, d] at global positions offset..offset+c-1, k/v [offset+c, hkv, d] -> [c, hq, d].
    Grouped-query heads: SDPA's ``enable_gqa`` shares each K/V head over its query group (no copies)."""
    if offset:
        # SDPA's is_causal aligns the diagonal top-left; with ``offset`` dummy query rows in
        # front, query row offset+i sees keys <= offset+i, as it must. No mask tensor is
        # built, so the fused (flash) kernels apply and keep no c x (offset+c) score matrix;
        # the dummy rows cost compute, not memory, and are dropped.
        q = torch.cat([q.new_zeros(offset, q.size(1), q.size(2)), q])
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, s, d]
    o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, is_causal=True, scale=scale,
                                       enable_gqa=k.size(1) != q.size(1))
    return o.squeeze(0).transpose(0, 1)[offset:]


def cp_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_padded: Tensor, cp_group, *, scale: float,
              dropout_p: float = 0.0, reorder: bool = True) -> Tensor:
    """Causal per-segment attention of this CP rank's queries ``q [t, hq, d]`` over the keys of
    all ranks. ``cu_seqlens_padded`` is global (``cp * t`` at the end). ``reorder=False`` skips
    putting the gathered keys back in global order: wrong on purpose, for negative controls."""
    cp, r, t = cp_group.size(), cp_group.rank(), q.size(0)
    bounds = cu_seqlens_padded.to(torch.int64).tolist()
    kg = all_gather_with_grad(k, cp_group)
    vg = all_gather_with_grad(v, cp_group)
    if reorder:
        order = gathered_key_index(bounds, cp, t).to(q.device)
        kg, vg = kg.index_select(0, order), vg.index_select(0, order)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        c, local = n // (2 * cp), start // cp
        for i, j in enumerate((r, 2 * cp - 1 - r)):
            qj = q[local + i * c: local + (i + 1) * c]
            hi = start + (j + 1) * c
            outs.append(_attend(qj, kg[start:hi], vg[start:hi], j * c, scale, dropout_p))
    return torch.cat(outs) if outs else torch.empty_like(q)
