"""The README's front doors: launch scripts parse, DRY_RUN plans with the script's settings,
and the quickstart's demo runs end to end on a shortened schedule, printing figures that agree
with each other and with the README."""

import json
import os
import re
import subprocess
import sys

import numpy as np
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


def test_dry_run_takes_a_blend_in_data_path(tmp_path):
    """DRY_RUN=1 with DATA_PATH="0.7 A 0.3 B" plans the blend, as training takes it."""
    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(0)
    for name, n in (("a", 120), ("b", 60)):
        with SFTDatasetWriter(str(tmp_path / name)) as w:
            for L in rng.integers(50, 900, n):
                w.add(rng.integers(1, 500, int(L)), np.ones(int(L), dtype=np.uint8), [0])
    blend = f"0.7 {tmp_path / 'a'} 0.3 {tmp_path / 'b'}"
    env = {**os.environ, "DRY_RUN": "1", "DATA_PATH": blend, "PLAN_JSON": str(tmp_path / "plan.json"),
           "GLOBAL_BATCH_SIZE": "4", "SEQ_LENGTH": "1024", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    out = subprocess.run(["bash", "examples/run_llama3_8b_packed.sh", "--no-progress"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plan = json.load(open(tmp_path / "plan.json"))
    assert plan["data"]["data_path"] == blend
    # every training conversation of both sources (the script's --valid-fraction 0.01 of each held out)
    assert plan["data"]["num_conversations"] + plan["data"]["held_out_conversations"] == 180
    assert plan["data"]["num_conversations"] == 119 + 59
    assert not any(str(tmp_path) in x for x in plan["unmodelled_flags"])
    # negative control: a one-source DATA_PATH plans that source alone
    env["DATA_PATH"] = str(tmp_path / "a")
    out = subprocess.run(["bash", "examples/run_llama3_8b_packed.sh", "--no-progress"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.load(open(tmp_path / "plan.json"))["data"]["num_conversations"] == 119


def test_quickstart_installs_into_the_active_python_and_says_so(tmp_path):
    """The quickstart installs into the interpreter it is given (no venv of its own), says which
    before installing, and the README's first section says so with the two venv lines."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"  # records every call instead of installing
    fake.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {log}\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env={**os.environ, "PYTHON": str(fake)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"installing megatron_pack into {fake} (the active Python" in out.stdout
    calls = log.read_text().splitlines()
    assert any(c.startswith("-m pip install") and "-e .[test]" in c for c in calls), calls
    assert calls[-1].startswith("-m megatron_pack.demo --output-dir outputs/demo"), calls
    first = open(os.path.join(ROOT, "README.md")).read().split("## Two commands on a fresh machine", 1)[1]
    first = first.split("\n## ", 1)[0]
    assert "into whatever Python is active" in first
    assert "python3 -m venv .venv\nsource .venv/bin/activate\n" in first
    # negative control: the section after it does not carry the statement
    assert "into whatever Python is active" not in open(os.path.join(ROOT, "README.md")).read().split(
        "## Data format", 1)[1]


def markdown_tables(text: str) -> list[list[dict]]:
    """Every Markdown table printed in ``text``, as lists of {heading: cell} rows."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            heads, rows = block[0], [r for r in block[2:]]
            tables.append([dict(zip(heads, r)) for r in rows])
            block = []
    return tables


def _num(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("x"))  # "22.68x (disturbed)" -> 22.68


def test_demo_runs_end_to_end(tmp_path):
    """The quickstart's main job, shortened: preprocess the sample, packing table, train two modes.
    Then what it printed is checked against itself, the files it wrote and the README: truncated
    counts agree between header, packing table and the preprocessing summary; the speedup is the
    ratio of the time column; no library warning on stderr."""
    from megatron_pack.demo import RESULT_COLUMNS, RESULT_NOTES

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MEGATRON_PACK_SHOW_LIBRARY_WARNINGS")}
    out = subprocess.run([sys.executable, "-m", "megatron_pack.demo", "--output-dir", str(tmp_path),
                          "--modes", "padding", "bfd", "--epochs", "0.1", "--log-interval", "100",
                          "--timing-rounds", "2", "--timing-steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [ln for ln in out.stderr.splitlines() if "Warning" in ln] == [], out.stderr
    rows = json.load(open(tmp_path / "results.json"))
    assert [r["mode"] for r in rows] == ["padding", "bfd"]
    padding, bfd = rows
    assert bfd["sequences"] < padding["sequences"]  # packing needs fewer sequences for the same data
    for r in rows:
        assert r["steps"] >= 1 and r["valid_loss"] > 0 and r["final_train_loss"] > 0
    assert os.path.getsize(tmp_path / "packing.png") > 0

    packing, results = markdown_tables(out.stdout)
    # truncation: the header's count = every mode's 'truncated' column = lengths over the limit;
    # the summary does not claim a count of its own (preprocessing had no --max-seq-length)
    m = re.search(r"Packing the (\d+) training conversations into sequences of (\d+): ([\d,]+) tokens after "
                  r"truncating the (\d+) longer than", out.stdout)
    assert m, out.stdout[:2000]
    over = int(m.group(4))
    assert over > 0 and all(int(r["truncated"]) == over for r in packing)
    summary = json.load(open(tmp_path / "data" / "sample_summary.json"))
    assert summary["max_seq_length"] is None and summary["overlong"]["over_max_seq_length"] is None
    assert f"packing truncates the {over} over" in out.stdout
    from megatron_pack.data.split import split_indices
    from megatron_pack.files.indexed import SFTIndexedDataset

    ds = SFTIndexedDataset(str(tmp_path / "data" / "sample"))
    lengths = ds.lengths[split_indices(len(ds), 0.05, 1234)[0]]
    assert int((lengths > 512).sum()) == over and int(m.group(1)) == lengths.size
    assert _num(m.group(3)) == int(np.minimum(lengths, 512).sum())
    assert all(int(r["truncated"]) + int(r["dropped"]) <= over for r in packing)

    # results: one robust figure behind every timing column
    assert list(results[0]) == [h for h, _, _ in RESULT_COLUMNS]
    base = results[0]
    for r, exact in zip(results, rows):
        assert int(r["steps"]) == exact["steps"] and _num(r["sequences"]) == exact["sequences"]
        assert exact["epoch_time"] == pytest.approx(exact["steps"] * exact["step_s"], rel=1e-9)
        # the step time is the best of the epoch run's median and the 2 interleaved timing rounds
        assert len(exact["round_step_s"]) == 2 and exact["step_s"] == min(exact["run_step_s"], *exact["round_step_s"])
        assert ("(disturbed)" in r["speedup"]) == bool(exact["disturbed"])
        assert _num(r["epoch time (s)"]) == pytest.approx(int(r["steps"]) * _num(r["median ms/step"]) / 1000,
                                                          abs=0.05 + 0.0005 * int(r["steps"]))
        assert exact["speedup"] == pytest.approx(padding["epoch_time"] / exact["epoch_time"], rel=1e-9)
        # from the printed columns: epoch times rounded to 0.1 s (tenths of a second on the tiny
        # demo, so a fixed relative tolerance fails on rounding alone), the speedup to 0.01
        b, e = _num(base["epoch time (s)"]), _num(r["epoch time (s)"])
        lo, hi = (b - 0.05) / (e + 0.05), (b + 0.05) / max(e - 0.05, 1e-9)
        assert lo - 0.005 <= _num(r["speedup"]) <= hi + 0.005, (r["speedup"], b, e)
        assert _num(r["ideal"]) == pytest.approx(_num(base["sequences"]) / _num(r["sequences"]), abs=0.006)
    assert RESULT_NOTES.splitlines()[0] in out.stdout  # which columns are exact, which are timings
    assert "> timing: 2 rounds of 2 steps per mode, the modes in turn" in out.stdout
    assert out.stdout.count("DISTURBED, not a result:") == sum(bool(r["disturbed"]) for r in rows)
    assert "Held-out loss" in out.stdout and "fewer optimizer steps" in out.stdout

    # README's account of the quickstart names the columns it prints
    readme = open(os.path.join(ROOT, "README.md")).read()
    said = readme[readme.index("bash examples/quickstart.sh"):readme.index("bash scripts/test.sh")]
    said = " ".join(w for w in said.split() if w != "#")
    assert "packing table" in said
    for phrase in ("sequences", "steps", "median ms/step", "epoch time", "real tokens/s", "speedup", "ideal",
                   "final train", "held-out loss"):
        assert phrase in said, phrase
        assert any(phrase in h for h in results[0]), phrase  # a column the demo printed
