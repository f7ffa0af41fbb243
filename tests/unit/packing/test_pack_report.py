"""pack_report: rows against hand-computed values, the table, and the CLI's JSON/PNG/errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.packing.report import format_table, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_rows_by_hand():
    # lengths 5 3 6 2 (16 tokens), max 8: lower bound 2 sequences
    rows = {r["mode"]: r for r in report([5, 3, 6, 2], 8, ["padding", "greedy", "bfd", "random"], seed=0)}
    assert [rows[m]["num_sequences"] for m in ("padding", "greedy", "bfd", "random")] == [4, 3, 2, 2]
    assert rows["padding"]["efficiency"] == 0.5 and rows["bfd"]["efficiency"] == 1.0
    assert rows["greedy"]["efficiency"] == pytest.approx(16 / 24)
    assert all(r["lower_bound_sequences"] == 2 for r in rows.values())
    assert rows["greedy"]["gap_sequences"] == 1 and rows["greedy"]["gap_points"] == pytest.approx(100 / 3)
    # greedy: [6] [5 3] [2]
    assert rows["greedy"]["samples_per_sequence_max"] == 2
    assert rows["greedy"]["samples_per_sequence_mean"] == pytest.approx(4 / 3)
    # attention: padding sum s^2 = 25+9+36+4 = 74; bfd sequences hold 6+2 and 5+3
    assert rows["bfd"]["attention_cost_doc_mask"] == 1.0
    assert rows["bfd"]["attention_cost_no_mask"] == pytest.approx(128 / 74)
    # random: 16 tokens cut once at 8; doc-mask attention below padding's means the cut fell inside a
    # sample, so exactly one sample is split in two (5 pieces)
    assert rows["random"]["attention_cost_doc_mask"] < 1.0 and rows["random"]["split_samples"] == 1
    # every mode places all 16 tokens once; nothing over-long here, so nothing cut, truncated or dropped
    for r in rows.values():
        assert r["placed_tokens"] == 16 and r["truncated_tokens"] == r["dropped_tokens"] == 0, r
        assert r["truncated_samples"] == r["dropped_samples"] == r["turn_split_samples"] == 0, r
    assert sum(r["split_samples"] for m, r in rows.items() if m != "random") == 0


def test_truncated_and_dropped_counts():
    (t,) = report([10, 3], 4, ["bfd"], overlong="truncate")
    assert (t["truncated_samples"], t["truncated_tokens"], t["placed_tokens"]) == (1, 6, 7)
    (d,) = report([10, 3], 4, ["bfd"], overlong="drop")
    assert (d["dropped_samples"], d["dropped_tokens"], d["num_sequences"]) == (1, 10, 1)


def test_format_table():
    table = format_table(report([5, 3, 6, 2], 8, ["padding", "bfd"]))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| mode") and "efficiency" in lines[0]
    assert "50.00%" in lines[2] and "100.00%" in lines[3]


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_report.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_lengths_json_plot(tmp_path):
    np.save(tmp_path / "l.npy", np.array([5, 3, 6, 2, 9]))
    out = run_tool(
        "--lengths",
        str(tmp_path / "l.npy"),
        "--max-seq-length",
        "8",
        "--modes",
        "padding,bfd,windowed_bfd:window=2",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert out.returncode == 0, out.stderr
    rows = json.load(open(tmp_path / "r.json"))
    assert [r["mode"] for r in rows] == ["padding", "bfd", "windowed_bfd:window=2"]
    assert {"mode", "num_sequences", "efficiency", "lower_bound_sequences", "seconds"} <= set(rows[0])
    assert rows[1]["num_sequences"] == 3 and rows[1]["truncated_samples"] == 1
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| bfd" in out.stdout


def test_cli_data_prefix_cut_at_turns(tmp_path):
    with SFTDatasetWriter(str(tmp_path / "d")) as w:
        w.add(list(range(12)), [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 3, 6, 8])
        w.add([1, 2, 3], [0, 1, 1], [0])
    out = run_tool(
        "--data-prefix",
        str(tmp_path / "d"),
        "--max-seq-length",
        "6",
        "--modes",
        "bfd",
        "--overlong",
        "cut-at-turns",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.load(open(tmp_path / "r.json"))
    # 12 tokens cut at the turn start 6 -> [0,6) [6,12), plus 3 tokens: 3 sequences, nothing lost
    assert (row["turn_split_samples"], row["placed_tokens"], row["num_sequences"]) == (1, 15, 3)


def test_cli_errors(tmp_path):
    out = run_tool("--lengths", str(tmp_path / "missing.npy"), "--max-seq-length", "8")
    assert out.returncode == 2 and "missing.npy: no such lengths file" in out.stderr
    np.save(tmp_path / "f.npy", np.array([1.5, 2.0]))
    out = run_tool("--lengths", str(tmp_path / "f.npy"), "--max-seq-length", "8")
    assert out.returncode == 2 and "expected a 1-D integer array" in out.stderr
    np.save(tmp_path / "l.npy", np.array([1, 2]))
    out = run_tool("--lengths", str(tmp_path / "l.npy"), "--max-seq-length", "8", "--modes", "best")
    assert out.returncode == 2 and "unknown packing mode 'best'" in out.stderr


def test_cli_balance_forecast(tmp_path):
    # long-tailed: one in ten samples fills a 4096 sequence alone, the rest are short
    rng = np.random.default_rng(0)
    lengths = np.array(
        [int(rng.integers(3500, 4096)) if i % 10 == 0 else int(rng.integers(20, 300)) for i in range(600)]
    )
    np.save(tmp_path / "l.npy", lengths)
    out = run_tool(
        "--lengths",
        str(tmp_path / "l.npy"),
        "--max-seq-length",
        "4096",
        "--modes",
        "bfd",
        "--data-parallel-size",
        "4",
        "--global-batch-size",
        "16",
        "--model",
        "tiny",
        "--vocab-size",
        "256",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    assert "Compute imbalance per step over DP 4" in out.stdout
    (row,) = json.load(open(tmp_path / "r.json"))
    b = row["balance"]
    assert b["sequences_per_rank"] == 4 and b["steps"] >= 3
    assert 1.0 <= b["bound"] <= b["imbalance_balanced"] < b["imbalance_contiguous"] and b["gain"] > 1.0
    bad = run_tool(
        "--lengths",
        str(tmp_path / "l.npy"),
        "--max-seq-length",
        "4096",
        "--data-parallel-size",
        "3",
        "--global-batch-size",
        "16",
    )
    assert bad.returncode != 0 and "--global-batch-size 16 must be a multiple" in bad.stderr


def _dataset_with_unsupervised(prefix):
    """Six conversations; two have no trained target once truncated to 6 tokens (the answer is
    past the cut), one has none at all, three are ordinary."""
    with SFTDatasetWriter(prefix) as w:
        w.add(list(range(10)), [0] * 7 + [1] * 3, [0])  # answer cut off at 6
        w.add(list(range(9)), [0] * 8 + [1], [0])  # answer cut off at 6
        w.add([1, 2, 3], [0, 0, 0], [0])  # no answer at all
        w.add([1, 2, 3, 4], [0, 1, 1, 1], [0])
        w.add([5, 6], [0, 1], [0])
        w.add([7, 8, 9, 1, 2], [0, 0, 1, 1, 1], [0])


@pytest.mark.parametrize("mode", ["padding", "greedy", "bfd"])
def test_cli_sequence_count_is_the_training_plan(tmp_path, mode):
    """pack_report plans what the trainer plans: the same library call (``get_plan``, which
    leaves out items with no supervised token) gives the same sequence count."""
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.cache import get_plan
    from megatron_pack.packing.plan import build_plan

    prefix = str(tmp_path / "d")
    _dataset_with_unsupervised(prefix)
    out = run_tool(
        "--data-prefix", prefix, "--max-seq-length", "6", "--modes", mode, "--json", str(tmp_path / "r.json")
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.load(open(tmp_path / "r.json"))
    ds = SFTIndexedDataset(prefix)
    plan = get_plan(ds, 6, mode, cache_dir=str(tmp_path / "cache"))
    assert plan.stats.unsupervised_items == 3
    assert row["num_sequences"] == plan.num_sequences
    assert (row["unsupervised_samples"], row["unsupervised_tokens"]) == (3, 6 + 6 + 3)
    assert row["placed_tokens"] == plan.stats.placed_tokens == 4 + 2 + 5
    # negative control: planning the bare lengths (what the report did) packs the unsupervised items too
    bare = build_plan(ds.lengths, 6, mode)
    assert bare.num_sequences != plan.num_sequences
