"""Architectures as data: RoPE frequencies equal transformers' for every supported scaling,
the built GPTModel uses them (not Megatron-Core's hard-coded Llama-3.1 values), presets and
HF config paths resolve, and the architecture survives a JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_pack.model.architecture import (
    Architecture,
    ArchitectureError,
    architecture_differences,
    architecture_from_dict,
    rope_inv_freq,
)
from megatron_pack.model.presets import PRESETS, get_preset

transformers = pytest.importorskip("transformers")

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
            vocab_size=300, rope_theta=500000.0)
SCALINGS = {
    "none": ({}, {"rope_type": "default"}),
    "linear": (dict(rope_scaling_type="linear", rope_scaling_factor=2.5), {"rope_type": "linear", "factor": 2.5}),
    # not Megatron-Core's hard-coded (1, 4, 8192)
    "llama3": (dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=2.0,
                    rope_high_freq_factor=8.0, rope_original_max_position_embeddings=64),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64}),
}


def hf_inv_freq(params: dict, head_dim=None) -> torch.Tensor:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                   rope_parameters={**params, "rope_theta": 500000.0})
    emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    assert emb.attention_scaling == 1.0
    return emb.inv_freq


@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("head_dim", [None, 32])
def test_rope_inv_freq_equals_transformers(kind, head_dim):
    ours_fields, hf_params = SCALINGS[kind]
    arch = Architecture("t", **BASE, head_dim=head_dim, **ours_fields)
    assert torch.equal(rope_inv_freq(arch), hf_inv_freq(hf_params, head_dim))


def test_megatron_core_hard_coded_llama3_scaling_differs():
    """Negative control: Megatron-Core's own Llama-3.1 scaling ignores the config's factors."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    arch = Architecture("t", **BASE, **SCALINGS["llama3"][0])
    mcore = RotaryEmbedding(16, 1.0, rotary_base=500000, rope_scaling=True, rope_scaling_factor=8.0,
                            use_cpu_initialization=True)
    assert not torch.allclose(mcore.inv_freq, rope_inv_freq(arch))
    plain = dataclasses.replace(arch, rope_scaling_type="none")
    assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(arch))


def test_built_model_uses_the_architecture_rope():
    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import transformer_config
    from megatron_pack.parallel import destroy_distributed, initialize_distributed

    owns = not torch.distributed.is_initialized()
    initialize_distributed(1, 1)
    try:
        arch = Architecture("t", **BASE, **SCALINGS["llama3"][0])
        model = build_model(arch, transformer_config(arch, use_cpu_initialization=True), backend="local")
        assert torch.equal(model.rotary_pos_emb.inv_freq.cpu(), hf_inv_freq(SCALINGS["llama3"][1]))
        qwen = dataclasses.replace(arch, family="qwen2", qkv_bias=True, rope_scaling_type="none")
        model = build_model(qwen, transformer_config(qwen, use_cpu_initialization=True), backend="local")
        assert model.decoder.layers[0].self_attention.linear_qkv.bias.shape == (128,)
    finally:
        if owns:
            destroy_distributed()


def test_architecture_json_round_trip_and_differences():
    for arch in PRESETS.values():
        back = architecture_from_dict(json.loads(json.dumps(arch.to_dict())))
        assert back == arch
    a = PRESETS["llama3.1-8b"]
    assert architecture_differences(a, PRESETS["llama3-8b"]) == {
        "rope_scaling_type": ("llama3", "none"), "rope_scaling_factor": (8.0, 1.0),
        "rope_original_max_position_embeddings": (8192, None)}
    # name, vocabulary, init std and max positions do not make a different model
    assert architecture_differences(a, dataclasses.replace(a, name="x", vocab_size=7, init_method_std=1.0,
                                                           max_position_embeddings=8)) == {}
    # explicit head_dim equal to hidden / heads is the same architecture
    assert architecture_differences(a, dataclasses.replace(a, head_dim=128)) == {}


def test_invalid_architectures_are_refused():
    with pytest.raises(ArchitectureError, match="family 'gpt2'"):
        Architecture("t", **BASE, family="gpt2")
    with pytest.raises(ArchitectureError, match="rope_original_max_position_embeddings"):
        Architecture("t", **BASE, rope_scaling_type="llama3")


def test_get_preset_accepts_presets_and_hf_config_paths(tmp_path):
    assert get_preset("qwen2.5-7b").qkv_bias and get_preset("mistral-7b").family == "mistral"
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=300, tie_word_embeddings=True)
    cfg.save_pretrained(str(tmp_path / "qwen-small"))
    by_dir = get_preset(str(tmp_path / "qwen-small"))
    by_file = get_preset(str(tmp_path / "qwen-small" / "config.json"))
    assert by_dir == by_file and by_dir.name == "qwen-small"
    assert (by_dir.family, by_dir.qkv_bias, by_dir.tie_word_embeddings) == ("qwen2", True, True)
    with pytest.raises(ValueError, match="unknown model preset 'nope' and no such path"):
        get_preset("nope")
