"""Cluster planner: exact counts from Megatron-Core shards, layouts, memory, time, CLI."""

import json
import os
import re
import sys

import numpy as np
import pytest

from megatron_pack.config.spec import ConfigError
from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.model.presets import PRESETS
from megatron_pack.planning.catalogue import get_gpu
from megatron_pack.planning.cluster_plan import make_plan as _make_plan
from megatron_pack.planning.cluster_plan import plan_config, validate_layout
from megatron_pack.planning.memory import GIB, MemoryConfig, layer_activation_bytes_per_token, state_bytes_per_param
from megatron_pack.planning.params import count_parameters
from megatron_pack.planning.render import render
from megatron_pack.planning.step_time import SequenceStats, TimingConfig, estimate


def make_plan(cfg, **kw) -> dict:
    return _make_plan(cfg, **kw).to_json()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Llama-3-70B by hand: h 8192, ffn 28672, 64 heads, 8 KV groups of 128, 80 layers, vocab 128256.
L70 = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192  # 855,654,400 per layer
TOTAL_70B = 80 * L70 + 8192 + 2 * 128256 * 8192  # 70,553,706,496
TOTAL_8B = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 4096 + 2 * 128256 * 4096


@pytest.fixture(scope="module")
def p70():
    """llama3-70b, TP 8 x PP 4 on 32 GPUs: every distinct shard built on meta."""
    return count_parameters(PRESETS["llama3-70b"], tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
                            world_size=32)


def test_gpu_catalogue():
    a800 = get_gpu("A800-80GB")
    assert (a800.bf16_tflops, a800.nvlink_gbps, a800.memory_gib) == (312.0, 400.0, 80.0)
    assert get_gpu("a800") is a800 and get_gpu("h200").memory_gib == 141.0
    assert get_gpu("H100-80GB").bf16_tflops == 989.0 and get_gpu("a100").nvlink_gbps == 600.0
    with pytest.raises(ValueError, match="unknown GPU 'v100'"):
        get_gpu("v100")


def test_70b_total_matches_published(p70):
    assert TOTAL_70B == 70_553_706_496
    assert p70.total_unpadded == TOTAL_70B
    assert abs(p70.total_unpadded - 70.55e9) / 70.55e9 < 1e-3
    # TP 8 pads the vocab to a multiple of 1024: 129024 rows in both embedding and output layer
    assert p70.padded_vocab_size == 129024
    assert p70.total == TOTAL_70B + 2 * (129024 - 128256) * 8192


def test_70b_per_rank_counts_and_sum(p70):
    ranks = p70.per_rank
    assert sorted((r.tp_rank, r.pp_rank) for r in ranks) == [(t, s) for t in range(8) for s in range(4)]
    assert {r.global_rank for r in ranks if r.pp_rank == 1} == set(range(8, 16))  # DP 1: stage 1 = ranks 8..15
    layer_sharded = (L70 - 2 * 8192) // 8
    emb = 129024 // 8 * 8192
    by_stage = {s: {r.parameters for r in p70.stage_ranks(s)} for s in range(4)}
    assert by_stage[0] == {20 * (layer_sharded + 2 * 8192) + emb}  # 2,271,543,296
    assert by_stage[1] == by_stage[2] == {20 * (layer_sharded + 2 * 8192)}
    assert by_stage[3] == {20 * (layer_sharded + 2 * 8192) + emb + 8192}  # + final norm
    assert all(r.num_layers == 20 for r in ranks)
    assert [r.has_embedding for r in p70.stage_ranks(0)] == [True] * 8
    assert not any(r.has_output_layer for r in ranks if r.pp_rank < 3)
    # sum over ranks: TP-split parts add up, norms (replicated on each TP rank) count once per stage
    total = sum(r.tp_sharded for r in ranks) + sum(p70.stage_ranks(s)[0].tp_replicated for s in range(4))
    assert total == p70.total
    assert sum(r.parameters for r in ranks) == p70.total + 7 * (80 * 2 * 8192 + 8192)
    assert p70.build_seconds < 60


