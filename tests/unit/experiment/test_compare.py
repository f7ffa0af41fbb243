"""The comparison runner: settings, same initial weights, same evaluation, outputs."""

import json
import os

import pytest

from megatron_pack.experiment.settings import Setting, baseline, expand_settings


def test_settings_cross_modes_and_masks_padding_once():
    got = [s.name for s in expand_settings(["padding", "greedy:chunk=1000", "bfd"], [True, False])]
    assert got == ["padding", "greedy:chunk=1000", "greedy:chunk=1000/nomask", "bfd", "bfd/nomask"]
    assert Setting.parse("random:chunk=7/nomask") == Setting("random:chunk=7", False)
    assert [s.name for s in expand_settings(["bfd", "bfd/nomask", "padding/nomask"], [True])] == [
        "bfd", "bfd/nomask", "padding"]
    assert baseline(expand_settings(["bfd", "padding:pad_to=longest"])).name == "padding:pad_to=longest"
    for bad in ("tetris", "bfd/maybe", "greedy:chunk=x"):
        with pytest.raises(ValueError):
            Setting.parse(bad)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from megatron_pack.config.cli import parse_args
    from megatron_pack.experiment.compare import run_comparison
    from megatron_pack.experiment.presets import sample_train_flags
    from megatron_pack.experiment.sample_data import prepare_sample_data

    out = str(tmp_path_factory.mktemp("compare"))
    prefix, tok = prepare_sample_data(os.path.join(out, "data"))
    base = parse_args(sample_train_flags(prefix, tok) + ["--train-iters", "3", "--log-interval", "100"])
    settings = expand_settings(["padding", "padding:pad_to=longest", "bfd"], [True])
    return out, run_comparison(base, settings, out, evals_per_run=3, log=lambda *a: None)


def test_same_data_same_weights_same_loss(comparison):
    """padding and padding:pad_to=longest train on the same sequences from the same initial weights:
    the losses agree to float noise (the rows are only shorter). bfd (other data) differs: the control."""
    _, res = comparison
    pad, longest, bfd = res["rows"]
    assert pad["valid_loss"] == pytest.approx(longest["valid_loss"], rel=1e-5)
    assert pad["final_train_loss"] == pytest.approx(longest["final_train_loss"], rel=1e-5)
    assert abs(bfd["final_train_loss"] - pad["final_train_loss"]) > 1e-3
    assert longest["padding_fraction"] < pad["padding_fraction"]
    assert pad["time_speedup"] == 1.0 and bfd["ideal_speedup"] > 1.5


def test_outputs_and_curves(comparison):
    out, res = comparison
    data = json.load(open(os.path.join(out, "results.json")))
    assert [r["setting"] for r in data["rows"]] == ["padding", "padding:pad_to=longest", "bfd"]
    for r in data["rows"]:
        assert [p["iteration"] for p in r["curve"]] == [1, 2, 3]
        secs = [p["train_seconds"] for p in r["curve"]]
        assert secs == sorted(secs) and r["curve"][-1]["valid_loss"] == pytest.approx(r["valid_loss"])
    assert "speedup" in open(os.path.join(out, "time.md")).read()
    assert "held-out loss" in open(os.path.join(out, "loss.md")).read()
    assert os.path.getsize(os.path.join(out, "loss_vs_time.png")) > 0


def test_cli_rejects_bad_input_before_training(capsys, monkeypatch, tmp_path):
    from megatron_pack.experiment.compare_cli import main

    with pytest.raises(SystemExit) as e:
        main(["--modes", "tetris", "--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "compare_modes.py: error: --modes" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:  # no racing sample preparation under torchrun
        main(["--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "--data-path" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing half-written


def test_setting_config_keeps_a_checkpoint_only_when_asked(tmp_path):
    """The real-model study scores each trained setting, so it asks for the final checkpoint;
    the comparison itself saves none, whatever the base flags say."""
    from megatron_pack.config.cli import parse_args
    from megatron_pack.experiment.compare import setting_config
    from megatron_pack.experiment.presets import sample_train_flags
    from megatron_pack.experiment.sample_data import prepare_sample_data

    prefix, tok = prepare_sample_data(str(tmp_path / "data"))
    base = parse_args(sample_train_flags(prefix, tok) + ["--train-iters", "2", "--save", str(tmp_path / "base_save"),
                                                         "--save-interval", "1"])
    plain = setting_config(base, Setting("bfd", False), str(tmp_path / "log.jsonl"), None)
    assert plain.checkpoint.save is None and plain.checkpoint.save_interval is None
    assert plain.data.packing.pack_mode == "bfd" and plain.data.packing.document_mask is False
    kept = setting_config(base, Setting("greedy"), str(tmp_path / "log.jsonl"), 5, save=str(tmp_path / "ck"))
    assert kept.checkpoint.save == str(tmp_path / "ck") and kept.checkpoint.save_interval is None
    assert kept.checkpoint.load is None and kept.train.eval_interval == 5
