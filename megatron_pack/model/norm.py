"""PyTorch RMSNorm/LayerNorm for local layers that also works with sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` refuses ``sequence_parallel``: with the sequence split
over tensor-parallel ranks, each rank sees a different slice of tokens, so the norm weight
gradients differ per rank and must be summed. Megatron-Core already does that sum in
``finalize_model_grads`` for every parameter flagged ``sequence_parallel``; this norm only
sets the flag. Same module, same state-dict names as the torch norms.
"""

from __future__ import annotations

import torch


class TorchNorm:
    """Factory with the constructor Megatron-Core layer specs call (like ``WrappedTorchNorm``)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str | None = None):
        kind = normalization or config.normalization
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs Transformer Engine or apex norms")
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {kind!r}")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm
