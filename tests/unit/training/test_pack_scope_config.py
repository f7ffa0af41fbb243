"""--pack-scope: checked where it is parsed, and part of what a saved data position means."""

import pytest

from megatron_pack.config.spec import ConfigError, DataArgs, PackingArgs, TrainArgs, TrainConfig
from megatron_pack.training.restore import data_signature


def _cfg(**packing):
    return TrainConfig(data=DataArgs(data_path="x", packing=PackingArgs(**packing)), train=TrainArgs(train_iters=1))


def test_step_scope_takes_bfd_and_one_prefix():
    assert _cfg(pack_scope="step").data.packing.pack_scope == "step"
    with pytest.raises(ConfigError, match="--pack-scope step: packs each step with bfd"):
        _cfg(pack_scope="step", pack_mode="greedy")
    with pytest.raises(ConfigError, match="not a blend"):
        TrainConfig(data=DataArgs(data_path=["0.5", "a", "0.5", "b"], packing=PackingArgs(pack_scope="step")),
                    train=TrainArgs(train_iters=1))


def test_scope_is_in_the_data_signature():
    """A checkpoint's step-in-epoch means another batch under the other scope: resuming across is refused;
    epoch-scope signatures are unchanged, so older checkpoints keep resuming."""
    assert "pack_scope" not in data_signature(_cfg())
    assert data_signature(_cfg(pack_scope="step"))["pack_scope"] == "step"
