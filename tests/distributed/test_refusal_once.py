"""Under torchrun every rank checks the same command line and files: a refusal is printed once
(rank 0) and every rank exits with its status -- before the process group exists (a misspelt
flag, a missing dataset), after it (a dataset refused on open inside ``train``), and through
torchrun itself."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _launch_train import BASE_ARGS, REPO, make_dataset
from launcher import free_port, rank_env

pytestmark = pytest.mark.distributed

PROG = "python -m megatron_pack.train: error: "


def _ranks(nprocs: int, args: list, timeout: float = 120.0) -> tuple[list, str]:
    """Every rank run to its end (no rank killed early); (exit codes, all output)."""
    port = free_port()
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_pack.train", *args], cwd=str(REPO),
                              env=rank_env(r, nprocs, port, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(nprocs)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def _refusals(text: str) -> list:
    return [line for line in text.splitlines() if PROG in line]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("once") / "sft"), n=24)


def test_a_refusal_before_the_process_group_is_printed_once(prefix, tmp_path):
    codes, out = _ranks(2, BASE_ARGS + ["--data-path", prefix, "--seq-lenght", "8"])
    assert codes == [2, 2] and len(_refusals(out)) == 1, out
    assert "did you mean --seq-length?" in _refusals(out)[0]
    codes, out = _ranks(2, BASE_ARGS + ["--data-path", str(tmp_path / "absent"), "--train-iters", "1"])
    assert codes == [2, 2] and len(_refusals(out)) == 1, out
    assert "no SFT dataset at this prefix" in _refusals(out)[0]


def test_a_refusal_inside_training_is_printed_once(prefix, tmp_path):
    """The dataset passes the front door's file check and is refused when ``train`` opens it, on
    both ranks (its summary counts other supervised tokens than its loss mask holds)."""
    bad = str(tmp_path / "sft")
    for suffix in ("", "_loss_mask", "_turns"):
        for ext in (".bin", ".idx"):
            shutil.copyfile(prefix + suffix + ext, bad + suffix + ext)
    with open(bad + "_summary.json", "w") as f:
        json.dump({"supervised_tokens": 1}, f)
    codes, out = _ranks(2, BASE_ARGS + ["--data-path", bad, "--train-iters", "1"])
    assert codes == [2, 2], out
    lines = _refusals(out)
    assert len(lines) == 1 and "the loss mask comes from another preprocessing run" in lines[0], out


def test_torchrun_prints_the_refusal_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_pack.train", *BASE_ARGS, "--data-path", str(tmp_path / "absent"), "--train-iters", "1"]
    res = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    lines = _refusals(out)
    assert len(lines) == 1 and "no SFT dataset at this prefix" in lines[0], out
