"""The training CLI is generated from the config dataclasses: names, bool pairs, checks."""

import dataclasses
import json

import pytest

from megatron_pack.config.cli import build_parser, parse_args, to_argv
from megatron_pack.config.spec import ConfigError, DataArgs, OptimArgs, TrainArgs, TrainConfig, warmup_steps

BASE = ["--data-path", "/data/sft", "--train-iters", "10"]


def test_megatron_flag_names_are_generated():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for f in ("--data-path", "--model", "--pack-mode", "--no-document-mask", "--document-mask", "--seq-length",
              "--micro-batch-size", "--global-batch-size", "--train-iters", "--train-epochs", "--lr", "--min-lr",
              "--lr-warmup-fraction", "--clip-grad", "--save", "--load", "--save-interval",
              "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
              "--use-distributed-optimizer", "--no-use-distributed-optimizer", "--bf16", "--no-bf16",
              "--tensorboard-dir", "--log-interval", "--eval-interval", "--loss-weighting", "--exit-signal-handler"):
        assert f in flags, f


def test_parse_builds_nested_dataclasses():
    cfg = parse_args(BASE + ["--model", "llama3-8b", "--pack-mode", "greedy", "--no-document-mask", "--seq-length",
                             "4096", "--lr", "1e-5", "--lr-warmup-fraction", "0.2", "--tensor-model-parallel-size",
                             "8", "--pipeline-model-parallel-size", "4", "--sequence-parallel", "--bf16"])
    assert cfg.model.model == "llama3-8b" and cfg.model.bf16 is True
    assert cfg.data.packing.pack_mode == "greedy" and cfg.data.packing.document_mask is False
    assert cfg.data.seq_length == 4096 and cfg.optim.lr == 1e-5 and cfg.optim.lr_warmup_fraction == 0.2
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (8, 4)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.parallel.use_distributed_optimizer is None  # auto: on with NCCL
    assert cfg.train.train_iters == 10 and cfg.train.train_epochs is None


