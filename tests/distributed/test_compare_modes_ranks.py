"""``tools/compare_modes.py`` on 2 ranks (gloo) as torchrun starts it, DP 2 and TP 2: it runs,
and writes the tables one process writes (same settings, sequences and steps; the same losses
to float noise; rank 0 alone writes)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _launch_train import REPO, make_dataset
from launcher import free_port, rank_env

TOOL = str(REPO / "tools" / "compare_modes.py")
FLAGS = ["--model", "tiny", "--vocab-size", "256", "--seq-length", "256", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-fraction", "0.2", "--valid-fraction", "0.1",
         "--train-iters", "3", "--log-interval", "1"]


def compare(nprocs: int, out: Path, prefix: str, extra=(), timeout: float = 240.0) -> list:
    """Run the tool on ``nprocs`` ranks (torchrun's environment, no agent, like the other tests
    here); returns each rank's (exit code, output)."""
    argv = [sys.executable, TOOL, "--modes", "padding", "bfd", "--evals-per-run", "1", "--output-dir", str(out),
            "--", "--data-path", prefix, *FLAGS, *extra]
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = rank_env(rank, nprocs, port, PYTHONPATH=str(REPO))
        if nprocs == 1:  # one plain process, no torchrun variables
            for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(var)
        procs.append(subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(1.0)
            break
        time.sleep(0.2)
    res = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        res.append((p.wait(), p.stdout.read()))
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare_ranks")
    prefix = make_dataset(str(tmp / "sft"), n=60)
    ((rc, text),) = compare(1, tmp / "one", prefix)
    assert rc == 0, text[-3000:]
    return tmp, prefix, json.load(open(tmp / "one" / "results.json"))


def _tables(results: dict) -> tuple:
    """What the tables hold that does not depend on timing: per setting, exact and loss columns."""
    exact = [(r["setting"], r["sequences"], r["steps"], r["real_tokens_seen"], r["supervised_tokens_seen"],
              r["mode_dropped_samples"]) for r in results["rows"]]
    losses = [(r["valid_loss"], r["final_train_loss"]) for r in results["rows"]]
    return exact, losses


@pytest.mark.parametrize("layout,extra", [("dp2", []), ("tp2", ["--tensor-model-parallel-size", "2"])])
def test_two_ranks_write_the_tables_one_process_writes(single, layout, extra):
    tmp, prefix, one = single
    out = tmp / layout
    res = compare(2, out, prefix, extra)
    assert [rc for rc, _ in res] == [0, 0], "\n".join(t[-3000:] for _, t in res)
    many = json.load(open(out / "results.json"))
    exact1, loss1 = _tables(one)
    exact2, loss2 = _tables(many)
    assert exact2 == exact1 and [s for s, *_ in exact1] == ["padding", "bfd"]
    for (v1, t1), (v2, t2) in zip(loss1, loss2):
        assert v2 == pytest.approx(v1, rel=1e-4) and t2 == pytest.approx(t1, rel=1e-4)
    # the same table files, from rank 0 only (rank 1 prints no tables)
    for name in ("time.md", "loss.md"):
        assert open(out / name).read().splitlines()[0] == open(tmp / "one" / name).read().splitlines()[0]
    assert [ln.split("|")[1].strip() for ln in open(out / "loss.md").read().splitlines()[2:]] == ["padding", "bfd"]
    assert "Held-out loss" in res[0][1] and "Held-out loss" not in res[1][1]
    assert ("DP 2" if layout == "dp2" else "TP 2 PP 1 CP 1 DP 1") in res[0][1] + res[1][1]
    # negative control: at this tolerance another setting's loss does not pass as the same
    assert many["rows"][0]["valid_loss"] != pytest.approx(one["rows"][1]["valid_loss"], rel=1e-4)