def test_8b_total_and_layout_independence():
    assert TOTAL_8B == 8_030_261_248
    one = count_parameters(PRESETS["llama3-8b"], world_size=8)
    split = count_parameters(PRESETS["llama3-8b"], tensor_model_parallel_size=4, pipeline_model_parallel_size=2,
                             world_size=8)
    assert one.total == one.total_unpadded == TOTAL_8B  # 128256 is a multiple of 128: no padding at TP 1
    assert abs(TOTAL_8B - 8.03e9) / 8.03e9 < 1e-3
    assert split.total_unpadded == TOTAL_8B and split.total == TOTAL_8B + 2 * (128512 - 128256) * 4096
    assert len(split.per_rank) == 8 and one.per_rank[0].parameters == TOTAL_8B


def test_tiny_counts_match_across_layouts():
    tiny = PRESETS["tiny"]
    a = count_parameters(tiny, vocab_size=3000)
    b = count_parameters(tiny, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, vocab_size=3000)
    # vocab 3000 pads to 3072 for TP 1 and TP 2 alike
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert a.total == b.total == 2 * per_layer + 64 + 2 * 3072 * 64
    assert a.total_unpadded == a.total - 2 * 72 * 64
    assert [r.num_layers for r in b.per_rank] == [1, 1, 1, 1]
    assert a.matmul_total == b.matmul_total == a.total - 3072 * 64 - (2 * 2 + 1) * 64


@pytest.mark.parametrize("model, tp, pp", [("tiny", 2, 2), ("llama3-8b", 4, 1)])
def test_tp_split_rule_matches_megatron_tags(model, tp, pp):
    # Megatron's own initialisation tags TP-split parameters; the fast path infers them from layer types
    kw = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, vocab_size=3000 if model == "tiny" else None
    )
    fast = count_parameters(PRESETS[model], **kw)
    tagged = count_parameters(PRESETS[model], megatron_tags=True, **kw)
    assert fast.per_rank == tagged.per_rank and fast.total == tagged.total
    assert all(r.tp_replicated > 0 and r.tp_sharded > r.tp_replicated for r in fast.per_rank)


@pytest.mark.parametrize(
    "over, reason",
    [
        (dict(tensor_model_parallel_size=16, nnodes=4), "16 does not divide the 8 query groups"),
        (dict(tensor_model_parallel_size=3, nnodes=3, gpus_per_node=4), "3 does not divide the 64 attention heads"),
        (dict(pipeline_model_parallel_size=3, nnodes=3), "PP 3 does not divide the 80 layers"),
        (dict(gpus_per_node=6), "TP\\*PP\\*CP = 8\\*1\\*1 = 8 does not divide the world size 6"),
        (dict(nnodes=2, global_batch_size=3), "not a multiple of micro-batch-size \\* data-parallel = 1 \\* 2"),
        (dict(tensor_model_parallel_size=1, sequence_parallel=True), "--sequence-parallel: needs"),
    ],
)
def test_illegal_layouts_rejected(over, reason):
    cfg = dict(model="llama3-70b", nnodes=1, gpus_per_node=8, tensor_model_parallel_size=8, global_batch_size=8)
    cfg.update(over)
    with pytest.raises(ConfigError, match=reason):  # LayoutError is one; the spec refuses SP without TP
        validate_layout(plan_config(**cfg))


def test_legal_layout_sizes_and_warnings():
    lay = validate_layout(
        plan_config(
            model="llama3-70b",
            nnodes=4,
            tensor_model_parallel_size=8,
            pipeline_model_parallel_size=2,
            global_batch_size=64,
            seq_length=4100,
            sequence_parallel=True,
        )
    )
    assert (lay.data_parallel_size, lay.num_microbatches, lay.padded_seq_length) == (2, 32, 4104)
    assert any("padded from --seq-length 4100 to 4104" in w for w in lay.warnings)
    lay = validate_layout(
        plan_config(
            model="llama3-70b",
            nnodes=2,
            gpus_per_node=4,
            tensor_model_parallel_size=8,
            global_batch_size=4,
            sequence_parallel=False,
        )
    )
    assert any("spans nodes" in w for w in lay.warnings) and any(
        "without --sequence-parallel" in w for w in lay.warnings
    )


