"""The vocabulary-size rule (megatron_pack.model.vocab): one order for training, planner, help."""

import numpy as np
import pytest

from megatron_pack.model.presets import get_preset
from megatron_pack.model.vocab import VOCAB_RULE, resolve_vocab_size


def test_order_flag_then_tokenizer_then_architecture_then_data(wordlevel_dir, tmp_path):
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    llama = get_preset("llama3-8b")  # 128256
    tok = load_tokenizer(wordlevel_dir).vocab_size
    assert tok != llama.vocab_size
    data = str(tmp_path / "d")
    np.array([3, 41, 7], dtype=np.int32).tofile(data + ".bin")
    assert resolve_vocab_size(77, wordlevel_dir, llama, data) == 77
    assert resolve_vocab_size(None, wordlevel_dir, llama, data) == tok  # tokenizer beats the preset
    assert resolve_vocab_size(None, None, llama, data) == 128256
    assert resolve_vocab_size(None, None, get_preset("tiny"), data) == 42  # max id + 1
    with pytest.raises(ValueError, match="--vocab-size or --tokenizer-model"):
        resolve_vocab_size(None, None, get_preset("tiny"), None)


def test_training_follows_the_rule(wordlevel_dir, tmp_path):
    from megatron_pack.config.spec import DataArgs, ModelArgs, TrainArgs, TrainConfig
    from megatron_pack.files.indexed import SFTDatasetWriter
    from megatron_pack.training.setup import resolve_vocab_size as training_rule

    with SFTDatasetWriter(str(tmp_path / "d")) as w:  # ids below every vocabulary in play
        w.add([1, 2, 3], [0, 1, 1], [0])
    cfg = TrainConfig(model=ModelArgs(model="llama3-8b", tokenizer_model=wordlevel_dir),
                      data=DataArgs(data_path=str(tmp_path / "d")), train=TrainArgs(train_iters=1))
    assert training_rule(cfg, get_preset("llama3-8b")) == resolve_vocab_size(None, wordlevel_dir, None)
    assert "tokenizer" in VOCAB_RULE and VOCAB_RULE.index("tokenizer") < VOCAB_RULE.index("architecture")
