"""The front doors on an empty dataset (every record rejected) and on one with nothing supervised:
one line naming the prefix, exit 2, no traceback (Megatron's or ours), for `train` and every
tool that opens an SFT dataset."""

import os
import subprocess
import sys

import pytest

from megatron_pack.files.indexed import SFTDatasetWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONWARNINGS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _write(prefix, docs):
    with SFTDatasetWriter(prefix) as w:
        for tokens, mask in docs:
            w.add(tokens, mask, [0])
    return prefix


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty_cli")
    return {"empty": _write(str(d / "empty"), []),
            "nosup": _write(str(d / "nosup"), [(list(range(1, 31)), [0] * 30)] * 8),
            "ok": _write(str(d / "ok"), [(list(range(1, 31)), [0] + [1] * 29)] * 8),
            "dir": str(d)}


TRAIN = ["-m", "megatron_pack.train", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "2",
         "--train-iters", "1", "--vocab-size", "64"]


def _one_line(res, prefix, text):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and prefix in lines[0] and text in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout


def test_train_on_an_empty_dataset(datasets):
    p = datasets["empty"]
    _one_line(_run(TRAIN + ["--data-path", p]), p, "empty SFT dataset (0 conversations")
    # in a blend, and as the held-out set
    _one_line(_run(TRAIN + ["--data-path", "0.5", datasets["ok"], "0.5", p]), p, "empty SFT dataset")
    _one_line(_run(TRAIN + ["--train-data-path", datasets["ok"], "--valid-data-path", p]), p, "empty SFT dataset")


def test_train_on_nothing_supervised(datasets, tmp_path):
    p = datasets["nosup"]
    _one_line(_run(TRAIN + ["--data-path", p, "--data-cache-path", str(tmp_path)]), p,
              "nothing to train or score on: 7 of its 8 conversations, 0 packed sequences")


def test_train_on_a_supervised_dataset_runs(datasets, tmp_path):
    """Negative control: the same command on a dataset with supervised tokens trains its step."""
    res = _run(TRAIN + ["--data-path", datasets["ok"], "--data-cache-path", str(tmp_path), "--valid-fraction", "0"])
    assert res.returncode == 0, res.stderr[-3000:]


def test_tools_refuse_an_empty_dataset(datasets, tmp_path):
    p = datasets["empty"]
    res = _run(["tools/pack_report.py", "--data-prefix", p, "--max-seq-length", "16"])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and "empty SFT dataset" in lines[0] and p in lines[0]
    _one_line(_run(["tools/compare_modes.py", "--modes", "bfd", "--output-dir", str(tmp_path / "cmp"), "--",
                    "--data-path", p, "--seq-length", "16", "--vocab-size", "64"]), p, "empty SFT dataset")
    _one_line(_run(["tools/compare_modes.py", "--modes", "bfd", "--output-dir", str(tmp_path / "cmp"), "--",
                    "--data-path", datasets["nosup"], "--seq-length", "16", "--vocab-size", "64",
                    "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1",
                    "--data-cache-path", str(tmp_path)]),
              datasets["nosup"], "nothing to train or score on")
    _one_line(
        _run(["tools/analyze_leakage.py", "--model", datasets["dir"], "--data-prefix", p]), p, "empty SFT dataset"
    )
    _one_line(
        _run(["tools/plan_parallel.py", "--data-path", p, "--nnodes", "1", "--gpus-per-node", "1", "--model", "tiny"]),
        p,
        "empty SFT dataset",
    )