def test_memory_formulas_by_hand():
    p = PRESETS["llama3-70b"]
    base = dict(
        tp=8,
        pp=4,
        cp=1,
        dp=4,
        seq_length=4096,
        micro_batch_size=1,
        num_microbatches=16,
        sequence_parallel=True,
        use_distributed_optimizer=False,
        recompute_granularity=None,
    )
    mc = MemoryConfig(**base)
    # (12h + 4gd + 6f) / t = (98304 + 4096 + 172032) / 8
    assert layer_activation_bytes_per_token(p, mc, None) == 34304
    no_sp = MemoryConfig(**{**base, "sequence_parallel": False})
    assert layer_activation_bytes_per_token(p, no_sp, None) == 8 * 8192 + (4 * 8192 + 4096 + 6 * 28672) / 8
    assert layer_activation_bytes_per_token(p, mc, "full") == 2 * 8192 / 8
    unfused = MemoryConfig(**{**base, "flash_attention": False})
    assert layer_activation_bytes_per_token(p, unfused, None) == 34304 + 2 * 64 * 4096 / 8
    assert layer_activation_bytes_per_token(p, unfused, "selective") == 34304
    assert state_bytes_per_param(mc) == {"weights": 2.0, "grads": 4.0, "optimizer": 12.0}
    assert state_bytes_per_param(MemoryConfig(**{**base, "use_distributed_optimizer": True}))["optimizer"] == 3.0


def test_plan_70b_memory_and_json_keys(p70, monkeypatch):
    import megatron_pack.planning.params as params_mod

    monkeypatch.setattr(params_mod, "count_parameters", lambda *a, **k: p70)  # built above, reuse
    cfg = plan_config(
        model="llama3-70b",
        nnodes=4,
        gpus_per_node=8,
        tensor_model_parallel_size=8,
        pipeline_model_parallel_size=4,
        sequence_parallel=True,
        seq_length=4096,
        micro_batch_size=1,
        global_batch_size=64,
        gpu="a800-80gb",
    )
    plan = make_plan(cfg)
    assert {"total_parameters", "per_rank_parameters", "memory_per_gpu_gb", "fits"} <= set(plan)
    assert len(plan["per_rank_parameters"]) == 32 and plan["total_parameters"] == p70.total
    mem = plan["memory_per_gpu_gb"]
    assert set(mem) >= {"weights", "grads", "optimizer", "activations", "total"}
    # stage 0 is the peak: 2,271,543,296 params x (2 + 4 + 12) bytes; 4 micro-batches x 20 layers in flight
    assert plan["memory_peak_stage"] == 0
    assert mem["weights"] == pytest.approx(2_271_543_296 * 2 / GIB)
    assert mem["optimizer"] == pytest.approx(2_271_543_296 * 12 / GIB)
    assert mem["activations"] == pytest.approx(34304 * 4096 * 20 * 4 / GIB)
    assert mem["total"] == pytest.approx(2_271_543_296 * 18 / GIB + 34304 * 4096 * 80 / GIB + 3.0)
    assert plan["fits"] is True and mem["total"] < 80
    alt = {(a["sequence_parallel"], a["use_distributed_optimizer"]): a for a in plan["memory_alternatives_gb"]}
    assert alt[(True, False)]["full"] < alt[(True, False)]["none"] < alt[(False, False)]["none"]
    # 1F1B step: model FLOPs / (32 x 312 TFLOP/s x 0.4) x (1 + 3/64)
    t = plan["timing"]
    flops = 64 * (6 * p70.matmul_total * 4096 + 6 * 80 * 8192 * 4096**2)
    assert t["model_flops_per_step"] == pytest.approx(flops)
    assert t["step_seconds"] == pytest.approx(flops / (32 * 312e12 * 0.4) * (1 + 3 / 64))
    text = render(plan)
    assert "FITS" in text and "70,553,706,496" in text and re.search(r"\| 0 +\| +4 \|", text)
    json.dumps(plan)  # serialisable as is


