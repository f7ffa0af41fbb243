"""``python -m megatron_pack.train`` on 2 ranks (gloo, DP=2): Megatron-LM log lines, the loss
falls, validation runs, a dist checkpoint is written; bad input stops with a clear message."""

import math
import re
import subprocess
import sys

from _launch_train import BASE_ARGS, REPO, describe_failure, run_train, shared_dataset, shared_run

STEP = re.compile(
    r" \[[\d\- :]+\] iteration\s+(\d+)/\s+12 \| consumed samples:\s+(\d+) \| elapsed time per iteration \(ms\): "
    r"[\d.]+ \| learning rate: ([\d.E+\-]+) \| global batch size:\s+8 \| lm loss: ([\d.E+\-]+) \| loss scale: 1\.0 \| "
    r"grad norm: ([\d.]+) \| real tokens/s: ([\d.]+) \| padding fraction: ([\d.]+) \| conversations/s: ([\d.]+) \| "
    r"number of skipped iterations:\s+0 \| number of nan iterations:\s+0 \|")


def test_train_cli_two_ranks(tmp_path_factory):
    res = shared_run("dp2_full", tmp_path_factory)
    assert res.returncodes == [0, 0], describe_failure(res)
    lines = [m for m in (STEP.match(line) for line in res.outputs[-1].splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == list(range(1, 13))
    assert [int(m.group(2)) for m in lines] == [8 * i for i in range(1, 13)]
    losses = [float(m.group(4)) for m in lines]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # learnable data: the loss falls
    lrs = [float(m.group(3)) for m in lines]
    assert lrs[0] == 0.0 and max(lrs) == 3e-3 and lrs[-1] < lrs[3]  # warmup, then cosine decay
    assert all(0.0 <= float(m.group(7)) < 0.2 for m in lines)  # bfd: little padding
    assert "validation loss at iteration 12 | lm loss value:" in res.outputs[-1]
    assert "DP 2, distributed optimizer True" in res.outputs[-1]
    ck = res.save_dir
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (ck / "iter_0000012" / "metadata.json").is_file()
    assert sorted(p.name for p in (ck / "iter_0000012" / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_bad_flag_value_exits_2_naming_the_flag():
    out = subprocess.run([sys.executable, "-m", "megatron_pack.train", "--data-path", "x", "--train-iters", "3",
                          "--lr-warmup-fraction", "2"], capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 2
    assert "--lr-warmup-fraction: must be in [0, 1], got 2.0" in out.stderr


def test_global_batch_not_divisible_by_dp(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("bad_gbs")
    res = run_train(2, BASE_ARGS + ["--data-path", prefix, "--train-iters", "2", "--global-batch-size", "6",
                                    "--micro-batch-size", "2"], tmp, name="bad")
    assert res.returncodes == [2, 2], describe_failure(res)
    assert "--global-batch-size: 6 is not a multiple of micro-batch-size * data-parallel = 2 * 2" in res.outputs[0]


def test_nan_loss_stops_naming_the_step(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("nan")
    res = run_train(1, BASE_ARGS + ["--data-path", prefix, "--train-iters", "6", "--lr", "1e30",
                                    "--lr-warmup-fraction", "0", "--clip-grad", "0"], tmp, name="nan")
    assert res.returncodes == [1], describe_failure(res)
    m = re.search(r"error: iteration (\d+): lm loss is (nan|inf)", res.outputs[0])
    assert m, describe_failure(res)
    assert int(m.group(1)) >= 2  # step 1 is computed from the initial weights


def test_pretrained_checkpoint_loads_weights_at_another_layout(tmp_path_factory):
    """Weights of the DP=2 run's final checkpoint, loaded into a single-rank run: its first
    loss is the trained model's, far below a fresh initialisation's."""
    full = shared_run("dp2_full", tmp_path_factory)
    assert full.returncodes == [0, 0], describe_failure(full)
    tmp = tmp_path_factory.mktemp("pretrained")
    res = run_train(1, full.args[:-3] + ["--train-iters", "1", "--pretrained-checkpoint", str(full.save_dir)],
                    tmp, name="ft")
    assert res.returncodes == [0], describe_failure(res)
    assert f"initial weights from {full.save_dir}" in res.output
    assert res.steps[1]["lm loss"] < full.steps[1]["lm loss"] - 0.5
