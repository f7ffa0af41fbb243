"""The README's front doors: launch scripts parse, DRY_RUN plans with the script's settings,
and the quickstart's demo runs end to end on a shortened schedule."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["examples/quickstart.sh", "examples/run_tiny_cpu.sh", "examples/run_llama3_8b_packed.sh",
           "examples/run_llama3_70b_packed.sh", "examples/run_llama3_70b_32k_cp.sh", "examples/lib/packed_sft.sh",
           "scripts/install.sh", "scripts/test.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def test_70b_dry_run_plans_the_scripts_layout(tmp_path):
    """DRY_RUN=1 runs the planner with the script's own TP 8 / PP 4 on 4 x 8 A800, no data needed."""
    env = {**os.environ, "DRY_RUN": "1", "PLAN_JSON": str(tmp_path / "plan.json"), "PYTHONWARNINGS": "ignore"}
    env.pop("DATA_PATH", None)
    out = subprocess.run(["bash", "examples/run_llama3_70b_packed.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "FITS" in out.stdout
    plan = json.load(open(tmp_path / "plan.json"))
    assert plan["fits"] is True
    assert abs(plan["total_parameters"] - 70.55e9) / 70.55e9 < 1e-3
    # one entry per distinct (tp, pp) shard of the script's TP 8 x PP 4 layout
    assert len(plan["per_rank_parameters"]) == 32


def test_70b_32k_context_parallel_example_fits(tmp_path):
    """The long-context example: TP 8 x PP 2 x CP 2 at 32k on 4 x 8 A800 plans as fitting."""
    env = {**os.environ, "DRY_RUN": "1", "PLAN_JSON": str(tmp_path / "plan.json"), "PYTHONWARNINGS": "ignore"}
    env.pop("DATA_PATH", None)
    out = subprocess.run(["bash", "examples/run_llama3_70b_32k_cp.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plan = json.load(open(tmp_path / "plan.json"))
    assert (plan["layout"]["tp"], plan["layout"]["pp"], plan["layout"]["cp"], plan["layout"]["dp"]) == (8, 2, 2, 1)
    assert plan["layout"]["seq_length_padded"] == 32768 and plan["fits"] is True
    assert plan["timing"]["cp_kv_exchange"]["cp"] == 2 and "K/V ring" in out.stdout
    assert "--cp-comm-type" not in " ".join(plan["unmodelled_flags"])


def test_dry_run_rejects_illegal_layout():
    env = {**os.environ, "DRY_RUN": "1", "TP": "3", "PYTHONWARNINGS": "ignore"}
    env.pop("DATA_PATH", None)
    out = subprocess.run(["bash", "examples/run_llama3_70b_packed.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]


def test_demo_runs_end_to_end(tmp_path):
    """The quickstart's main job, shortened: preprocess the sample, packing table, train two modes."""
    out = subprocess.run([sys.executable, "-m", "megatron_pack.demo", "--output-dir", str(tmp_path),
                          "--modes", "padding", "bfd", "--epochs", "0.1", "--log-interval", "100"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.load(open(tmp_path / "results.json"))
    assert [r["mode"] for r in rows] == ["padding", "bfd"]
    padding, bfd = rows
    assert bfd["sequences"] < padding["sequences"]  # packing needs fewer sequences for the same data
    for r in rows:
        assert r["steps"] >= 1 and r["valid_loss"] > 0 and r["final_train_loss"] > 0
    assert os.path.getsize(tmp_path / "packing.png") > 0
    assert "lower" in out.stdout.lower()  # the packing table (lower bound column) was printed