def test_timing_by_hand():
    p = PRESETS["tiny"]
    cfg = TimingConfig(
        gpu=get_gpu("h100"), num_gpus=4, pp=2, num_microbatches=4, global_batch_size=2, seq_length=8, mfu=0.5
    )
    stats = SequenceStats(num_sequences=5, real_tokens=30, sum_sq=100.0)
    e = estimate(p, 1000, stats, cfg)
    model = 6 * 1000 * 8 * 5 + 6 * 2 * 4 * 16 * 100.0
    assert e.steps == 2  # floor(5 / 2): the partial batch is dropped
    assert e.model_flops_per_step == pytest.approx(model / 5 * 2)
    assert e.step_seconds == pytest.approx(model / 5 * 2 / (4 * 989e12 * 0.5) * 1.25)
    assert e.epoch_seconds == pytest.approx(2 * e.step_seconds)
    full = estimate(p, 1000, stats, TimingConfig(**{**cfg.__dict__, "recompute_granularity": "full"}))
    assert full.executed_flops_per_step == pytest.approx(e.model_flops_per_step * 4 / 3)
    with pytest.raises(ValueError, match="--mfu"):
        TimingConfig(**{**cfg.__dict__, "mfu": 1.5})


def _write_dataset(prefix, lengths):
    with SFTDatasetWriter(str(prefix)) as w:
        for n in lengths:
            w.add(np.arange(1, n + 1, dtype=np.int32), np.ones(n, dtype=np.uint8), np.array([0], dtype=np.int32))


def test_mode_table_by_hand(tmp_path):
    # lengths 5 3 6 2, capacity 8: padding 4 sequences, bfd 2 ([6 2] [5 3])
    _write_dataset(tmp_path / "d", [5, 3, 6, 2])
    cfg = dict(
        model="tiny",
        vocab_size=3000,
        nnodes=1,
        gpus_per_node=1,
        seq_length=8,
        global_batch_size=2,
        data_path=str(tmp_path / "d"),
        modes=("padding", "bfd"),
        valid_fraction=0.0,
    )
    plan = make_plan(plan_config(**cfg))
    rows = {r["mode"]: r for r in plan["modes"]}
    assert (rows["padding"]["num_sequences"], rows["bfd"]["num_sequences"]) == (4, 2)
    assert (rows["padding"]["steps"], rows["bfd"]["steps"]) == (2, 1)
    assert rows["padding"]["attention_sum_sq"] == rows["bfd"]["attention_sum_sq"] == 25 + 9 + 36 + 4
    # every sequence costs 8 positions of dense FLOPs; attention is the same 74 s^2 in total
    dense, attn = 6 * plan["matmul_parameters"] * 8, 6 * 2 * 64 * 74
    assert rows["bfd"]["selected"] and rows["bfd"]["time_vs_padding"] == pytest.approx(
        (2 * dense + attn) / (4 * dense + attn)
    )
    nomask = {r["mode"]: r for r in make_plan(plan_config(**cfg, document_mask=False))["modes"]}
    assert nomask["bfd"]["attention_sum_sq"] == 64 + 64 and nomask["padding"]["attention_sum_sq"] == 74
    padded = {r["mode"]: r for r in make_plan(plan_config(**cfg, pad_attention=True))["modes"]}
    assert padded["padding"]["attention_sum_sq"] == 4 * 64


