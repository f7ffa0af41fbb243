"""#31.10: rank 0 scores alone (a slowed step, 3x the training group's timeout) while rank 1
waits; with :class:`RankZeroWork` both ranks then run the next collective, with the old wait
(straight into the collective) rank 1 fails on the timeout: the negative control."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher import free_port, rank_env

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_rank_zero_worker.py")
REPO = Path(__file__).resolve().parents[2]


def run(wait: str, out: Path, timeout_s: float = 2.0, score_s: float = 6.0) -> list:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, str(WORKER), "--wait", wait, "--timeout-s", str(timeout_s), "--score-s", str(score_s),
            "--out", str(out)]
    procs = [subprocess.Popen(argv, env=rank_env(r, 2, port, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    deadline = time.monotonic() + 120
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    logs = [p.stdout.read() for p in procs]
    return [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists()
            else {"status": "no result", "log": logs[r][-2000:]} for r in range(2)]


def test_safe_wait_outlasts_the_process_group_timeout(tmp_path):
    res = run("safe", tmp_path / "safe")
    assert [r["status"] for r in res] == ["ok", "ok"], res
    assert [r["sum"] for r in res] == [2.0, 2.0]
    assert res[0]["result"] == "scored" and res[1]["result"] is None


def test_old_wait_times_out(tmp_path):
    res = run("old", tmp_path / "old")
    assert res[1]["status"].startswith("failed") and "timed out" in res[1]["status"].lower(), res
