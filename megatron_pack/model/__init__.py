"""megatron_pack.model: architectures (Llama / Mistral / Qwen2) and presets, layer-spec provider,
varlen core attention, GPTModel builder.

Submodules import Megatron-Core lazily where they need it; ``presets`` works without it.
"""

from megatron_pack.model.architecture import Architecture, ArchitectureError
from megatron_pack.model.presets import PRESETS, LlamaPreset, get_preset, padded_vocab_size, transformer_config

__all__ = [
    "Architecture",
    "ArchitectureError",
    "PRESETS",
    "LlamaPreset",
    "get_preset",
    "padded_vocab_size",
    "transformer_config",
    "build_model",
    "model_provider",
    "get_layer_spec",
    "get_block_spec",
    "packed_seq_params_from_batch",
    "model_inputs",
]


def __getattr__(name):  # lazy: keep `import megatron_pack.model` free of Megatron-Core
    if name in ("build_model", "model_provider"):
        from megatron_pack.model import builder

        return getattr(builder, name)
    if name in ("get_layer_spec", "get_block_spec"):
        from megatron_pack.model import spec

        return getattr(spec, name)
    if name in ("packed_seq_params_from_batch", "model_inputs"):
        from megatron_pack.model import packed

        return getattr(packed, name)
    raise AttributeError(f"module 'megatron_pack.model' has no attribute {name!r}")