def test_cli_on_builtin_sample(tmp_path, capsys):
    import plan_parallel

    from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_pack.preprocess.sample import prepare_sample

    jsonl, tok = prepare_sample(str(tmp_path / "work"))
    preprocess(PreprocessConfig([jsonl], tok, str(tmp_path / "sample"), progress=False, plot=False))
    out = tmp_path / "plan.json"
    rc = plan_parallel.main(
        [
            "--model",
            "tiny",
            "--tokenizer-model",
            tok,
            "--nnodes",
            "1",
            "--gpus-per-node",
            "4",
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--use-distributed-optimizer",
            "--bf16",
            "--seq-length",
            "2048",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "4",
            "--data-path",
            str(tmp_path / "sample"),
            "--pack-mode",
            "bfd",
            "--train-epochs",
            "2",
            "--lr",
            "1e-5",
            "--save",
            "/ckpt",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    plan = json.load(open(out))
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    vocab = load_tokenizer(tok).vocab_size  # the sample tokenizer's, specials included
    assert plan["vocab_size"] == vocab and plan["padded_vocab_size"] == -(-vocab // 256) * 256
    assert len(plan["per_rank_parameters"]) == 4 and plan["fits"] is True
    rows = {r["mode"].split(":")[0]: r for r in plan["modes"]}
    assert set(rows) == {"padding", "greedy", "random", "bfd", "windowed_bfd"}
    assert plan["data"]["held_out_conversations"] == round(480 * 0.05)
    for r in rows.values():  # every placed token, the same for every mode
        assert r["real_tokens"] == plan["data"]["tokens"]
    assert (
        rows["padding"]["num_sequences"] == 480 - 24
        and rows["bfd"]["num_sequences"] < rows["greedy"]["num_sequences"] + 1
    )
    assert rows["bfd"]["epoch_seconds"] < 0.2 * rows["padding"]["epoch_seconds"]
    assert rows["bfd"]["train_steps"] == 2 * rows["bfd"]["steps"]
    assert re.search(r"\| bfd \* +\|", text) and "not modelled, ignored: --lr 1e-5 --save /ckpt" in text


def test_cli_rejects_and_oom(capsys):
    import plan_parallel

    rc = plan_parallel.main(
        [
            "--model",
            "llama3-70b",
            "--nnodes",
            "3",
            "--gpus-per-node",
            "8",
            "--tensor-model-parallel-size",
            "8",
            "--pipeline-model-parallel-size",
            "3",
        ]
    )
    assert (
        rc == 2
        and "illegal layout: --pipeline-model-parallel-size: PP 3 does not divide the 80 layers"
        in capsys.readouterr().err
    )
    # 70B unsharded on one 80 GiB GPU: 70.6e9 x 18 bytes is far over
    rc = plan_parallel.main(
        ["--model", "llama3-70b", "--nnodes", "1", "--gpus-per-node", "1", "--global-batch-size", "1", "--no-progress"]
    )
    assert rc == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_plan_without_dataset_uses_full_sequences():
    cfg = plan_config(
        model="tiny",
        vocab_size=3000,
        nnodes=1,
        gpus_per_node=2,
        tensor_model_parallel_size=2,
        seq_length=16,
        global_batch_size=4,
        train_iters=10,
        recompute_granularity="full",
        gpu="a100",
    )
    plan = make_plan(cfg)
    t = plan["timing"]
    flops = 4 * (6 * plan["matmul_parameters"] * 16 + 6 * 2 * 64 * 16**2)  # one 16-token document per sequence
    assert plan["modes"] == [] and t["model_flops_per_step"] == pytest.approx(flops)
    assert t["step_seconds"] == pytest.approx(flops * 4 / 3 / (2 * 312e12 * 0.4))  # + recomputed forward, no PP
    assert t["train_seconds"] == pytest.approx(10 * t["step_seconds"])
    alt = plan["memory_alternatives_gb"][0]  # SP off, distributed optimizer off: this config
    assert (alt["sequence_parallel"], alt["use_distributed_optimizer"]) == (False, False)
    assert plan["memory_per_gpu_gb"]["total"] == pytest.approx(alt["full"]) and alt["full"] < alt["none"]


@pytest.mark.parametrize(
    "name, tp, exact",
    [
        ("llama3.1-8b", 8, 8_030_261_248),
        ("llama3.1-70b", 8, 70_553_706_496),
        ("qwen2.5-7b", 4, 7_615_616_512),
        ("qwen2.5-72b", 8, 72_706_203_648),
        ("mistral-7b", 8, 7_248_023_552),
    ],
)
def test_new_presets_match_published_sizes(name, tp, exact):
    """Counted from the real Megatron-Core shards (Qwen2.5's q/k/v biases included), within 0.1%
    of the size each model card publishes; the exact figure pins the architecture."""
    from megatron_pack.planning.cluster_plan import PUBLISHED_PARAMETERS

    p = count_parameters(PRESETS[name], tensor_model_parallel_size=tp, world_size=tp)
    assert p.total_unpadded == exact
    assert abs(p.total_unpadded - PUBLISHED_PARAMETERS[name]) / PUBLISHED_PARAMETERS[name] < 1e-3


def test_cli_model_path_is_a_hf_config(tmp_path, capsys):
    """--model PATH: the planner costs any supported architecture from its config.json."""
    import plan_parallel

    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 32768,
    }
    (tmp_path / "qwen2.5-0.5b").mkdir()
    (tmp_path / "qwen2.5-0.5b" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "plan.json"
    rc = plan_parallel.main(
        [
            "--model",
            str(tmp_path / "qwen2.5-0.5b"),
            "--nnodes",
            "1",
            "--gpus-per-node",
            "2",
            "--tensor-model-parallel-size",
            "2",
            "--global-batch-size",
            "2",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    plan = json.load(open(out))
    # Qwen2.5-0.5B: 494,032,768 parameters (tied embeddings, q/k/v biases); the card says 0.49B
    assert plan["model"] == "qwen2.5-0.5b" and plan["total_parameters_unpadded"] == 494_032_768
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "qwen2.5-0.5b" / "config.json").write_text(json.dumps(cfg))
    rc = plan_parallel.main(["--model", str(tmp_path / "qwen2.5-0.5b"), "--no-progress"])
    assert rc == 2 and 'rope_scaling.rope_type = "yarn"' in capsys.readouterr().err


def test_smollm_style_llama_from_its_config(tmp_path):
    """The issue's model: a small Llama (SmolLM2-135M's config.json: 30 layers, hidden 576,
    9 heads / 3 KV groups, tied embeddings, theta 1e5) is no preset; its config is enough."""
    from megatron_pack.model.presets import get_preset

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = get_preset(str(tmp_path / "config.json"))
    assert (arch.kv_channels, arch.tie_word_embeddings, arch.rope_theta) == (64, True, 100000.0)
    assert count_parameters(arch).total_unpadded == 134_515_008  # the published 135M


def test_plan_forecasts_dp_imbalance_with_and_without_balancing(tmp_path):
    # long-tailed: a few conversations fill a 2048-token sequence alone, the rest are short
    rng = np.random.default_rng(0)
    lengths = [int(rng.integers(1500, 2048)) if i % 10 == 0 else int(rng.integers(20, 200)) for i in range(400)]
    _write_dataset(tmp_path / "d", lengths)
    cfg = plan_config(
        model="tiny",
        vocab_size=256,
        nnodes=1,
        gpus_per_node=4,
        seq_length=2048,
        global_batch_size=16,
        data_path=str(tmp_path / "d"),
        modes=("bfd",),
        valid_fraction=0.0,
    )
    plan = make_plan(cfg)
    (row,) = plan["modes"]
    f = row["balance"]
    assert f["sequences_per_rank"] == 4 and f["steps"] == row["steps"]
    assert f["imbalance_balanced"] < f["imbalance_contiguous"] and f["imbalance_balanced"] >= 1.0
    assert row["step_seconds_balanced"] < row["step_seconds_contiguous"]
    assert row["step_seconds_balanced"] >= row["step_seconds"] * (1 - 1e-12)  # never better than perfect
    text = render(plan)
    assert "Compute imbalance over DP 4" in text
    assert any(line.replace(" ", "").startswith("|bfd*|4|") for line in text.splitlines())


def test_context_parallel_kv_exchange_by_hand():
    from megatron_pack.planning.cp_exchange import exposed_seconds, kv_exchange

    p, a800 = PRESETS["llama3-70b"], get_gpu("a800")
    x = kv_exchange(
        p, a800, tp=8, cp=2, pp=2, seq_length=32768, micro_batch_size=1, num_microbatches=64, gpus_per_node=8
    )
    # 3 x (CP-1) x K,V x (8 groups x 128 / TP 8) x 16384 local tokens x 2 bytes, 40 layers, 64 micro-batches
    assert x["bytes_per_step"] == 3 * 1 * 2 * 128 * 16384 * 2 * 40 * 64
    assert x["link"] == "InfiniBand" and x["seconds_per_step"] == pytest.approx(x["bytes_per_step"] / 25e9)
    y = kv_exchange(
        p, a800, tp=4, cp=2, pp=2, seq_length=32768, micro_batch_size=1, num_microbatches=64, gpus_per_node=8
    )
    assert y["link"] == "NVLink" and y["link_gbps"] == 200.0  # TP x CP = 8 fits a node
    assert exposed_seconds(x, step_seconds=100.0, attention_share=0.5) == 0.0
    assert exposed_seconds(x, step_seconds=1.0, attention_share=0.1) == pytest.approx(x["seconds_per_step"] - 0.1)
    assert (
        kv_exchange(
            p, a800, tp=8, cp=1, pp=2, seq_length=4096, micro_batch_size=1, num_microbatches=1, gpus_per_node=8
        )["bytes_per_step"]
        == 0
    )


def test_planner_proposes_smallest_cp_that_fits(p70, monkeypatch):
    """70B at 256k on 8 x 8 A800, TP 8 x PP 4, full recompute, no distributed optimizer: CP 1 runs
    out of memory (activations of a 256k micro-batch), the planner proposes the smallest CP that fits."""
    import megatron_pack.planning.params as params_mod

    monkeypatch.setattr(params_mod, "count_parameters", lambda *a, **k: p70)
    cfg = plan_config(
        model="llama3-70b",
        nnodes=8,
        gpus_per_node=8,
        tensor_model_parallel_size=8,
        pipeline_model_parallel_size=4,
        sequence_parallel=True,
        use_distributed_optimizer=False,
        recompute_granularity="full",
        seq_length=262144,
        global_batch_size=64,
        gpu="a800",
    )
    plan = make_plan(cfg)
    opts = {o["cp"]: o["peak_gb"] for o in plan["cp_options_gb"]}
    assert sorted(opts) == [1, 2] and opts[2] < opts[1]
    assert plan["fits"] is False and opts[1] > 80 >= opts[2] and plan["proposed_cp"] == 2
    at2 = make_plan(plan_config(**{**cfg.to_json(), "context_parallel_size": 2}))
    assert at2["fits"] is True and at2["memory_per_gpu_gb"]["total"] == pytest.approx(opts[2])
    assert at2["timing"]["cp_kv_exchange"]["cp"] == 2 and "proposed CP: 2" in render(plan)
    with pytest.raises(
        ConfigError, match="--seq-length: 262142 must be a multiple of 16 under --context-parallel-size 2"
    ):
        validate_layout(plan_config(**{**cfg.to_json(), "context_parallel_size": 2, "seq_length": 262142}))


def _write_supervised(prefix, lengths, answer):
    """Conversations whose last ``answer`` tokens are trained (a prompt cut before it trains nothing)."""
    with SFTDatasetWriter(str(prefix)) as w:
        for n in lengths:
            mask = np.zeros(n, dtype=np.uint8)
            mask[max(0, n - answer) :] = 1
            w.add(np.arange(1, n + 1, dtype=np.int32), mask, np.array([0], dtype=np.int32))


@pytest.mark.parametrize("blend", [False, True])
def test_planner_plans_the_training_stream(tmp_path, blend):
    """The planner's sequences per mode are those of the dataset training builds (same split,
    per-source plans of a blend, items without a trained target left out)."""
    from megatron_pack.config.cli import parse_args
    from megatron_pack.config.datasets import build_datasets

    rng = np.random.default_rng(1)
    _write_supervised(tmp_path / "a", rng.integers(10, 120, 80).tolist() + [300] * 6, answer=8)
    _write_supervised(tmp_path / "b", rng.integers(10, 60, 50).tolist(), answer=8)
    data = ["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")] if blend else [str(tmp_path / "a")]
    cfg = plan_config(
        model="tiny",
        vocab_size=512,
        nnodes=1,
        gpus_per_node=1,
        seq_length=128,
        global_batch_size=2,
        data_path=data if blend else data[0],
        modes=("padding", "bfd"),
        valid_fraction=0.1,
    )
    rows = {r["mode"]: r for r in make_plan(cfg)["modes"]}
    for mode in ("padding", "bfd"):
        train_cfg = parse_args(
            [
                "--data-path",
                *data,
                "--model",
                "tiny",
                "--vocab-size",
                "512",
                "--seq-length",
                "128",
                "--valid-fraction",
                "0.1",
                "--pack-mode",
                mode,
                "--train-iters",
                "1",
                "--global-batch-size",
                "2",
                "--data-cache-path",
                str(tmp_path / f"cache_{mode}"),
            ]
        )
        train = build_datasets(train_cfg).train
        assert train.plan.stats.unsupervised_items > 0  # the 300-token prompts lose their answer at 128
        assert rows[mode]["num_sequences"] == len(train), mode
        assert rows[mode]["real_tokens"] == int(train.plan.sequence_lengths().sum()), mode
    # negative control: planning every stored conversation (no split, no unsupervised items left out) differs
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.plan import build_plan

    whole = build_plan(SFTIndexedDataset(str(tmp_path / "a")).lengths, 128, "padding")
    assert whole.num_sequences != rows["padding"]["num_sequences"]


def test_balance_batches_is_modelled_not_listed_as_ignored(tmp_path, capsys):
    """--balance-batches picks which placement's step time the run pays; it is not 'not modelled'."""
    import plan_parallel

    _write_dataset(tmp_path / "d", [int(x) for x in np.random.default_rng(0).integers(20, 2000, 300)])
    base = [
        "--model",
        "tiny",
        "--vocab-size",
        "256",
        "--nnodes",
        "1",
        "--gpus-per-node",
        "4",
        "--seq-length",
        "2048",
        "--global-batch-size",
        "16",
        "--data-path",
        str(tmp_path / "d"),
        "--modes",
        "bfd",
        "--no-progress",
    ]
    plans = {}
    for flag in ("--balance-batches", "--no-balance-batches"):
        assert plan_parallel.main(base + [flag, "--lr", "1e-5", "--json", str(tmp_path / "p.json")]) == 0
        text = capsys.readouterr().out
        plans[flag] = json.load(open(tmp_path / "p.json"))
        assert plans[flag]["unmodelled_flags"] == ["--lr", "1e-5"]  # negative control: a flag it does not model
        assert "balance-batches" not in text.split("not modelled, ignored:")[-1]
    on, off = plans["--balance-batches"], plans["--no-balance-batches"]
    assert on["layout"]["balance_batches"] is True and off["layout"]["balance_batches"] is False
    (r_on,), (r_off,) = on["modes"], off["modes"]
    assert r_on["step_seconds_as_run"] == r_on["step_seconds_balanced"]
    assert r_off["step_seconds_as_run"] == r_off["step_seconds_contiguous"] > r_on["step_seconds_as_run"]
    # default as training: on with DP 4
    assert plan_parallel.main(base + ["--json", str(tmp_path / "p.json")]) == 0
    assert json.load(open(tmp_path / "p.json"))["layout"]["balance_batches"] is True
