"""HF <-> Megatron mapping: fused-tensor layouts, TP splits, vocab padding, config/shape validation,
streaming memory, and that bad input leaves nothing behind. CPU, no Megatron process groups."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_pack.convert import mapping as M
from megatron_pack.convert.hf_config import ConversionError, parse_size, preset_from_hf_config
from megatron_pack.convert.hf_safetensors import SafetensorsReader, ShardedSafetensorsWriter
from megatron_pack.model.presets import LlamaPreset

PRESET = LlamaPreset("t", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8,
                     num_query_groups=2, vocab_size=300)


def hf_config(**over):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
           "intermediate_size": 48, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def hf_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = M.hf_shapes(PRESET)["layer"]
    return {n: torch.randn(*s, generator=g) for n, s in shapes.items()}


def write_hf_dir(path, cfg=None, tensors=None, shard_bytes=None):
    """A HF-style directory with random tensors of the config's shapes (optionally sharded)."""
    os.makedirs(path, exist_ok=True)
    cfg = cfg or hf_config()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if tensors is None:
        p = preset_from_hf_config(cfg)
        shapes = M.hf_shapes(p)
        g = torch.Generator().manual_seed(1)
        tensors = {n: torch.randn(*s, generator=g) for n, s in shapes["top"].items()}
        for i in range(p.num_layers):
            tensors.update({M.hf_layer_key(i, n): torch.randn(*s, generator=g) for n, s in shapes["layer"].items()})
    w = ShardedSafetensorsWriter(path, shard_bytes or 10**12)
    for n, t in tensors.items():
        w.add(n, t)
    w.close()
    return tensors


def test_qkv_layout_is_group_interleaved():
    # Each row of q/k/v holds its own index so the fused order can be read off directly.
    d, per = PRESET.kv_channels, 4
    q = torch.arange(8 * d).float()[:, None].expand(-1, 32)
    k = 1000 + torch.arange(2 * d).float()[:, None].expand(-1, 32)
    v = 2000 + torch.arange(2 * d).float()[:, None].expand(-1, 32)
    qkv = M.interleave_qkv(q, k, v, PRESET)[:, 0]
    block = (per + 2) * d
    assert qkv[:per * d].tolist() == list(range(per * d))                       # q heads 0-3 (group 0)
    assert qkv[per * d:per * d + d].tolist() == [1000.0 + i for i in range(d)]  # k of group 0
    assert qkv[block - d:block].tolist() == [2000.0 + i for i in range(d)]      # v of group 0
    assert qkv[block:block + per * d].tolist() == list(range(per * d, 2 * per * d))  # q heads 4-7 (group 1)
    assert torch.equal(torch.cat(M.split_qkv(M.interleave_qkv(q, k, v, PRESET), PRESET)), torch.cat([q, k, v]))


