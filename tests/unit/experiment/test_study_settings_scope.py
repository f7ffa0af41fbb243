"""Study settings carry the packing scope and the loss weighting in their names."""

import pytest

from megatron_pack.config.spec import DataArgs, TrainArgs, TrainConfig
from megatron_pack.experiment.compare import setting_config
from megatron_pack.experiment.settings import Setting, expand_settings


def test_scope_and_weighting_parse_and_name():
    s = Setting.parse("bfd@step+sample")
    assert (s.mode, s.document_mask, s.pack_scope, s.loss_weighting) == ("bfd", True, "step", "sample")
    assert s.name == "bfd@step+sample"
    assert Setting.parse("greedy/nomask+sample").name == "greedy/nomask+sample"
    assert Setting.parse("bfd") == Setting("bfd")  # the defaults: epoch scope, token weighting
    names = [x.name for x in expand_settings(["padding+sample", "bfd@step", "bfd"], [True, False])]
    assert names == ["padding+sample", "bfd@step", "bfd@step/nomask", "bfd", "bfd/nomask"]
    for bad in ("greedy@step", "bfd@batch", "bfd+tokens"):
        with pytest.raises(ValueError):
            Setting.parse(bad)


def test_setting_config_sets_the_flags(tmp_path):
    base = TrainConfig(data=DataArgs(data_path="x"), train=TrainArgs(train_iters=1))
    cfg = setting_config(base, Setting.parse("bfd@step+sample"), str(tmp_path / "l.jsonl"), None)
    assert cfg.data.packing.pack_scope == "step" and cfg.train.loss_weighting == "sample"
