"""An architecture is data: the decoder a HF ``config.json`` describes, as one frozen dataclass.

One class covers the supported families (Llama 2/3/3.1/3.2/3.3, Mistral v0.3, Qwen2/2.5): all
are pre-norm RMSNorm + SwiGLU + GQA + RoPE decoders; the families differ only in switches
(``qkv_bias``, ``tie_word_embeddings``, ``head_dim``, the RoPE scaling fields). The fields are
flat JSON values, so the same object is written into an import's metadata and a training
checkpoint's ``run_config.json`` and read back with :func:`architecture_from_dict`.

RoPE scaling (``rope_scaling_type``):

==========  =============================================================================
``none``    plain RoPE, ``inv_freq = theta ** (-2i/d)``
``linear``  every ``inv_freq / factor`` (position interpolation)
``llama3``  Llama-3.1: wavelengths above ``original / low_freq_factor`` divided by ``factor``,
            below ``original / high_freq_factor`` kept, smooth in between
==========  =============================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

FAMILIES = ("llama", "mistral", "qwen2")
ROPE_SCALING_TYPES = ("none", "linear", "llama3")


class ArchitectureError(ValueError):
    """An architecture that megatron_pack cannot build, with the key, value and reason."""


#: Upper bounds on the sizes an architecture may have, far above any published decoder (Llama 3.1
#: 405B: 126 layers, hidden 16384, FFN 53248, 128 heads; the largest vocabularies ~256k tokens;
#: contexts of 10M tokens). A config above one of them is hostile or mistyped: refused before
#: anything is sized from it (a model spec of 10^9 layers, a 7 TB allocation for hidden 10^9).
SIZE_LIMITS = {"num_layers": 1 << 10, "hidden_size": 1 << 17, "ffn_hidden_size": 1 << 20,
               "num_attention_heads": 1 << 12, "num_query_groups": 1 << 12, "head_dim": 1 << 13,
               "vocab_size": 1 << 24, "max_position_embeddings": 1 << 27,
               "rope_original_max_position_embeddings": 1 << 27}


_OPTIONAL_SIZES = ("vocab_size", "head_dim", "rope_original_max_position_embeddings")


def size_problem(value, limit: int) -> Optional[str]:
    """Why ``value`` is not a size in [1, limit] (None when it is one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return "must be a positive integer"
    if value > limit:
        return f"exceeds {limit:,} (the sane bound for this size; no published model comes near it)"
    return None


@dataclass(frozen=True)
class Architecture:
    """Architecture of a Llama-style decoder: RMSNorm, SwiGLU, GQA, RoPE."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: Optional[int]  # None: taken from the tokenizer (the tiny preset)
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    family: str = "llama"
    """HF ``model_type`` the export writes: llama, mistral or qwen2."""
    head_dim: Optional[int] = None
    """Per-head width where a config sets it explicitly; None: hidden_size / heads."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2), Megatron-Core's ``add_qkv_bias``."""
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        for key, limit in SIZE_LIMITS.items():
            value = getattr(self, key)
            problem = None if value is None and key in _OPTIONAL_SIZES else size_problem(value, limit)
            if problem:
                raise ArchitectureError(f"architecture {self.name}: {key} = {value!r}: {problem}")
        for key in ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "norm_eps",
                    "init_method_std"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ArchitectureError(f"architecture {self.name}: {key} = {value!r}: must be a finite number >= 0")
        if self.family not in FAMILIES:
            raise ArchitectureError(f"architecture {self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ArchitectureError(f"architecture {self.name}: rope_scaling_type {self.rope_scaling_type!r} is not "
                                    f"one of {ROPE_SCALING_TYPES}")
        if self.num_attention_heads % self.num_query_groups:
            raise ArchitectureError(f"architecture {self.name}: {self.num_attention_heads} attention heads are not a "
                                    f"multiple of {self.num_query_groups} query groups")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ArchitectureError(f"architecture {self.name}: hidden_size {self.hidden_size} is not a multiple of "
                                    f"{self.num_attention_heads} heads and no head_dim is given")
        if self.rope_scaling_type == "llama3" and not self.rope_original_max_position_embeddings:
            raise ArchitectureError(f"architecture {self.name}: llama3 RoPE scaling needs "
                                    "rope_original_max_position_embeddings")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def with_vocab(self, vocab_size: int) -> "Architecture":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def architecture_from_dict(d: dict) -> Architecture:
    """Inverse of :meth:`Architecture.to_dict`; keys of older metadata absent take defaults,
    unknown keys are ignored."""
    fields = {f.name for f in dataclasses.fields(Architecture)}
    return Architecture(**{k: v for k, v in d.items() if k in fields})


#: Fields that decide the weights' shapes or what the network computes: a flag and a
#: checkpoint that disagree on one of these describe different models.
STRUCTURAL_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture)
                          if f.name not in ("name", "vocab_size", "init_method_std", "max_position_embeddings"))


def architecture_differences(a: Architecture, b: Architecture) -> dict:
    """``{field: (a's, b's)}`` for every structural field where they differ."""
    out = {}
    for k in STRUCTURAL_FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        if k == "head_dim":
            x, y = a.kv_channels, b.kv_channels
        if x != y:
            out[k] = (x, y)
    return out


def rope_inv_freq(arch: Architecture):
    """RoPE inverse frequencies [kv_channels / 2] in fp32, computed as transformers does
    (``modeling_rope_utils``), with the scaling parameters the config gives.

    Megatron-Core 0.16's ``GPTModel(rope_scaling=True)`` hard-codes the Llama-3.1 low/high
    frequency factors (1, 4) and original context (8192); a model converted from a config with
    other values would compute other positions. :func:`megatron_pack.model.builder.build_model`
    installs these frequencies instead.
    """
    import torch

    dim = arch.kv_channels
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim
    inv = 1.0 / (arch.rope_theta**exponents)
    kind, factor = arch.rope_scaling_type, float(arch.rope_scaling_factor)
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        old = arch.rope_original_max_position_embeddings
        low, high = float(arch.rope_low_freq_factor), float(arch.rope_high_freq_factor)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv
