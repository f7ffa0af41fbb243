"""--pack-scope step == the padded run: every step takes the padded step's conversations, packs
them into fewer rows, and (document mask, loss over the whole step) computes the same loss and
gradients, at TP1/TP2/PP2/DP2/CP2, over 3 SGD steps (fp32, gloo). Negative control: without the
document mask the per-step packed run differs. --loss-weighting sample packed per step == the
padded per-sample mean (token weighting differs). Resumed mid-epoch == uninterrupted."""

import numpy as np
import pytest
from _launch_train import BASE_ARGS, describe_failure, run_train, shared_dataset, stop_and_resume

pytestmark = pytest.mark.distributed

TOL = 1e-5
# SGD at a constant rate: the weights after 3 steps are w0 - lr * (sum of the gradients),
# so equal weights mean equal gradients.
SGD = ["--train-iters", "3", "--optimizer", "sgd", "--lr", "0.5", "--lr-decay-style", "constant",
       "--lr-warmup-iters", "0", "--clip-grad", "0"]
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"]), "dp2": (2, []),
           "cp2": (2, ["--context-parallel-size", "2"])}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _weights(ckpt_dir):
    from megatron_pack.checkpoint.dist_reader import DistCheckpointReader

    r = DistCheckpointReader(str(ckpt_dir / "iter_0000003"))
    return {k: r.tensor(k).double().numpy() for k in sorted(r.meta)}


PLAN = {"padded": (1, ["--pack-mode", "padding"]),
        # PP builds each stage's layers from its own seed: PP2 compares with a padded PP2 run
        "padded_pp2": (2, ["--pack-mode", "padding", "--pipeline-model-parallel-size", "2"]),
        "padded_sample": (1, ["--pack-mode", "padding", "--loss-weighting", "sample"]),
        "no_mask": (1, ["--pack-scope", "step", "--no-document-mask"]),
        "sample_dp2": (2, ["--pack-scope", "step", "--loss-weighting", "sample"]),
        **{name: (n, ["--pack-scope", "step", *extra]) for name, (n, extra) in LAYOUTS.items()}}


class Runs:
    """Each launch of this file once, on first use (a test selected alone launches only what it reads)."""

    def __init__(self, tmp_path_factory):
        self.prefix = shared_dataset(tmp_path_factory)
        self.tmp = tmp_path_factory.mktemp("step_scope")
        base = [a for a in BASE_ARGS if a not in ("--lr-warmup-fraction", "0.2", "--lr", "3e-3")]
        self.args = base + ["--data-path", self.prefix] + SGD
        self.done = {}

    def __getitem__(self, name):
        if name not in self.done:
            nprocs, extra = PLAN[name]
            res = run_train(nprocs, self.args + extra + ["--save", str(self.tmp / name)], self.tmp, name=name)
            assert res.returncodes == [0] * nprocs, describe_failure(res)
            res.save_dir = self.tmp / name
            self.done[name] = res
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_scope_equals_padding(runs, layout):
    pad, step = runs["padded_pp2" if layout == "pp2" else "padded"], runs[layout]
    assert "pack scope step" in step.output
    for i in (1, 2, 3):
        a, b = step.steps[i], pad.steps[i]
        assert a["tokens"] == b["tokens"] and a["consumed samples"] == b["consumed samples"]
        assert a["rows"] < 8  # fewer rows than the padded step's 8
        assert _rel(a["lm loss"], b["lm loss"]) <= TOL, (layout, i, a["lm loss"], b["lm loss"])
        assert _rel(a["grad norm"], b["grad norm"]) <= TOL, (layout, i, a["grad norm"], b["grad norm"])
    assert step.steps[1]["lm loss"] != step.steps[2]["lm loss"]
    w_step, w_pad = _weights(step.save_dir), _weights(pad.save_dir)
    assert w_step.keys() == w_pad.keys() and len(w_pad) > 5
    for k in w_pad:
        assert np.abs(w_step[k] - w_pad[k]).max() <= TOL * max(np.abs(w_pad[k]).max(), 1e-30), (layout, k)


def test_without_the_document_mask_it_differs(runs):
    pad, bad = runs["padded"], runs["no_mask"]
    assert all(bad.steps[i]["rows"] == runs["tp1"].steps[i]["rows"] for i in (1, 2, 3))  # same rows
    # the tiny model starts near uniform attention: the leak shows in the gradients first
    diff = max(max(_rel(bad.steps[i]["lm loss"], pad.steps[i]["lm loss"]),
                   _rel(bad.steps[i]["grad norm"], pad.steps[i]["grad norm"])) for i in (1, 2, 3))
    assert diff > 100 * TOL, diff
    w_bad, w_pad = _weights(bad.save_dir), _weights(pad.save_dir)
    assert max(np.abs(w_bad[k] - w_pad[k]).max() / max(np.abs(w_pad[k]).max(), 1e-30) for k in w_pad) > 100 * TOL


def test_sample_weighting_packed_per_step_equals_padded_per_sample_mean(runs):
    pad, step, token = runs["padded_sample"], runs["sample_dp2"], runs["padded"]
    for i in (1, 2, 3):
        a, b = step.steps[i], pad.steps[i]
        assert a["tokens"] == b["tokens"] <= 8  # conversations counted, not tokens
        assert _rel(a["lm loss"], b["lm loss"]) <= TOL, (i, a["lm loss"], b["lm loss"])
        assert _rel(a["grad norm"], b["grad norm"]) <= TOL, (i, a["grad norm"], b["grad norm"])
    # negative control: token weighting is another objective when the conversations' lengths differ
    # (the tiny model starts near a uniform loss per token, so the gap starts small)
    diff = max(max(_rel(token.steps[i]["lm loss"], pad.steps[i]["lm loss"]),
                   _rel(token.steps[i]["grad norm"], pad.steps[i]["grad norm"])) for i in (1, 2, 3))
    assert diff > 20 * TOL, diff


def test_step_scope_resume_mid_epoch_equals_uninterrupted(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("step_scope_resume")
    args = BASE_ARGS + ["--data-path", prefix, "--train-iters", "12", "--pack-scope", "step"]
    full, first, second = stop_and_resume(2, args, tmp)
    assert "at iteration 3 (epoch 0" in second.output
    for run, its in ((first, (1, 2, 3)), (second, (4, 5, 6))):
        for i in its:
            a, b = full.steps[i], run.steps[i]
            assert b["lm loss"] == a["lm loss"] and b["grad norm"] == a["grad norm"], i
            assert b["rows"] == a["rows"] and b["consumed samples"] == a["consumed samples"], i
    assert any(second.steps[i]["lm loss"] != full.steps[i - 1]["lm loss"] for i in (5, 6))  # negative control
