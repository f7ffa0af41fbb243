"""Where a run's architecture comes from: ``--model``, or what ``--load`` /
``--pretrained-checkpoint`` records (an import's metadata, a checkpoint's run_config.json)."""

import dataclasses
import json

import pytest

from megatron_pack.config.cli import parse_args
from megatron_pack.config.spec import ConfigError
from megatron_pack.model.presets import PRESETS
from megatron_pack.training.setup import resolve_architecture

BASE = ["--data-path", "x", "--train-iters", "1"]


def fake_checkpoint(root, run_config: dict, iteration: int = 3):
    it = root / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    (it / "run_config.json").write_text(json.dumps(run_config))
    return root


def test_no_checkpoint_uses_the_flag_or_tiny(tmp_path):
    assert resolve_architecture(parse_args(BASE))[0] == PRESETS["tiny"]
    assert resolve_architecture(parse_args(BASE + ["--model", "mistral-7b"]))[0] == PRESETS["mistral-7b"]
    # --load naming a directory that holds nothing yet (the first run of a job): the flag decides
    assert resolve_architecture(parse_args(BASE + ["--model", "qwen2.5-7b", "--load", str(tmp_path / "new")]))[0] \
        == PRESETS["qwen2.5-7b"]


def test_checkpoint_records_the_architecture(tmp_path):
    arch = dataclasses.replace(PRESETS["qwen2.5-7b"], name="my-qwen", num_layers=2, hidden_size=64,
                               ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2, vocab_size=300)
    extras = {"special_tokens": {"eos_token_id": 2}, "generation_config": {"eos_token_id": [2, 7]}}
    ck = fake_checkpoint(tmp_path / "ck", {"model": {"model": None}, "architecture": arch.to_dict(), "hf": extras})
    got, got_extras = resolve_architecture(parse_args(BASE + ["--load", str(ck)]))
    assert got == arch and got_extras == extras
    # also as the weights of a new run
    assert resolve_architecture(parse_args(BASE + ["--pretrained-checkpoint", str(ck)]))[0] == arch
    # a flag that agrees is accepted, one that does not is refused naming what differs
    from megatron_pack.model.hf_architecture import hf_config_from_architecture

    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_architecture(arch, "bfloat16")))
    assert resolve_architecture(parse_args(BASE + ["--load", str(ck), "--model", str(tmp_path / "config.json")]))[0] \
        == arch
    with pytest.raises(ConfigError, match=r"--model tiny: the architecture recorded in .*ck.* differs .*qkv_bias"):
        resolve_architecture(parse_args(BASE + ["--load", str(ck), "--model", "tiny"]))


def test_checkpoint_from_before_architectures_were_recorded(tmp_path):
    ck = fake_checkpoint(tmp_path / "old", {"model": {"model": "llama3-8b"}})
    assert resolve_architecture(parse_args(BASE + ["--load", str(ck)]))[0] == PRESETS["llama3-8b"]


def test_corrupt_run_config_is_named(tmp_path):
    ck = fake_checkpoint(tmp_path / "bad", {})
    (ck / "iter_0000003" / "run_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="run_config.json: not valid JSON"):
        resolve_architecture(parse_args(BASE + ["--load", str(ck)]))
