"""--pack-scope step goes through the one dataset builder: training, the planner and the
experiment's forecast get the same per-step rows (the padded run's steps, each packed)."""

import numpy as np
import pytest

from megatron_pack.config.cli import parse_args
from megatron_pack.files.indexed import SFTDatasetWriter


def _write(prefix, lengths):
    rng = np.random.default_rng(0)
    with SFTDatasetWriter(str(prefix)) as w:
        for n in lengths:
            w.add(rng.integers(1, 250, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3), [0])
    return str(prefix)


def test_training_planner_and_experiment_build_the_same_step_rows(tmp_path):
    from megatron_pack.config.datasets import build_datasets
    from megatron_pack.data.step_dataset import StepPackedDataset
    from megatron_pack.experiment.compare import planned_run
    from megatron_pack.experiment.settings import Setting
    from megatron_pack.planning.cluster_plan import make_plan, plan_config

    prefix = _write(tmp_path / "d", np.random.default_rng(1).integers(5, 120, 60).tolist())
    flags = ["--data-path", prefix, "--model", "tiny", "--vocab-size", "256", "--seq-length", "128",
             "--global-batch-size", "4", "--train-epochs", "1", "--data-cache-path", str(tmp_path / "cache")]
    cfg = parse_args(flags + ["--pack-scope", "step"])
    train = build_datasets(cfg).train  # what training.loop.Trainer builds
    assert isinstance(train, StepPackedDataset) and train.global_batch_size == 4
    padded = build_datasets(parse_args(flags + ["--pack-mode", "padding"])).train
    assert train.num_steps == len(padded) // 4  # the padded run's steps
    plan = make_plan(plan_config(model="tiny", vocab_size=256, nnodes=1, gpus_per_node=1, seq_length=128,
                                 global_batch_size=4, data_path=prefix, modes=("padding",),
                                 pack_scope="step")).to_json()
    step = next(r for r in plan["modes"] if r["selected"])
    assert step["mode"] == "bfd per step" and step["num_sequences"] == len(train)
    assert step["steps"] == train.num_steps
    planned = planned_run(parse_args(flags), Setting("bfd", True, "step"))
    assert planned["sequences"] == len(train) and planned["steps"] == train.num_steps
    assert planned["efficiency"] == pytest.approx(float(train.plan.efficiency))
    epoch = planned_run(parse_args(flags), Setting("bfd", True))  # negative control: the epoch's plan
    assert (epoch["sequences"], epoch["steps"]) != (planned["sequences"], planned["steps"])
