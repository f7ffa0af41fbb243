"""Llama-3 family presets and their mapping to Megatron-Core's ``TransformerConfig``.

A preset is the architecture only (what a HF ``config.json`` says); parallel layout and
precision come from the run and are applied in ``transformer_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LlamaPreset:
    """Architecture of a Llama-style decoder: RMSNorm, SwiGLU, GQA, RoPE, untied output."""

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

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def with_vocab(self, vocab_size: int) -> "LlamaPreset":
        return dataclasses.replace(self, vocab_size=vocab_size)


PRESETS: dict[str, LlamaPreset] = {
    # Runs a training step in well under a second on one CPU core.
    "tiny": LlamaPreset("tiny", num_layers=2, hidden_size=64, ffn_hidden_size=176,
                        num_attention_heads=4, num_query_groups=2, vocab_size=None,
                        max_position_embeddings=4096),
    "llama3-8b": LlamaPreset("llama3-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                             num_attention_heads=32, num_query_groups=8, vocab_size=128256),
    "llama3-70b": LlamaPreset("llama3-70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                              num_attention_heads=64, num_query_groups=8, vocab_size=128256),
}


def get_preset(name: str) -> LlamaPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of ``multiple * TP``."""
    step = multiple * tensor_model_parallel_size
    return ((vocab_size + step - 1) // step) * step


def transformer_config(
    preset: LlamaPreset,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    use_cpu_initialization: bool = False,
    recompute_granularity: Optional[str] = None,
    **overrides,
):
    """``TransformerConfig`` for ``preset`` under a parallel layout and precision.

    Fusions that need apex/TE kernels (masked softmax, RoPE, bias-activation, gradient
    accumulation) are left off so the same config runs everywhere; a GPU run turns them on
    through ``overrides`` (e.g. ``apply_rope_fusion=True`` with Transformer Engine). The layer
    implementation itself is chosen by :func:`megatron_pack.model.spec.get_layer_spec`.
    """
    import torch  # here, not at module level: the command lines read presets before any heavy import
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=preset.init_method_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=recompute_granularity,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
