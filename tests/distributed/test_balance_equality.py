"""Balanced placement changes no math: DP2 balanced == unbalanced (loss, gradients, weights),
and a balanced run resumed mid-epoch == the uninterrupted one (2 gloo ranks, fp32)."""

import numpy as np
import pytest
from _launch_train import BASE_ARGS, describe_failure, run_train, shared_dataset, stop_and_resume

pytestmark = pytest.mark.distributed

TOL = 1e-6
# SGD so the weights after 3 steps are w0 - lr * (sum of the 3 gradients): equal weights
# mean equal gradients (Adam's first step would hide their size).
ARGS = ["--train-iters", "3", "--optimizer", "sgd", "--lr", "0.5", "--lr-decay-style", "constant",
        "--lr-warmup-iters", "0", "--clip-grad", "0"]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _weights(ckpt_dir):
    from megatron_pack.checkpoint.dist_reader import DistCheckpointReader

    r = DistCheckpointReader(str(ckpt_dir / "iter_0000003"))
    return {k: r.tensor(k).double().numpy() for k in sorted(r.meta)}


def test_balanced_equals_unbalanced_dp2(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("balance_eq")
    base = [a for a in BASE_ARGS if a not in ("--lr-warmup-fraction", "0.2", "--lr", "3e-3")]
    args = base + ["--data-path", prefix] + ARGS
    on = run_train(2, args + ["--balance-batches", "--save", str(tmp / "on")], tmp, name="on")
    assert on.returncodes == [0, 0], describe_failure(on)
    off = run_train(2, args + ["--no-balance-batches", "--save", str(tmp / "off")], tmp, name="off")
    assert off.returncodes == [0, 0], describe_failure(off)
    assert "batch balancing on" in on.output and "batch balancing off" in off.output
    assert "compute imbalance:" in on.output
    # the placement really changed: balanced steps are more even than the contiguous ones
    imb_on = [on.steps[i]["compute imbalance"] for i in (1, 2, 3)]
    imb_off = [off.steps[i]["compute imbalance"] for i in (1, 2, 3)]
    assert all(a <= b + 1e-12 for a, b in zip(imb_on, imb_off)) and imb_on != imb_off, (imb_on, imb_off)
    for i in (1, 2, 3):
        a, b = on.steps[i], off.steps[i]
        assert a["tokens"] == b["tokens"]  # same supervised tokens in the step
        assert _rel(a["lm loss"], b["lm loss"]) <= TOL, (i, a["lm loss"], b["lm loss"])
        assert _rel(a["grad norm"], b["grad norm"]) <= TOL, (i, a["grad norm"], b["grad norm"])
    # evaluation is placed by the same balancer: the held-out loss is the same number
    v_on, v_off = on.records[-1]["validation lm loss"], off.records[-1]["validation lm loss"]
    assert on.records[-1]["validation tokens"] == off.records[-1]["validation tokens"] > 0
    assert _rel(v_on, v_off) <= TOL, (v_on, v_off)
    w_on, w_off = _weights(tmp / "on"), _weights(tmp / "off")
    assert w_on.keys() == w_off.keys() and len(w_on) > 5
    moved = 0.0
    for k in w_on:
        scale = max(np.abs(w_off[k]).max(), 1e-30)
        assert np.abs(w_on[k] - w_off[k]).max() <= TOL * scale, k
        moved = max(moved, np.abs(w_off[k]).max())
    assert moved > 0


def test_balanced_resume_mid_epoch_equals_uninterrupted(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("balance_resume")
    args = BASE_ARGS + ["--data-path", prefix, "--train-iters", "12", "--balance-batches"]
    full, first, second = stop_and_resume(2, args, tmp)
    assert "at iteration 3 (epoch 0" in second.output  # mid-epoch (8 steps per epoch)
    for run, its in ((first, (1, 2, 3)), (second, (4, 5, 6))):
        for i in its:
            a, b = full.steps[i], run.steps[i]
            assert b["lm loss"] == a["lm loss"] and b["grad norm"] == a["grad norm"], i
            assert b["compute imbalance"] == a["compute imbalance"], i
