"""The planner and pack_report know --pack-scope step: its rows, steps and rows per step."""

import os
import subprocess
import sys

import pytest

from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.packing.report import report
from megatron_pack.planning.cluster_plan import make_plan, plan_config
from megatron_pack.planning.render import render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _write(prefix, lengths):
    with SFTDatasetWriter(str(prefix)) as w:
        for n in lengths:
            w.add(list(range(1, n + 1)), [0] + [1] * (n - 1), [0])
    return str(prefix)


def test_planner_costs_the_padded_steps_packed(tmp_path):
    # capacity 8, steps of 2 conversations in the padded order; each step packs into 1 or 2 rows
    prefix = _write(tmp_path / "d", [5, 3, 6, 2, 7, 2, 4, 4])
    cfg = dict(model="tiny", vocab_size=3000, nnodes=1, gpus_per_node=1, seq_length=8, global_batch_size=2,
               data_path=prefix, modes=("padding", "bfd"), valid_fraction=0.0)
    plan = make_plan(plan_config(**cfg, pack_scope="step")).to_json()
    rows = {r["mode"]: r for r in plan["modes"]}
    step, pad = rows["bfd per step"], rows["padding"]
    assert step["selected"] and not pad["selected"] and not rows["bfd"]["selected"]
    assert step["steps"] == pad["steps"] == 4
    rs = step["rows_per_step"]
    assert step["num_sequences"] == pytest.approx(rs["mean"] * 4) and 1 <= rs["min"] <= rs["max"] <= 2
    assert step["attention_sum_sq"] == pad["attention_sum_sq"]  # the same documents
    assert step["epoch_seconds"] < pad["epoch_seconds"] and step["time_vs_padding"] < 1
    dense, attn = 6 * plan["matmul_parameters"] * 8, 6 * 2 * 64 * pad["attention_sum_sq"]
    assert step["time_vs_padding"] == pytest.approx((step["num_sequences"] * dense + attn) / (8 * dense + attn))
    assert "rows per step min" in render(plan)
    epoch = make_plan(plan_config(**cfg)).to_json()["modes"]
    assert "bfd per step" not in {r["mode"] for r in epoch}  # epoch: as before


def test_pack_report_step_row_and_cli(tmp_path):
    lengths = [5, 3, 6, 2, 7, 2, 4, 4, 3]
    rows = report(lengths, 8, ["padding", "bfd"], step_global_batch_size=4)
    step = rows[-1]
    assert step["scope"] == "step" and step["steps"] == 2  # the 9th conversation is the dropped tail
    assert step["num_sequences"] == round(step["rows_per_step"]["mean"] * step["steps"])
    assert step["rows_per_step"]["max"] <= 4 and step["placed_tokens"] < rows[0]["placed_tokens"]
    prefix = _write(tmp_path / "d", lengths)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_report.py"), "--data-prefix", prefix,
                          "--max-seq-length", "8", "--pack-scope", "step", "--global-batch-size", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bfd per step of 4" in out.stdout and "rows/step min" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_report.py"), "--data-prefix", prefix,
                          "--max-seq-length", "8", "--pack-scope", "step"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--global-batch-size" in bad.stderr