def test_defaults_and_round_trip():
    cfg = parse_args(BASE)
    assert cfg.data.packing.document_mask is True and cfg.data.packing.pack_mode == "bfd"
    assert cfg.train.loss_weighting == "token" and cfg.model.bf16 is None
    again = parse_args(to_argv(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("argv, flag", [
    (["--data-path", "x"], "--train-iters/--train-epochs"),
    (BASE + ["--train-epochs", "2"], "--train-iters/--train-epochs"),
    (BASE + ["--pack-mode", "tetris"], "--pack-mode"),
    (BASE + ["--seq-length", "1"], "--seq-length"),
    (BASE + ["--lr", "1e-5", "--min-lr", "1e-4"], "--min-lr"),
    (BASE + ["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction"),
    (BASE + ["--valid-fraction", "1.0"], "--valid-fraction"),
    (BASE + ["--no-document-mask", "--loss-weighting", "sample"], "--loss-weighting sample"),
    (BASE + ["--sequence-parallel"], "--sequence-parallel"),
    (BASE + ["--pack-mode", "padding:pad_to=longest", "--pipeline-model-parallel-size", "2"],
     "--pack-mode padding:pad_to=longest"),
    (BASE + ["--pack-mode", "greedy:chunk=x"], "--pack-mode"),
    (BASE + ["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--train-iters", "3"], "--data-path"),
])
def test_bad_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--transformer-impl", "fast"])
    assert "invalid choice" in capsys.readouterr().err


def test_model_is_a_preset_or_a_hf_config_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--model", "gpt5"])
    err = capsys.readouterr().err
    assert "--model" in err and "unknown model 'gpt5'" in err
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")  # read with the flags (sizes bounded before torch): an unusable config is refused here
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--model", str(cfg)])
    assert f"--model: {cfg}: neither 'architectures' nor 'model_type'" in capsys.readouterr().err
    from megatron_pack.model.hf_architecture import hf_config_from_architecture
    from megatron_pack.model.presets import PRESETS

    cfg.write_text(json.dumps(hf_config_from_architecture(PRESETS["qwen2.5-7b"], "bfloat16")))
    assert parse_args(BASE + ["--model", str(cfg)]).model.model == str(cfg)
    assert parse_args(BASE + ["--model", "qwen2.5-7b"]).model.model == "qwen2.5-7b"
    assert parse_args(BASE).model.model is None  # the architecture then comes from --load, else tiny


def test_resolve_checks_batch_divisibility():
    cfg = parse_args(
        BASE + ["--micro-batch-size", "2", "--global-batch-size", "16", "--tensor-model-parallel-size", "2"]
    )
    sizes = cfg.resolve(world_size=8)
    assert (sizes.data_parallel_size, sizes.num_microbatches) == (4, 2)
    with pytest.raises(ConfigError, match="--global-batch-size"):
        cfg.resolve(world_size=12)  # DP 6: 16 % 12 != 0
    with pytest.raises(ConfigError, match="does not divide"):
        cfg.resolve(world_size=3)


def test_dataclass_checks_apply_without_the_cli():
    with pytest.raises(ConfigError, match="--seq-length"):
        DataArgs(data_path="x", seq_length=0)
    with pytest.raises(ConfigError, match="--data-path"):
        TrainConfig(train=TrainArgs(train_iters=1))


def test_warmup_steps():
    assert warmup_steps(OptimArgs(lr_warmup_fraction=0.2), 100) == 20
    assert warmup_steps(OptimArgs(lr_warmup_iters=7), 100) == 7
    assert warmup_steps(OptimArgs(lr_warmup_iters=700), 100) == 100


def test_balance_batches_flag_and_default():
    from types import SimpleNamespace

    from megatron_pack.model.presets import get_preset
    from megatron_pack.training.loop import _balancer

    assert parse_args(BASE).train.balance_batches is None
    assert parse_args(BASE + ["--balance-batches"]).train.balance_batches is True
    off = parse_args(BASE + ["--no-balance-batches"])
    assert off.train.balance_batches is False and parse_args(to_argv(off)).train.balance_batches is False
    st = lambda dp, pp: SimpleNamespace(dp_size=dp, pp_size=pp, tp_size=1, cp_size=1)  # noqa: E731
    tiny, t = get_preset("tiny"), parse_args(BASE).train
    assert [_balancer(t, tiny, 256, st(*s)).enabled for s in ((1, 1), (2, 1), (1, 2))] == [False, True, True]
    assert _balancer(off.train, tiny, 256, st(2, 1)).enabled is False
    assert _balancer(parse_args(BASE + ["--balance-batches"]).train, tiny, 256, st(1, 1)).enabled is True


def test_context_parallel_flags_and_bad_input(capsys):
    cfg = parse_args(BASE + ["--context-parallel-size", "2", "--cp-comm-type", "a2a", "--seq-length", "4096"])
    assert (cfg.parallel.context_parallel_size, cfg.parallel.cp_comm_type) == (2, "a2a")
    bad = [
        (
            ["--context-parallel-size", "2", "--seq-length", "4098"],
            "--seq-length: 4098 must be a multiple of 4 under --context-parallel-size 2",
        ),
        (
            [
                "--context-parallel-size",
                "2",
                "--tensor-model-parallel-size",
                "4",
                "--sequence-parallel",
                "--seq-length",
                "4100",
            ],
            "--seq-length: 4100 must be a multiple of 8",
        ),  # lcm(2*CP, TP*CP)
        (
            ["--context-parallel-size", "2", "--cp-comm-type", "allgather", "--transformer-impl", "transformer_engine"],
            "--cp-comm-type: allgather does not take packed",
        ),
    ]
    for argv, msg in bad:
        with pytest.raises(SystemExit):
            parse_args(BASE + argv)
        assert msg in capsys.readouterr().err, msg
    cfg = parse_args(BASE + ["--context-parallel-size", "3", "--global-batch-size", "4", "--seq-length", "4098"])
    with pytest.raises(ConfigError, match="context-model-parallel-size: TP\\*PP\\*CP = 1\\*1\\*3 = 3 does not divide"):
        cfg.resolve(4)
