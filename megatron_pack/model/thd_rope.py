"""RoPE on packed (THD) rows without a host sync.

Without Transformer Engine's fused RoPE, Megatron-Core 0.16 applies RoPE to a THD row with
``_apply_rotary_pos_emb_thd``, which reads ``cu_seqlens`` on the host (``.tolist()``, and a
tensor comparison for its "offsets" case) for the query and again for the key of every layer:
on a GPU each read waits for all queued work, so the CPU stops running ahead of the GPU twice
per layer. Here each token's position inside its segment is computed on the device::

    cu_seqlens  [0, 3, 5, 9]       segment of token   0 0 0 1 1 2 2 2 2
    position    arange - cu[seg]                      0 1 2 0 1 0 1 2 3

and ``freqs[position]`` is applied as Megatron's own bshd RoPE applies it: the same values as
its per-segment slices (``freqs`` holds positions ``0 .. max_seqlen-1``). Context parallelism
and the "offsets" case (``freqs`` as long as the row) keep Megatron's function.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from megatron_pack.mcore_version import mcore_version

_ORIGINAL = None
TESTED = "0.16"
#: the parameters of the two private Megatron-Core functions this module wraps and calls
THD_PARAMS = ("t", "cu_seqlens", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale", "cp_group")
BSHD_PARAMS = ("t", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale")


def positions_in_segments(cu_seqlens: Tensor, total: int) -> Tensor:
    """``[total]`` position of every packed token inside its segment (int64, on the device)."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    cu = cu_seqlens.to(torch.int64)
    seg = torch.searchsorted(cu[1:].contiguous(), idx, right=True)
    return idx - cu[seg]


def apply_rotary_pos_emb_thd(t: Tensor, cu_seqlens: Tensor, freqs: Tensor, rotary_interleaved: bool = False,
                             multi_latent_attention: bool = False, mscale: float = 1.0, cp_group=None) -> Tensor:
    """Drop-in for ``rope_utils._apply_rotary_pos_emb_thd``: ``t [t, h, d]`` -> same."""
    from megatron.core.models.common.embeddings import rope_utils

    if cp_group is None or cp_group.size() != 1 or freqs.size(0) == t.size(0):
        return _ORIGINAL(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                         multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
    pos = positions_in_segments(cu_seqlens, t.size(0))
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[pos], rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention,
                                                 mscale=mscale).squeeze(1)


def install() -> None:
    """Route Megatron-Core's unfused THD RoPE through :func:`apply_rotary_pos_emb_thd` (idempotent)."""
    global _ORIGINAL
    from megatron.core.models.common.embeddings import rope_utils

    if _ORIGINAL is None:
        check_rope_utils(rope_utils)
        _ORIGINAL = rope_utils._apply_rotary_pos_emb_thd
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd


def check_rope_utils(rope_utils) -> None:
    """Raise ``RuntimeError`` naming the release where the private RoPE functions this module
    replaces and calls are not the ones it was written for (a silent mismatch would rotate
    packed rows wrongly, or pass arguments a new release reads otherwise)."""
    for name, want in (("_apply_rotary_pos_emb_thd", THD_PARAMS), ("_apply_rotary_pos_emb_bshd", BSHD_PARAMS)):
        fn = getattr(rope_utils, name, None)
        got = tuple(inspect.signature(fn).parameters) if fn is not None else None
        if got != want:
            found = "is missing" if got is None else f"takes {', '.join(got)}"
            raise RuntimeError(f"megatron-core {mcore_version()}: rope_utils.{name} {found} (written for {TESTED}: "
                               f"{', '.join(want)}); update megatron_pack/model/thd_rope.py")

