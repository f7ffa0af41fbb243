"""Names of the GPTModel's tensors, as dist checkpoints and imports store them, and
``unwrap`` (the bare module under DDP / Float16Module wrappers).

Names are *canonical*: Transformer Engine's fused names, which Megatron-Core also writes into
dist checkpoints for local layers; :func:`model_key` turns one into the name a built model's
``state_dict`` uses (TE or local spec).
"""

from __future__ import annotations

MEGATRON_LAYER_NAMES = (
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
#: Per-layer tensors only some architectures have (Qwen2's q/k/v bias).
OPTIONAL_LAYER_NAMES = ("self_attention.linear_qkv.bias",)
MEG_EMBEDDING, MEG_FINAL_NORM, MEG_OUTPUT = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                             "output_layer.weight")
# Local (non-TE) layer specs name the norms on their own modules.
_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def model_key(canonical: str, model_keys) -> str:
    """The name ``canonical`` (``decoder.layers.{i}.<canonical layer name>`` or a top-level
    name) has in a model whose ``state_dict`` keys are ``model_keys`` (TE or local spec)."""
    if canonical in model_keys:
        return canonical
    for te, local in _LOCAL_NAMES.items():
        if canonical.endswith("." + te):
            alt = canonical[: -len(te)] + local
            if alt in model_keys:
                return alt
    return canonical


def unwrap(model):
    """The bare Megatron module under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
