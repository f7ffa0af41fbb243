"""What one packed sequence costs to train: the one formula the planner and the data stream share.

A sequence of S positions whose attention segments (documents, with the document mask) have
lengths ``s_i`` costs, forward + backward (= 3 x forward)::

    flops = linear * S  +  attention * sum_i s_i^2

    linear     = 6 * N_matmul             every position goes through every 2-D weight (the
                                          input embedding is a lookup and not counted);
                                          N_matmul = L * (h*(a + 2g)*d + a*d*h + 3*h*f) + h*V
    attention  = 6 * L * a * d            QK^T and AV are 2*s^2*a*d each forward over the full
                                          square; causal kernels skip the upper triangle, so
                                          half of it (Megatron's MFU formula counts the full
                                          square, 12 * L * h * s^2)

(``L`` layers, ``h`` hidden, ``a`` query heads, ``g`` KV groups, ``d`` head dim, ``f`` FFN
size, ``V`` padded vocabulary.) With one 32k document the attention term of Llama-3-8B is
~0.6x the linear term; with sixty-four 512-token documents it is ~1%: equally long sequences,
far from equally expensive (Megatron-LM issue #2054).

Context parallelism splits every document into ``2 * cp`` load-balanced chunks (two per CP
rank, mirrored), so each CP rank computes ``1 / cp`` of both terms; :meth:`CostModel.rank_flops`
is that share. Ratios between sequences (what balancing needs) do not depend on ``cp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def matmul_parameters(arch, vocab_size: Optional[int] = None) -> int:
    """Weights that multiply every position: attention QKV/proj, SwiGLU fc1 (gate + up) / fc2,
    and the output layer (``vocab_size`` padded, default the architecture's own)."""
    h, f, a = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads
    g = getattr(arch, "num_query_groups", None) or a
    d = getattr(arch, "kv_channels", None) or h // a
    v = vocab_size if vocab_size is not None else arch.vocab_size
    if v is None:
        raise ValueError(f"{getattr(arch, 'name', 'architecture')}: vocabulary size unknown; pass vocab_size")
    per_layer = h * (a + 2 * g) * d + a * d * h + 3 * h * f
    return int(arch.num_layers * per_layer + h * v)


@dataclass(frozen=True)
class CostModel:
    """FLOPs of a training sequence (forward + backward) from its positions and segments."""

    linear_flops_per_token: float
    attention_flops_per_sq: float
    """per unit of sum_i s_i^2"""
    cp: int = 1
    """context-parallel size: each CP rank computes 1 / cp of a sequence"""

    def __post_init__(self):
        if self.cp < 1:
            raise ValueError(f"context parallel size must be >= 1, got {self.cp}")

    @classmethod
    def from_architecture(cls, arch, *, vocab_size: Optional[int] = None, matmul_params: Optional[int] = None,
                          cp: int = 1) -> "CostModel":
        """From a :class:`~megatron_pack.model.presets.LlamaPreset`-like object; pass
        ``matmul_params`` when an exact count of the built model is at hand (the planner's)."""
        n = matmul_params if matmul_params is not None else matmul_parameters(arch, vocab_size)
        d = getattr(arch, "kv_channels", None) or arch.hidden_size // arch.num_attention_heads
        return cls(6.0 * n, 6.0 * arch.num_layers * arch.num_attention_heads * d, cp)

    def sequence_flops(self, num_positions, sum_sq):
        """Model FLOPs of whole sequences (scalars or numpy arrays)."""
        return self.linear_flops_per_token * np.asarray(num_positions, dtype=np.float64) \
            + self.attention_flops_per_sq * np.asarray(sum_sq, dtype=np.float64)

    def rank_flops(self, num_positions, sum_sq):
        """What each of the ``cp`` ranks sharing a sequence computes."""
        return self.sequence_flops(num_positions, sum_sq) / self.cp

    def attention_share(self, num_positions, sum_sq) -> float:
        attn = self.attention_flops_per_sq * float(np.sum(sum_sq))
        total = float(np.sum(self.sequence_flops(num_positions, sum_sq)))
        return attn / total if total else 0.0
