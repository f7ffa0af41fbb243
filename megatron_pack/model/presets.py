"""Named architectures (presets) and their mapping to Megatron-Core's ``TransformerConfig``.

A preset is the architecture only (what a HF ``config.json`` says, see
:mod:`megatron_pack.model.architecture`); parallel layout and precision come from the run and
are applied in ``transformer_config``. ``--model`` takes a preset name or the path of any
supported HF config (:func:`get_preset`).
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_pack.model.architecture import Architecture  # noqa: F401  (re-exported)

#: The name most modules import; an architecture is not only a named preset any more.
LlamaPreset = Architecture

_LLAMA31_ROPE = dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)

# Published config.json values of each model (Hugging Face hub).
PRESETS: dict[str, Architecture] = {
    # Runs a training step in well under a second on one CPU core.
    "tiny": Architecture("tiny", num_layers=2, hidden_size=64, ffn_hidden_size=176,
                         num_attention_heads=4, num_query_groups=2, vocab_size=None,
                         max_position_embeddings=4096),
    "llama3-8b": Architecture("llama3-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                              num_attention_heads=32, num_query_groups=8, vocab_size=128256),
    "llama3-70b": Architecture("llama3-70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                               num_attention_heads=64, num_query_groups=8, vocab_size=128256),
    # Llama-3.1-8B(-Instruct); Llama-3.1-70B and Llama-3.3-70B(-Instruct) share one architecture.
    "llama3.1-8b": Architecture("llama3.1-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                                num_attention_heads=32, num_query_groups=8, vocab_size=128256,
                                max_position_embeddings=131072, **_LLAMA31_ROPE),
    "llama3.1-70b": Architecture("llama3.1-70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                                 num_attention_heads=64, num_query_groups=8, vocab_size=128256,
                                 max_position_embeddings=131072, **_LLAMA31_ROPE),
    "qwen2.5-7b": Architecture("qwen2.5-7b", family="qwen2", num_layers=28, hidden_size=3584,
                               ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
                               vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=32768,
                               norm_eps=1e-6, qkv_bias=True),
    "qwen2.5-72b": Architecture("qwen2.5-72b", family="qwen2", num_layers=80, hidden_size=8192,
                                ffn_hidden_size=29568, num_attention_heads=64, num_query_groups=8,
                                vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=32768,
                                norm_eps=1e-6, qkv_bias=True),
    # Mistral-7B(-Instruct)-v0.3: no sliding window, 32768-token vocabulary.
    "mistral-7b": Architecture("mistral-7b", family="mistral", num_layers=32, hidden_size=4096,
                               ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
                               vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=32768),
}


def get_preset(name: str) -> Architecture:
    """A preset by name, or the architecture of a HF ``config.json`` / model directory at ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        pass
    if os.path.exists(name):
        from megatron_pack.model.hf_architecture import load_hf_architecture

        return load_hf_architecture(name)
    raise ValueError(f"unknown model preset {name!r} and no such path: choose a preset from {sorted(PRESETS)} or "
                     "give the path of a Hugging Face config.json or model directory")


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
        add_qkv_bias=preset.qkv_bias,
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
