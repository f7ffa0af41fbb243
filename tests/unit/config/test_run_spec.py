"""The run spec is the one definition: the training and the planner command lines are generated
from its fields, and training, the planner and the experiment build the same datasets from it."""

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_pack.config.cli import build_parser, parse_args, spec_fields
from megatron_pack.config.spec import RunSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import plan_parallel  # noqa: E402

from megatron_pack.planning.cluster_plan import ACCEPTED, MODELLED, PLANNER_DEFAULTS  # noqa: E402

KEYS = ("help", "type", "choices", "nargs", "metavar", "required")


def _actions(parser) -> dict:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def _differences(train_parser, planner_parser) -> list:
    """Modelled flags whose help/type/choices/default differ between the two command lines."""
    train, plan = _actions(train_parser), _actions(planner_parser)
    out = []
    for name in MODELLED + ACCEPTED:
        flag = "--" + name.replace("_", "-")
        a, b = train[flag], plan[flag]
        out += [(flag, k) for k in KEYS if getattr(a, k) != getattr(b, k)]
        if name not in PLANNER_DEFAULTS and a.default != b.default:
            out.append((flag, "default"))
    return out


def test_train_and_planner_flags_come_from_one_definition(monkeypatch):
    assert _differences(build_parser(), plan_parallel.build_parser()) == []
    # every modelled flag is the spec field's, not a copy: change the field, both command lines change
    f = spec_fields(RunSpec)["seq_length"][1]
    monkeypatch.setattr(f, "metadata", types.MappingProxyType({**f.metadata, "help": "CHANGED in the spec."}))
    monkeypatch.setattr(f, "default", 1234)
    train, plan = _actions(build_parser())["--seq-length"], _actions(plan_parallel.build_parser())["--seq-length"]
    assert train.help == plan.help == "CHANGED in the spec." and train.default == plan.default == 1234


def test_flag_comparison_negative_control():
    """A planner flag declared by hand with its own help is reported."""
    planner = plan_parallel.build_parser()
    action = _actions(planner)["--micro-batch-size"]
    action.help = "declared by hand"
    assert _differences(build_parser(), planner) == [("--micro-batch-size", "help")]


def test_planner_aliases_still_work(tmp_path):
    ns, unknown = plan_parallel.build_parser().parse_known_args(
        ["--data-prefix", "x", "--nproc-per-node", "4", "--recompute-activations", "--lr", "1e-5"])
    cfg = plan_parallel.plan_config(ns, unknown)
    assert cfg.spec.data.data_path == "x" and cfg.cluster.gpus_per_node == 4
    assert cfg.spec.model.recompute_granularity == "selective" and cfg.unmodelled_flags == ["--lr", "1e-5"]


