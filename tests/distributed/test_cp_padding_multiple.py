"""Context parallelism a user can check on their own data: ``--document-padding-multiple 4`` makes
a CP 1 run pack and pad every document exactly as a CP 2 run does, so the two log the same
losses to fp32 noise (2 gloo ranks, tiny model, fp32, the real CLI). Negative control: CP 1
without the flag packs the unpadded lengths and differs by far more than that noise."""

import pytest
from _launch_train import BASE_ARGS, describe_failure, run_train, shared_dataset

pytestmark = pytest.mark.distributed

TOL = 1e-5  # relative; measured differences are ~1e-7 (the CP all-gather changes summation order)
ARGS = ["--train-iters", "3", "--eval-interval", "3", "--eval-iters", "2"]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def test_cp1_with_the_cp2_padding_logs_the_cp2_losses(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("cp_padding")
    args = BASE_ARGS + ["--data-path", prefix] + ARGS
    cp2 = run_train(2, args + ["--context-parallel-size", "2"], tmp, name="cp2")
    assert cp2.returncodes == [0, 0], describe_failure(cp2)
    cp1 = run_train(1, args + ["--document-padding-multiple", "4"], tmp, name="cp1_pad4")
    assert cp1.returncodes == [0], describe_failure(cp1)
    plain = run_train(1, args, tmp, name="cp1")
    assert plain.returncodes == [0], describe_failure(plain)
    assert "CP 2 DP 1" in cp2.output and "CP 1 DP 1" in cp1.output
    assert sorted(cp2.steps) == sorted(cp1.steps) == [1, 2, 3]
    for i in (1, 2, 3):
        a, b = cp1.steps[i], cp2.steps[i]
        assert a["tokens"] == b["tokens"], i  # the same supervised tokens: the same plan
        assert _rel(a["lm loss"], b["lm loss"]) <= TOL, (i, a["lm loss"], b["lm loss"])
        assert _rel(a["grad norm"], b["grad norm"]) <= TOL, (i, a["grad norm"], b["grad norm"])
    v1 = [r["validation lm loss"] for r in cp1.records if "validation lm loss" in r]
    v2 = [r["validation lm loss"] for r in cp2.records if "validation lm loss" in r]
    assert len(v1) == len(v2) >= 1 and all(_rel(x, y) <= TOL for x, y in zip(v1, v2)), (v1, v2)
    # negative control: the default CP 1 run packs other sequences, so its losses differ
    diffs = [_rel(plain.steps[i]["lm loss"], cp2.steps[i]["lm loss"]) for i in (1, 2, 3)]
    assert max(diffs) > 100 * TOL, diffs


def test_flag_is_checked_against_cp_and_seq_length(tmp_path_factory):
    """Bad values answer on one line before any rank starts Megatron: not a multiple of what
    CP 2 needs (4), a --seq-length it does not divide, < 1."""
    import subprocess
    import sys

    from _launch_train import REPO

    for extra, text in ((["--context-parallel-size", "2", "--document-padding-multiple", "6"], "multiple of 4"),
                        (["--document-padding-multiple", "5"], "--seq-length: 256 must be a multiple of"),
                        (["--document-padding-multiple", "0"], "must be >= 1")):
        res = subprocess.run([sys.executable, "-m", "megatron_pack.train", "--data-path", "x", "--train-iters", "1",
                              "--seq-length", "256", *extra], cwd=str(REPO), capture_output=True, text=True,
                             timeout=120)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, (extra, res.stderr)
        assert text in lines[0], (extra, lines)
