"""Packed (THD) attention kernels that ship inside PyTorch: no Transformer Engine, no flash-attn.

``varlen``  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.10): FlashAttention-2 varlen
            compiled into torch, with autograd; CUDA, fp16/bf16, no dropout. Its keywords moved
            between releases (2.10: ``is_causal``; 2.11+: ``window_size=(-1, 0)`` for causal;
            ``enable_gqa`` only in newer ones), so :func:`varlen_call` reads the signature and
            passes only what exists: K/V heads are repeated where ``enable_gqa`` is missing, the
            query pre-scaled where ``scale`` is.
``flex``    ``flex_attention`` with a document block mask (``doc[q] == doc[kv] and q >= kv``),
            compiled once per shape; the block mask is built once per micro-batch (every layer
            passes the same ``cu_seqlens`` tensor) from ``cu_seqlens`` on the device.

Neither calls ``cu_seqlens.tolist()``: ``max_seqlen`` is a host integer computed once per
micro-batch by the collate step (:mod:`megatron_pack.model.packed`), so no layer waits on the GPU.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def varlen_fn():
    """``varlen_attn``, or ``None`` in a PyTorch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_call(fn, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, *, causal: bool,
                scale: float) -> Tensor:
    """``fn(q, k, v, cu, cu, max, max, ...)`` with the keywords this release of ``varlen_attn`` takes."""
    params = _parameters(fn)
    kwargs = {}
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # a tuple: 2.13 tests ``window_size == (-1, 0)``
        elif "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            raise RuntimeError("varlen_attn takes neither window_size nor is_causal: cannot ask it for causal "
                               "attention")
    if k.size(1) != q.size(1):
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # an older release: share each K/V head over its query group by copying
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q.size(-1) ** -0.5, rel_tol=1e-6):
        q = q * (scale * math.sqrt(q.size(-1)))  # the kernel's default scale is 1/sqrt(d)
    m = int(max_seqlen)
    return fn(q, k, v, cu, cu, m, m, **kwargs)


def torch_fa_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool,
                    scale: float, dropout_p: float = 0.0) -> Tensor:
    """THD attention through ``varlen_attn``; ``max_seqlen`` must be the host integer of the batch."""
    if dropout_p:
        raise ValueError(f"attention dropout {dropout_p}: PyTorch's varlen_attn has no dropout; the spec "
                         "chooses the 'torch' kernel for runs with attention dropout")
    fn = varlen_fn()
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (>= 2.10)")
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    if max_seqlen is None:  # PackedSeqParams built without it: one host read, not one per token
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # the kernel's one layout need
    return varlen_call(fn, q, k, v, cu, max_seqlen, causal=causal, scale=scale)


# --------------------------------------------------------------------------------------------
# flex_attention with a document mask
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _flex(cuda: bool):
    """Compiled on CUDA (eager flex_attention materialises the scores); eager elsewhere (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


class _LastMask:
    """The block mask of the last ``cu_seqlens`` tensor seen: the layers of one micro-batch share it."""

    cu = None
    causal = None
    mask = None


def document_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """``[total]`` segment index of every packed token, on the device (no host sync)."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def document_block_mask(cu_seqlens: Tensor, total: int, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    if _LastMask.cu is cu_seqlens and _LastMask.causal == causal:
        return _LastMask.mask
    doc = document_ids(cu_seqlens, total)

    def same_doc(b, h, q_idx, kv_idx):
        keep = doc[q_idx] == doc[kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    mask = create_block_mask(same_doc, B=None, H=None, Q_LEN=total, KV_LEN=total, device=cu_seqlens.device)
    _LastMask.cu, _LastMask.causal, _LastMask.mask = cu_seqlens, causal, mask
    return mask


def flex_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool,
                scale: float, dropout_p: float = 0.0) -> Tensor:
    """THD attention through compiled ``flex_attention`` and a document block mask (CUDA)."""
    if dropout_p:
        raise ValueError(f"attention dropout {dropout_p}: flex_attention has no dropout")
    mask = document_block_mask(cu_seqlens, q.size(0), causal)
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    out = _flex(q.is_cuda)(qs, ks, vs, block_mask=mask, scale=scale, enable_gqa=k.size(1) != q.size(1))
    return out.squeeze(0).transpose(0, 1)
