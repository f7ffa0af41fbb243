"""Flags Megatron-LM users type: each one parsed and honoured where the run uses it."""

import os
import shutil

import pytest

from megatron_pack.config.cli import parse_args, to_argv
from megatron_pack.config.spec import ConfigError, ModelArgs, TrainArgs, total_train_iters

BASE = ["--data-path", "/data/sft"]


def test_train_samples_gives_samples_over_batch_steps():
    cfg = parse_args(BASE + ["--train-samples", "1000", "--global-batch-size", "64"])
    assert cfg.train.train_samples == 1000 and cfg.train.train_iters is None
    assert total_train_iters(cfg.train, lambda e: pytest.fail("no epochs here")) == 15  # Megatron: 1000 // 64
    assert parse_args(to_argv(cfg)).train.train_samples == 1000
    # the other two ways still work, and epochs go through the callable
    assert total_train_iters(TrainArgs(train_iters=7), None) == 7
    assert total_train_iters(TrainArgs(train_epochs=2.0), lambda e: int(e * 10)) == 20


@pytest.mark.parametrize(
    "argv, msg",
    [
        (
            BASE + ["--train-samples", "100", "--train-iters", "3"],
            "--train-iters/--train-epochs/--train-samples: give exactly one",
        ),
        (
            BASE + ["--train-samples", "8", "--global-batch-size", "16"],
            "--train-samples: must be >= --global-batch-size",
        ),
        (BASE + ["--train-iters", "3", "--init-method-std", "0"], "--init-method-std: must be > 0"),
        (
            BASE + ["--train-iters", "3", "--tokenizer-type", "SentencePieceTokenizer"],
            "--tokenizer-type: needs --tokenizer-model",
        ),
        (BASE + ["--train-iters", "3", "--tokenizer-type", "GPT2BPETokenizer"], "invalid choice"),
    ],
)
def test_bad_values_name_the_flag(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.fixture(scope="module")
def both_kinds(tmp_path_factory, wordlevel_dir, sp_bpe_model):
    """A directory holding a HF tokenizer.json and a SentencePiece tokenizer.model of other sizes."""
    d = tmp_path_factory.mktemp("both")
    shutil.copy(os.path.join(wordlevel_dir, "tokenizer.json"), d / "tokenizer.json")
    shutil.copy(sp_bpe_model, d / "tokenizer.model")
    return str(d)


def test_tokenizer_type_picks_the_tokenizer_the_run_reads(both_kinds, tmp_path):
    from megatron_pack.files.indexed import SFTDatasetWriter
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    prefix = str(tmp_path / "sft")  # the run checks the data's ids against the vocabulary
    with SFTDatasetWriter(prefix) as w:
        w.add([1, 2, 3, 4], [0, 1, 1, 1], [0])
    from megatron_pack.model.presets import get_preset
    from megatron_pack.training.setup import resolve_vocab_size

    hf = load_tokenizer(os.path.join(both_kinds, "tokenizer.json")).vocab_size
    sp = load_tokenizer(os.path.join(both_kinds, "tokenizer.model")).vocab_size
    assert hf != sp  # otherwise the test could not tell them apart
    sizes = {}
    for kind in ("HuggingFaceTokenizer", "SentencePieceTokenizer"):
        cfg = parse_args(
            ["--data-path", prefix, "--train-iters", "1", "--tokenizer-model", both_kinds, "--tokenizer-type", kind]
        )
        assert cfg.model.tokenizer_type == kind
        sizes[kind] = resolve_vocab_size(cfg, get_preset("tiny"))
    assert sizes == {"HuggingFaceTokenizer": hf, "SentencePieceTokenizer": sp}
    # no type: the directory's default (tokenizer.json first)
    cfg = parse_args(["--data-path", prefix, "--train-iters", "1", "--tokenizer-model", both_kinds])
    assert resolve_vocab_size(cfg, get_preset("tiny")) == hf


def test_tokenizer_type_mismatch_is_a_usage_error(sp_bpe_model, wordlevel_dir, capsys):
    with pytest.raises(SystemExit):
        parse_args(
            BASE + ["--train-iters", "1", "--tokenizer-model", sp_bpe_model, "--tokenizer-type", "HuggingFaceTokenizer"]
        )
    assert "expects a .json file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs tokenizer.model"):
        ModelArgs(tokenizer_model=wordlevel_dir, tokenizer_type="SentencePieceTokenizer")
    assert (
        ModelArgs(tokenizer_model=sp_bpe_model, tokenizer_type="SentencePieceTokenizer").tokenizer_path == sp_bpe_model
    )


def test_init_method_std_reaches_the_transformer_config(monkeypatch):
    """setup passes --init-method-std to Megatron's TransformerConfig (output layer scaled from it)."""
    import megatron_pack.model.presets as presets

    seen = {}
    real = presets.transformer_config

    def spy(preset, **kw):
        seen["cfg"] = real(preset, **kw)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(presets, "transformer_config", spy)
    from megatron_pack.training.setup import setup_model_and_optimizer

    for argv, std in ((["--init-method-std", "0.5"], 0.5), ([], 0.02)):
        cfg = parse_args(BASE + ["--train-iters", "1"] + argv)
        with pytest.raises(RuntimeError, match="stop after the config"):
            setup_model_and_optimizer(cfg, presets.get_preset("tiny"), 256, False, False)
        assert seen["cfg"].init_method_std == std


def test_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--train-iters", "1", "--tokeniser-type", "HuggingFaceTokenizer"])
    message = capsys.readouterr().err.split("error:", 1)[1]  # not the usage text, which lists every flag
    assert "--tokenizer-type" in message
