"""Spec provider choices, THD PackedSeqParams from batches, init argument checks (no process group)."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_pack.data.collate import collate_padded, collate_thd
from megatron_pack.model import get_preset, transformer_config
from megatron_pack.model import spec as spec_mod
from megatron_pack.model.attention import VarlenCoreAttention
from megatron_pack.model.packed import model_inputs, packed_seq_params_from_batch
from megatron_pack.parallel import initialize_distributed


def core_attention(spec):
    return spec.submodules.self_attention.submodules.core_attention


def test_local_spec_uses_varlen_attention():
    cfg = transformer_config(get_preset("tiny"))
    ca = core_attention(spec_mod.get_layer_spec(cfg, "local"))
    assert ca.module is VarlenCoreAttention and ca.module is not DotProductAttention
    assert ca.params == {"kernel": "torch"}
    # without apex the norms are the sequence-parallel capable torch norms
    from megatron_pack.model.norm import TorchNorm

    layer = spec_mod.get_layer_spec(cfg, "local").submodules
    assert layer.input_layernorm is TorchNorm and layer.pre_mlp_layernorm is TorchNorm
    sp_norm = TorchNorm(transformer_config(get_preset("tiny"), sequence_parallel=True, tensor_model_parallel_size=2),
                        64, eps=1e-5)
    assert isinstance(sp_norm, torch.nn.RMSNorm) and sp_norm.weight.sequence_parallel is True
    # the local spec keeps TE's checkpoint names, so checkpoints move between backends
    keys = spec_mod.get_layer_spec(cfg, "local").submodules.sharded_state_dict_keys_map
    assert keys["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU choices")
def test_auto_without_cuda_is_local_torch():
    cfg = transformer_config(get_preset("tiny"), bf16=True)
    assert spec_mod.resolve_backend("auto") == "local"
    assert spec_mod.attention_kernel(cfg) == "torch"  # flash-attn needs CUDA
    assert core_attention(spec_mod.get_layer_spec(cfg)).module is VarlenCoreAttention
    line = spec_mod.describe(cfg)
    assert line.startswith("layers: Megatron-Core local; attention: PyTorch SDPA per document; norm: TorchNorm; "
                           "apex: no; optimizer: torch"), line
    off = "fusions: grad-accum off, rope off, bias-swiglu off, masked-softmax off"
    assert line.endswith(off) and line.count("fusions:") == 1, line
    assert "optimizer: torch AdamW;" in line
    assert "optimizer: torch SGD;" in spec_mod.describe(cfg, optimizer="sgd")  # it named AdamW for --optimizer sgd
    cfg.masked_softmax_fusion = True  # needs apex/TE kernels to run; here only to be named
    fused = spec_mod.describe(cfg)
    assert fused.endswith("masked-softmax on"), fused  # negative control: a fusion that is on is named
    with pytest.raises(RuntimeError, match="transformer_engine and CUDA"):
        spec_mod.get_layer_spec(cfg, "te")
    with pytest.raises(ValueError, match="unknown layer backend"):
        spec_mod.get_layer_spec(cfg, "apex")


def test_flash_needs_half_precision(monkeypatch):
    monkeypatch.setattr(spec_mod, "flash_attn_available", lambda: True)
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"), bf16=True)) == "flash"
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"))) == "torch"  # fp32


def item(n, S=8, K=3):
    tok = torch.arange(1, S + 1)
    cu = torch.full((K,), -1, dtype=torch.int32)
    cu[:2] = torch.tensor([0, n])
    return dict(tokens=tok, labels=tok, loss_mask=torch.ones(S), position_ids=torch.arange(S), cu_seqlens=cu,
                num_cu_seqlens=2, max_seqlen=n, num_real_tokens=n)


def test_packed_seq_params_from_thd_batch():
    batch = collate_thd([item(5), item(8), item(3)])
    p = packed_seq_params_from_batch(batch)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 5, 8, 16, 19, 24] and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_kv is p.cu_seqlens_q
    assert (p.max_seqlen_q, p.max_seqlen_kv) == (8, 8) and isinstance(p.max_seqlen_q, int)
    kwargs = model_inputs(batch)
    assert kwargs["input_ids"].shape == (1, 24) and kwargs["attention_mask"] is None
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 5, 8, 16, 19, 24]


def test_padded_batches_have_no_packed_params():
    assert packed_seq_params_from_batch(collate_padded([item(5), item(8)])) is None
    assert packed_seq_params_from_batch({"tokens": torch.zeros(2, 4)}) is None
    two_docs = item(6)
    two_docs["cu_seqlens"] = torch.tensor([0, 3, 6], dtype=torch.int32)
    two_docs["num_cu_seqlens"] = 3
    with pytest.raises(ValueError, match="collate_thd"):
        packed_seq_params_from_batch(collate_padded([item(5), two_docs]))


def test_bad_thd_cu_seqlens():
    batch = collate_thd([item(5)])
    batch["cu_seqlens"] = torch.tensor([0, 5, 7, -1], dtype=torch.int32)  # ends before the 8 tokens
    batch["num_cu_seqlens"] = torch.tensor(3)
    with pytest.raises(ValueError, match="must rise from 0"):
        packed_seq_params_from_batch(batch)


def test_world_size_must_divide(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor \(2\) x pipeline \(2\)"):
        initialize_distributed(2, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        initialize_distributed(0)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        initialize_distributed(1)


def test_llama3_presets_map_to_transformer_config():
    from megatron_pack.model import padded_vocab_size

    for name, layers, hidden, ffn, heads in (("llama3-8b", 32, 4096, 14336, 32), ("llama3-70b", 80, 8192, 28672, 64)):
        p = get_preset(name)
        cfg = transformer_config(p, tensor_model_parallel_size=8, pipeline_model_parallel_size=4 if layers == 80 else 1,
                                 bf16=True)
        assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads) == (
            layers,
            hidden,
            ffn,
            heads,
        )
        assert (cfg.num_query_groups, cfg.kv_channels) == (8, 128)  # GQA, 128-dim heads
        assert (
            cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
        )
        assert not cfg.add_bias_linear and cfg.params_dtype == torch.bfloat16
        assert (p.rope_theta, p.vocab_size, p.tie_word_embeddings) == (500000.0, 128256, False)
    assert padded_vocab_size(128256, 1) == 128256
    assert padded_vocab_size(128256, 8) == 129024  # Megatron pads to a multiple of 128 * TP
    with pytest.raises(ValueError, match="unknown model preset 'llama4'"):
        get_preset("llama4")


def test_set_seed_without_model_parallel_is_reproducible():
    import random

    import numpy as np

    from megatron_pack.parallel import set_seed

    draws = []
    for _ in range(2):
        assert set_seed(42) == 42  # no parallel state: no per-stage offset
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    set_seed(43)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) != draws[0]
    with pytest.raises(ValueError, match="seed must be >= 0"):
        set_seed(-1)