@pytest.mark.parametrize("tp", [1, 2])
def test_layer_round_trip_through_tp_shards(tp):
    hf = hf_layer()
    shards = M.hf_layer_to_megatron(hf, PRESET, tp)
    assert len(shards) == tp
    # TP rank r holds groups r*G/tp.. of qkv and gate_r/up_r of fc1
    d, f = PRESET.kv_channels, PRESET.ffn_hidden_size
    assert shards[-1]["self_attention.linear_qkv.weight"].shape == (2 // tp * 6 * d, 32)
    assert torch.equal(shards[-1]["mlp.linear_fc1.weight"][: f // tp], hf["mlp.gate_proj.weight"][f - f // tp:])
    assert torch.equal(shards[0]["mlp.linear_fc1.weight"][f // tp:], hf["mlp.up_proj.weight"][: f // tp])
    back = M.megatron_layer_to_hf(shards, PRESET)
    assert set(back) == set(hf)
    for n in hf:
        assert torch.equal(back[n], hf[n]), n


def test_tp2_shards_merge_like_the_unsharded_global_tensor():
    """A dist checkpoint stores qkv as the TP1 tensor and fc1 as [gate; up]: merging TP2 shards
    and reading the TP1 form must give the same HF tensors."""
    hf = hf_layer(3)
    one = M.hf_layer_to_megatron(hf, PRESET, 1)[0]
    two = M.hf_layer_to_megatron(hf, PRESET, 2)
    assert torch.equal(torch.cat([s["self_attention.linear_qkv.weight"] for s in two]),
                       one["self_attention.linear_qkv.weight"])
    assert torch.equal(torch.cat(M.fc1_merge([s["mlp.linear_fc1.weight"] for s in two])),
                       one["mlp.linear_fc1.weight"])


def test_replicated_norms_must_agree():
    shards = M.hf_layer_to_megatron(hf_layer(), PRESET, 2)
    shards[1]["mlp.linear_fc1.layer_norm_weight"] += 1
    with pytest.raises(ValueError, match="differs between the 2 TP ranks"):
        M.megatron_layer_to_hf(shards, PRESET)


def test_vocab_pad_strip_and_rows():
    t = torch.randn(300, 4)
    p = M.pad_vocab(t, 512)
    assert p.shape == (512, 4) and torch.equal(p[:300], t) and not p[300:].any()
    assert torch.equal(M.strip_vocab(p, 300), t)
    # TP2 over 512 padded rows: rank 0 rows 0..255 all real, rank 1 rows 256..299 then 212 zero rows
    assert M.vocab_rows(300, 512, 2, 0) == (0, 256, 0)
    assert M.vocab_rows(300, 512, 2, 1) == (256, 300, 212)
    assert M.vocab_rows(100, 512, 4, 3) == (384, 384, 128)


def test_tp_and_pp_divisibility_errors():
    with pytest.raises(ValueError, match="does not divide the 2 key/value heads"):
        M.check_tp(PRESET, 4)
    with pytest.raises(ValueError, match="does not divide the 8 attention heads"):
        M.check_tp(PRESET, 3)
    with pytest.raises(ValueError, match="does not divide the 2 layers"):
        M.check_pp(PRESET, 3)


def test_model_key_maps_te_names_to_local_spec():
    local = {"decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"}
    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"}
    assert M.model_key("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", local) == \
        "decoder.layers.0.input_layernorm.weight"
    assert M.model_key("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", local) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert M.model_key("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", te) in te


@pytest.mark.parametrize("over, match", [
    ({"hidden_size": None}, r"missing required keys \['hidden_size'\]"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": None}, r'architectures = \["GPT2LMHeadModel"\]: not a '
                                                                 "supported family"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, 'model_type = "mixtral": not a supported'),
    ({"model_type": "mistral"}, "model_type 'mistral' is built by MistralForCausalLM"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3: does not divide num_attention_heads 8"),
    ({"head_dim": 0}, "head_dim = 0: must be a positive integer"),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu": only SiLU'),
    ({"attention_bias": True}, "attention_bias = true: .*o_proj"),
    ({"mlp_bias": True}, "mlp_bias = true"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor is missing"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 'rope_scaling.rope_type = "yarn": RoPE scaling of'),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 'rope_scaling.rope_type = "dynamic"'),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, 'rope_parameters.rope_type = "longrope"'),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ({"num_local_experts": 8}, "num_local_experts = 8: mixture-of-experts"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16,
      "max_position_embeddings": 64}, "sliding_window = 16: sliding-window attention is not supported"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 16}, "use_sliding_window = true"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"vocab_size": "300"}, 'vocab_size = "300": must be a positive integer'),
])
def test_config_errors(over, match):
    with pytest.raises(ConversionError, match=match):
        preset_from_hf_config(hf_config(**over), "x/config.json")


def test_supported_families_and_switches():
    assert preset_from_hf_config(hf_config()).family == "llama"
    m = preset_from_hf_config(hf_config(architectures=["MistralForCausalLM"], model_type="mistral",
                                        sliding_window=None, head_dim=16))
    assert (m.family, m.qkv_bias, m.kv_channels, m.head_dim) == ("mistral", False, 16, 16)
    q = preset_from_hf_config(hf_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                                        use_sliding_window=False, tie_word_embeddings=True))
    assert (q.family, q.qkv_bias, q.tie_word_embeddings, q.head_dim) == ("qwen2", True, True, None)
    # a Llama-3.1 config as the hub ships it (transformers 4.x keys)
    r = preset_from_hf_config(hf_config(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}))
    scaling = (r.rope_scaling_type, r.rope_scaling_factor, r.rope_original_max_position_embeddings)
    assert scaling == ("llama3", 8.0, 8192)
    lin = preset_from_hf_config(hf_config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert (lin.rope_scaling_type, lin.rope_scaling_factor) == ("linear", 2.0)


def test_exported_config_reads_back_as_the_same_architecture():
    from megatron_pack.model.architecture import architecture_differences
    from megatron_pack.model.hf_architecture import hf_config_from_architecture
    from megatron_pack.model.presets import PRESETS

    for name, arch in PRESETS.items():
        arch = arch if arch.vocab_size else arch.with_vocab(300)
        back = preset_from_hf_config(hf_config_from_architecture(arch, "bfloat16"))
        assert architecture_differences(arch, back) == {}, name
        assert back.max_position_embeddings == arch.max_position_embeddings
    # negative control: the comparison sees a changed switch
    q = PRESETS["qwen2.5-7b"]
    assert "qkv_bias" in architecture_differences(
        q,
        preset_from_hf_config(
            {**hf_config_from_architecture(q, "float32"), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        ),
    )


def test_qkv_bias_round_trip_through_tp_shards():
    import dataclasses

    q = dataclasses.replace(PRESET, family="qwen2", qkv_bias=True)
    g = torch.Generator().manual_seed(5)
    hf = {n: torch.randn(*s, generator=g) for n, s in M.hf_shapes(q)["layer"].items()}
    assert set(M.HF_QKV_BIASES) <= set(hf)
    one = M.hf_layer_to_megatron(hf, q, 1)[0]
    two = M.hf_layer_to_megatron(hf, q, 2)
    bias = one[M.MEG_QKV_BIAS]
    weight = one["self_attention.linear_qkv.weight"]
    # the bias rows follow the weight rows: bias[i] belongs to row i of the fused weight
    expected = M.interleave_qkv(
        torch.cat([hf["self_attn.q_proj.weight"], hf["self_attn.q_proj.bias"][:, None]], 1),
        torch.cat([hf["self_attn.k_proj.weight"], hf["self_attn.k_proj.bias"][:, None]], 1),
        torch.cat([hf["self_attn.v_proj.weight"], hf["self_attn.v_proj.bias"][:, None]], 1),
        q,
    )
    assert torch.equal(expected[:, :-1], weight) and torch.equal(expected[:, -1], bias)
    assert torch.equal(torch.cat([s[M.MEG_QKV_BIAS] for s in two]), bias)
    for shards in ([one], two):
        back = M.megatron_layer_to_hf(shards, q)
        assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_config_reads_transformers5_rope_parameters():
    cfg = hf_config(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    p = preset_from_hf_config(cfg)
    assert (p.rope_theta, p.num_query_groups, p.kv_channels, p.vocab_size) == (1234.0, 2, 4, 300)


def test_sharded_writer_and_reader_round_trip(tmp_path):
    tensors = write_hf_dir(tmp_path / "hf", shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    r = SafetensorsReader(str(tmp_path / "hf"))
    r.validate(PRESET)
    for n, t in tensors.items():
        assert torch.equal(r.get(n), t)
    assert torch.equal(r.get_rows(M.HF_EMBEDDING, 10, 20), tensors[M.HF_EMBEDDING][10:20])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("123") == 123
    with pytest.raises(ConversionError):
        parse_size("five gigs")


@pytest.mark.parametrize("case", ["shape", "missing", "tp", "arch", "pickle_only", "bad_json", "int_dtype"])
def test_bad_input_writes_nothing(tmp_path, case):
    from megatron_pack.convert import convert_hf_to_megatron

    hf = tmp_path / "hf"
    tp, match = 1, None
    if case == "shape":
        tensors = write_hf_dir(hf)
        tensors[M.hf_layer_key(1, "self_attn.k_proj.weight")] = torch.zeros(16, 32)  # config says 8 x 32
        write_hf_dir(hf, tensors=tensors)
        match = r"model.layers.1.self_attn.k_proj.weight has shape \[16, 32\], the config implies \[8, 32\]"
    elif case == "missing":
        tensors = write_hf_dir(hf)
        del tensors[M.HF_OUTPUT]
        os.remove(hf / "model.safetensors")
        write_hf_dir(hf, tensors=tensors)
        match = "missing, e.g. \\['lm_head.weight'\\]"
    elif case == "tp":
        write_hf_dir(hf)
        tp, match = 4, "tensor model parallel size 4 does not divide the 2 key/value heads"
    elif case == "arch":
        write_hf_dir(hf)
        (hf / "config.json").write_text(json.dumps(hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})))
        match = 'x?rope_scaling.rope_type = "yarn"'
    elif case == "int_dtype":  # I32 weights used to be cast to ~1e9 floats, rc 0
        tensors = write_hf_dir(hf)
        key = M.hf_layer_key(0, "mlp.up_proj.weight")
        tensors[key] = (tensors[key] * 1e3).to(torch.int32)
        write_hf_dir(hf, tensors=tensors)
        match = rf"tensor '{key}' is I32; weights must be one of \['BF16', 'F16', 'F32'\]"
    elif case == "pickle_only":
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(hf_config()))
        (hf / "pytorch_model.bin").write_bytes(b"not read")
        match = "pickle checkpoints are not read"
    else:
        write_hf_dir(hf)
        (hf / "config.json").write_text('{"hidden_size": 32,\n "vocab_size": }')
        match = "line 2: invalid JSON"
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match):
        convert_hf_to_megatron(str(hf), str(out), tensor_model_parallel_size=tp, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left either


def test_output_must_be_new(tmp_path):
    from megatron_pack.convert import convert_hf_to_megatron

    write_hf_dir(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_import_and_export_round_trip_tp2_pp2_without_megatron_runtime(tmp_path):
    from safetensors.torch import load_file

    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    tensors = write_hf_dir(tmp_path / "hf")
    meta = convert_hf_to_megatron(
        str(tmp_path / "hf"),
        str(tmp_path / "meg"),
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        progress=False,
    )
    assert meta["padded_vocab_size"] == 512
    it = tmp_path / "meg" / "iter_0000000"
    assert sorted(p.name for p in it.iterdir()) == [
        "megatron_pack_import.json",
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    assert sorted(os.listdir(it / "mp_rank_01_001")) == ["head.safetensors", "layer_000.safetensors"]
    emb1 = load_file(str(it / "mp_rank_01_000" / "embedding.safetensors"))[M.MEG_EMBEDDING]
    assert emb1.shape == (256, 32) and torch.equal(emb1[:44], tensors[M.HF_EMBEDDING][256:]) and not emb1[44:].any()
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), max_shard_size="30KB", progress=False)
    r = SafetensorsReader(str(tmp_path / "back"))
    assert len(set(r.weight_map.values())) > 2 and set(r.names()) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(r.get(n), t), n
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert preset_from_hf_config(cfg).num_query_groups == 2 and cfg["vocab_size"] == 300


def test_bf16_is_kept_and_fp32_on_request(tmp_path):
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    tensors = {n: t.to(torch.bfloat16) for n, t in write_hf_dir(tmp_path / "src").items()}
    write_hf_dir(tmp_path / "hf", tensors=tensors)
    meta = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "meg"), progress=False)
    assert meta["dtype"] == "bfloat16"
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "b16"), progress=False)
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "f32"), dtype="fp32", progress=False)
    r16, r32 = SafetensorsReader(str(tmp_path / "b16")), SafetensorsReader(str(tmp_path / "f32"))
    n = M.hf_layer_key(0, "mlp.up_proj.weight")
    assert r16.get(n).dtype == torch.bfloat16 and torch.equal(r16.get(n), tensors[n])
    assert r32.get(n).dtype == torch.float32 and torch.equal(r32.get(n), tensors[n].float())
    assert json.loads((tmp_path / "b16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hf_to_megatron_peak_memory_is_about_one_layer(tmp_path):
    """Convert a 12-layer model of ~150 MB (12 MB per layer, 8 MB per vocabulary table) both
    ways in a fresh process: the peak resident-set growth of each conversion stays under a
    quarter of the model (about two layers; the output shard limit is 8 MB)."""
    cfg = hf_config(
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=12,
        vocab_size=4000,
    )
    write_hf_dir(tmp_path / "hf", cfg=cfg, shard_bytes=40 * 2**20)
    write_hf_dir(tmp_path / "small")
    model_bytes = sum(
        os.path.getsize(tmp_path / "hf" / n) for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")
    )
    script = textwrap.dedent(f"""
        import torch
        from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        # Warm up on a tiny model first: lazy imports and allocator pools are not the conversion's.
        convert_hf_to_megatron({str(tmp_path / "small")!r}, {str(tmp_path / "small_meg")!r}, progress=False)
        convert_megatron_to_hf({str(tmp_path / "small_meg")!r}, {str(tmp_path / "small_back")!r}, progress=False)

        def peak_growth(fn):  # ru_maxrss would carry pytest's peak over fork+exec: reset VmHWM
            open("/proc/self/clear_refs", "w").write("5")
            before = status("VmRSS")
            fn()
            return status("VmHWM") - before

        a = peak_growth(lambda: convert_hf_to_megatron({str(tmp_path / "hf")!r}, {str(tmp_path / "meg")!r},
                                                       tensor_model_parallel_size=2, progress=False))
        b = peak_growth(lambda: convert_megatron_to_hf({str(tmp_path / "meg")!r}, {str(tmp_path / "back")!r},
                                                       max_shard_size="8MB", progress=False))
        print(a, b)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    to_megatron, to_hf = map(int, out.split()[-2:])
    assert model_bytes > 140 * 2**20
    assert 0 < to_megatron < model_bytes / 4, (to_megatron, model_bytes)
    assert 0 < to_hf < model_bytes / 4, (to_hf, model_bytes)


def test_tied_embeddings_round_trip(tmp_path):
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    tensors = write_hf_dir(tmp_path / "hf", cfg=hf_config(tie_word_embeddings=True))
    assert M.HF_OUTPUT not in tensors
    convert_hf_to_megatron(
        str(tmp_path / "hf"),
        str(tmp_path / "meg"),
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        progress=False,
    )
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), progress=False)
    r = SafetensorsReader(str(tmp_path / "back"))
    assert set(r.names()) == set(tensors)  # no lm_head written back
    assert all(torch.equal(r.get(n), t) for n, t in tensors.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True


def test_loading_an_import_at_another_layout_says_what_to_pass(tmp_path, monkeypatch):
    from megatron.core import parallel_state as ps

    from megatron_pack.checkpoint.imported import is_imported_checkpoint, load_imported_weights
    from megatron_pack.convert import convert_hf_to_megatron

    write_hf_dir(tmp_path / "hf")
    convert_hf_to_megatron(
        str(tmp_path / "hf"),
        str(tmp_path / "meg"),
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        progress=False,
    )
    assert is_imported_checkpoint(str(tmp_path / "meg")) and not is_imported_checkpoint(str(tmp_path / "hf"))
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 2)
    with pytest.raises(
        ConversionError,
        match="converted for --tensor-model-parallel-size 2 "
        "--pipeline-model-parallel-size 2, but this run has TP 1, PP 2",
    ):
        load_imported_weights(str(tmp_path / "meg"), torch.nn.Linear(2, 2))


def test_finetune_load_prefers_the_runs_own_checkpoint(tmp_path):
    from megatron_pack.checkpoint.imported import resolve_finetune_load
    from megatron_pack.convert import convert_hf_to_megatron

    write_hf_dir(tmp_path / "hf")
    imp, save = str(tmp_path / "imp"), tmp_path / "save"
    convert_hf_to_megatron(str(tmp_path / "hf"), imp, progress=False)
    assert resolve_finetune_load(imp, str(save)) == (imp, True)  # first start: the import
    save.mkdir()
    assert resolve_finetune_load(imp, str(save)) == (imp, True)  # empty --save dir: still the import
    (save / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert resolve_finetune_load(imp, str(save)) == (str(save), False)  # restarted job: resume
    assert resolve_finetune_load(str(save), str(save)) == (str(save), False)
    assert resolve_finetune_load(None, str(save)) == (None, False)


def test_cli_reports_bad_input_and_exits_2(tmp_path):
    write_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(num_hidden_layers=3)))
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_checkpoint.py")
    res = subprocess.run(
        [
            sys.executable,
            tool,
            "hf-to-megatron",
            "--hf-dir",
            str(tmp_path / "hf"),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2  # bad input (README, "Exit status")
    assert "convert_checkpoint.py: error:" in res.stderr
    assert "num_hidden_layers = 3, but the safetensors in" in res.stderr and "hold 2 layers" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "over, named",
    [
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 16,
                "max_position_embeddings": 64,
            },
            "sliding_window = 16",
        ),
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts = 8"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, 'rope_scaling.rope_type = "longrope"'),
        ({"hidden_act": "gelu_pytorch_tanh"}, 'hidden_act = "gelu_pytorch_tanh"'),
    ],
)
def test_unsupported_feature_refused_at_conversion_nothing_written(tmp_path, over, named):
    """Weights that match the config's shapes, a feature megatron_pack would silently compute
    differently: refused naming the key and value, no output and no temporary directory."""
    from megatron_pack.convert import convert_hf_to_megatron

    hf = tmp_path / "hf"
    write_hf_dir(hf)
    (hf / "config.json").write_text(json.dumps(hf_config(**over)))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=re.escape(f"{hf / 'config.json'}: {named}")):
        convert_hf_to_megatron(str(hf), str(out), progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]
    # the command line says the same in one line and exits 2
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_checkpoint.py"),
            "hf-to-megatron",
            "--hf-dir",
            str(hf),
            "--output",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and named in res.stderr and not out.exists()
