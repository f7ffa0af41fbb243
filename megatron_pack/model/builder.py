"""Build a Megatron-Core ``GPTModel`` from a preset, a ``TransformerConfig`` and a backend."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_pack.model.presets import LlamaPreset, get_preset, padded_vocab_size
from megatron_pack.model.spec import get_block_spec


def build_model(
    preset: "LlamaPreset | str",
    config,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    vp_stage: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
):
    """This rank's ``GPTModel`` (its pipeline stage, its tensor shards).

    ``pre_process``/``post_process`` default to whether this rank is the first/last pipeline
    stage. ``vocab_size`` (the tokenizer's) overrides the preset's and is padded Megatron's way
    (a multiple of ``128 * TP``); unlike Megatron-LM, the padded rows are kept out of the loss
    (:class:`~megatron_pack.model.gpt.SFTGPTModel`).
    RoPE uses the architecture's theta and scaling (:func:`install_rope`); the output layer is
    untied unless the architecture ties it. The model is on this rank's device (CPU without CUDA).
    """
    from megatron.core import parallel_state as ps

    from megatron_pack.model.gpt import SFTGPTModel

    preset = get_preset(preset) if isinstance(preset, str) else preset
    vocab = vocab_size if vocab_size is not None else preset.vocab_size
    if vocab is None:
        raise ValueError(f"preset {preset.name!r} has no vocabulary size; pass vocab_size (the tokenizer's)")
    if config.num_layers % config.pipeline_model_parallel_size:
        raise ValueError(f"{config.num_layers} layers do not split over "
                         f"{config.pipeline_model_parallel_size} pipeline stages")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = SFTGPTModel(
        true_vocab_size=vocab,
        config=config,
        transformer_layer_spec=get_block_spec(config, backend, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(vocab, config.tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=max_sequence_length or preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=preset.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(preset.rope_theta) if float(preset.rope_theta).is_integer() else preset.rope_theta,
        vp_stage=vp_stage,
    )
    install_rope(model, preset)
    on_meta = any(p.is_meta for p in model.parameters())  # the planner counts shards on meta
    if torch.cuda.is_available() and not on_meta:
        model.cuda(torch.cuda.current_device())
    return model


def install_rope(model, arch: LlamaPreset) -> None:
    """Replace the rotary embedding's frequencies with transformers' for ``arch``.

    Megatron-Core 0.16 computes plain RoPE itself, but its Llama-3.1 scaling
    (``GPTModel(rope_scaling=True)``) hard-codes low/high frequency factors 1 and 4 and an
    original context of 8192, and has no ``linear`` variant other than scaling the positions.
    Computing ``inv_freq`` from the config's values (:func:`rope_inv_freq`) honours every one of
    them and matches transformers' rounding; the rotary module caches nothing before the first
    forward, so replacing the buffer here is enough.
    """
    from megatron_pack.model.architecture import rope_inv_freq

    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    current = rope.inv_freq
    if current.is_meta:
        return
    inv = rope_inv_freq(arch)
    if inv.shape != current.shape:
        raise ValueError(f"rotary embedding has {current.numel()} frequencies, the architecture implies {inv.numel()}")
    rope.inv_freq = inv.to(device=current.device, dtype=current.dtype)


def model_provider(preset: "LlamaPreset | str", config, **kwargs):
    """Megatron-LM style ``model_provider(pre_process, post_process, vp_stage=None)`` closure."""

    def provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        return build_model(preset, config, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, **kwargs)

    return provider