def _write(prefix, lengths, seed):
    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    with SFTDatasetWriter(str(prefix)) as w:
        for n in lengths:
            toks = rng.integers(1, 250, n).tolist()
            w.add(toks, [0] * (n // 3) + [1] * (n - n // 3), [0])


def test_planner_experiment_and_training_plan_the_same_blend_with_cp_padding(tmp_path):
    """One builder: a blend under CP 2 (every document padded to a multiple of 4) gives the same
    sequences in training, the planner and the experiment's forecast; CP 1 (no document padding) differs."""
    from megatron_pack.config.datasets import build_datasets
    from megatron_pack.experiment.compare import planned_run
    from megatron_pack.experiment.settings import Setting
    from megatron_pack.planning.cluster_plan import make_plan, plan_config

    rng = np.random.default_rng(0)
    _write(tmp_path / "a", rng.integers(5, 120, 70).tolist(), 1)
    _write(tmp_path / "b", rng.integers(5, 60, 40).tolist(), 2)
    data = ["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")]

    def figures(cp):
        cfg = parse_args(["--data-path", *data, "--model", "tiny", "--vocab-size", "256", "--seq-length", "128",
                          "--context-parallel-size", str(cp), "--pack-mode", "bfd", "--train-iters", "1",
                          "--global-batch-size", "2", "--data-cache-path", str(tmp_path / f"cache{cp}")])
        train = build_datasets(cfg).train  # what training.loop.Trainer builds
        plan = make_plan(plan_config(model="tiny", vocab_size=256, nnodes=1, gpus_per_node=2, seq_length=128,
                                     context_parallel_size=cp, global_batch_size=2, data_path=data,
                                     modes=("bfd",))).to_json()
        (row,) = plan["modes"]
        planned = planned_run(cfg, Setting("bfd", True))
        return train, row, planned

    train, row, planned = figures(2)
    assert train.document_multiple == 4
    assert row["num_sequences"] == planned["sequences"] == len(train)
    assert row["efficiency"] == planned["efficiency"] == pytest.approx(float(train.plan.efficiency))
    assert row["real_tokens"] == int(train.plan.sequence_lengths().sum())
    train1, row1, planned1 = figures(1)  # negative control: no document padding packs differently
    assert (len(train1), float(train1.plan.efficiency)) != (len(train), float(train.plan.efficiency))
    assert row1["efficiency"] != row["efficiency"]


def test_spec_sections_hold_parsed_values():
    cfg = parse_args(["--data-path", "0.7", "A", "0.3", "B", "--pack-mode", "windowed_bfd:window=64",
                      "--train-iters", "1"])
    assert cfg.data.packing.mode.name == "windowed_bfd" and cfg.data.packing.mode.window == 64
    assert cfg.data.train_blend.prefixes == ("A", "B") and cfg.data.train_blend.weights == pytest.approx((0.7, 0.3))
    assert cfg.data.packing.pack_mode == "windowed_bfd:window=64"  # the flag value as recorded
    assert "_mode" not in dataclasses.asdict(cfg.data.packing)  # the record holds flag values only


def test_training_and_planner_refuse_tp_not_dividing_heads_with_one_line(tmp_path):
    """TP 3 on tiny (4 heads): training refuses at its front door, before Megatron-Core (exit 2,
    in well under the time a torch import takes), with the planner's line. On main training
    passed the check without the architecture and went on to start 3 ranks' process group."""
    import os
    import subprocess

    _write(tmp_path / "d", [20] * 12, 0)
    repo = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29591")
    train = subprocess.run([sys.executable, "-m", "megatron_pack.train", "--model", "tiny", "--vocab-size", "256",
                            "--tensor-model-parallel-size", "3", "--data-path", str(tmp_path / "d"),
                            "--train-iters", "1", "--global-batch-size", "3"],
                           capture_output=True, text=True, cwd=repo, env=env, timeout=60)
    plan = subprocess.run([sys.executable, "tools/plan_parallel.py", "--model", "tiny", "--vocab-size", "256",
                           "--nnodes", "1", "--gpus-per-node", "3", "--tensor-model-parallel-size", "3",
                           "--global-batch-size", "3"], capture_output=True, text=True, cwd=repo, timeout=60)
    assert train.returncode == plan.returncode == 2, (train.stderr, plan.stderr)
    why = "--tensor-model-parallel-size: TP 3 does not divide the 4 attention heads of tiny"
    t_line, p_line = train.stderr.strip().splitlines(), plan.stderr.strip().splitlines()
    assert len(t_line) == len(p_line) == 1
    assert t_line[0].split("error: ", 1)[1] == p_line[0].split("error: illegal layout: ", 1)[1]
    assert why in t_line[0]
    # negative control: a TP that divides the heads passes the same check
    ok = subprocess.run([sys.executable, "tools/plan_parallel.py", "--model", "tiny", "--vocab-size", "256",
                         "--nnodes", "1", "--gpus-per-node", "2", "--tensor-model-parallel-size", "2",
                         "--global-batch-size", "2", "--no-progress"], capture_output=True, text=True, cwd=repo,
                        timeout=120)
    assert ok.returncode in (0, 1), ok.stderr
