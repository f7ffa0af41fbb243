"""Every command line fails fast and on one line, and its happy path prints no library warning.

Each tool runs in a subprocess, as a user would start it. A wrong invocation must answer before
torch or Megatron-Core is imported (checked exactly: the wrapper reports the heavy modules
loaded at exit) and within a wall-clock bound: the target is under 1 s, the bound
``FAIL_FAST_S`` is generous because this suite runs on shared, loaded CI machines.
"""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAIL_FAST_S = 3.0  # target < 1 s (about 0.3 s on a quiet machine); importing torch alone takes 1-2 s
HEAVY = ("torch", "megatron.core", "transformers")

# Runs a tool the way `python tools/x.py ...` / `python -m pkg ...` would, then reports on stdout
# which heavy modules had been imported by the time it exited.
WRAPPER = r"""
import atexit, json, runpy, sys
heavy = json.loads(sys.argv[1]); target = sys.argv[2]; sys.argv = [target] + sys.argv[3:]
atexit.register(lambda: print("HEAVY_IMPORTED=" + json.dumps([m for m in heavy if m in sys.modules])))
if target.endswith(".py"):
    sys.path.insert(0, __import__("os").path.dirname(target))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

TOOLS = {
    "preprocess": os.path.join(ROOT, "tools", "preprocess_sft.py"),
    "pack_report": os.path.join(ROOT, "tools", "pack_report.py"),
    "plan": os.path.join(ROOT, "tools", "plan_parallel.py"),
    "convert": os.path.join(ROOT, "tools", "convert_checkpoint.py"),
    "leakage": os.path.join(ROOT, "tools", "analyze_leakage.py"),
    "compare": os.path.join(ROOT, "tools", "compare_modes.py"),
    "train": "megatron_pack.train",
    "demo": "megatron_pack.demo",
    "study": "megatron_pack.experiment",
}


def _env():
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for key in ("PYTHONWARNINGS", "MEGATRON_PACK_SHOW_LIBRARY_WARNINGS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)  # the tools must be quiet on their own
    return env


def run_tool(tool: str, *args, timeout=600, env=None):
    if TOOLS[tool].endswith(".py"):
        cmd = [sys.executable, TOOLS[tool], *map(str, args)]
    else:
        cmd = [sys.executable, "-m", TOOLS[tool], *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# (tool, arguments, text the one-line error must contain)
BAD = [
    (
        "preprocess",
        ["--input", "/nonexistent/in.jsonl", "--tokenizer", "/nonexistent", "--output-prefix", "/tmp/x"],
        "input file does not exist",
    ),
    (
        "preprocess",
        ["--input", "a.jsonl", "--tokenizer", "t", "--output-prefix", "p", "--overlng", "drop"],
        "did you mean --overlong?",
    ),
    (
        "pack_report",
        ["--lengths", "/nonexistent.npy", "--max-seq-length", "512", "--modes", "padding,bdf"],
        "unknown packing mode 'bdf'",
    ),
    ("pack_report", ["--data-prefix", "/nonexistent/sft", "--max-seq-length", "512"], "no SFT dataset"),
    ("plan", ["--seq-lenght", "4096"], "did you mean --seq-length?"),
    ("plan", ["--model", "tiny", "--data-path", "/nonexistent/sft"], "no SFT dataset"),
    # a layout rule needs no model build: answered before torch / Megatron-Core are imported
    (
        "plan",
        ["--model", "llama3-70b", "--tensor-model-parallel-size", "3"],
        "TP 3 does not divide the 64 attention heads of llama3-70b",
    ),
    (
        "plan",
        ["--model", "tiny", "--data-path", "0.7", "/nonexistent/a", "0.3", "/nonexistent/b"],
        "/nonexistent/a: no SFT dataset",
    ),
    ("convert", ["megatron-to-hf", "--load", "/nonexistent/ckpt", "--output", "/tmp/out"], "no such checkpoint"),
    ("convert", ["hf-to-megatron", "--hf-dri", "x", "--output", "y"], "did you mean --hf-dir?"),
    ("train", ["--train-iters", "2"], "required: --data-path"),
    ("train", ["--data-path", "/nonexistent/sft", "--train-iters", "2"], "no SFT dataset at this prefix"),
    ("train", ["--data-pth", "x", "--train-iters", "2"], "did you mean --data-path?"),
    ("train", ["--data-path", "x", "--train-iters", "2", "--micro-batch-size", "3"], "--global-batch-size"),
    (
        "train",
        ["--data-path", "x", "--train-iters", "2", "--wandb-exp-name", "e"],
        "--wandb-exp-name: needs --wandb-project",
    ),
    (
        "train",
        ["--data-path", "x", "--train-iters", "2", "--check-isolation", "strict"],
        "--check-isolation: invalid choice",
    ),
    ("demo", ["--modes", "padding", "bdf"], "unknown packing mode 'bdf'"),
    ("demo", ["--mdoes", "bfd"], "did you mean --modes?"),
    ("pack_report", ["--lengths", "x.npy", "--max-seq-lenght", "8"], "did you mean --max-seq-length?"),
    ("convert", ["hf-to-megatron", "--hf-dir", "/nonexistent", "--output", "/tmp/x"], "no config.json there"),
    (
        "leakage",
        ["--model", "/nonexistent/model", "--data-prefix", "/nonexistent/sft"],
        "--model /nonexistent/model: not found",
    ),
    ("leakage", ["--modle", "x"], "did you mean --model"),
    ("compare", ["--mdoes", "bfd"], "did you mean --modes?"),
    ("compare", ["--modes", "tetris"], "--modes"),
    ("study", ["--setings", "bfd"], "did you mean --settings?"),
    ("study", ["--settings", "bdf"], "--settings: unknown packing mode 'bdf'"),
    (
        "study",
        ["--model", "/nonexistent/model", "--data-path", "/nonexistent/chats.jsonl"],
        "--model /nonexistent/model/config.json: not found",
    ),
    ("study", ["--report-only", "--output-dir", "/nonexistent/out"], "/nonexistent/out: no study_seed*.json"),
]
#: The one exit-status rule of every command line (README, "Exit status"): 2 = bad invocation or input.
USAGE_STATUS = 2


@pytest.mark.parametrize("tool,args,expect", BAD, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(BAD)])
def test_bad_argument_fails_fast_on_one_line(tool, args, expect):
    target = TOOLS[tool]
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(HEAVY), target, *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == USAGE_STATUS, (res.returncode, res.stdout + res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{res.stderr}"  # no usage block, no traceback
    assert "error:" in lines[0] and expect in lines[0], lines[0]
    heavy = json.loads(res.stdout.split("HEAVY_IMPORTED=")[-1])
    assert heavy == [], f"{tool} imported {heavy} before rejecting its arguments"
    assert seconds < FAIL_FAST_S, f"{tool} took {seconds:.2f}s to reject its arguments"


def test_fail_fast_check_can_fail():
    """Negative controls: the wrapper reports a heavy import when there is one, and plain
    argparse (what the tools used) prints a usage block before its error."""
    res = subprocess.run(
        [sys.executable, "-c", "import torch\n" + WRAPPER, json.dumps(HEAVY), "megatron_pack.demo", "--modes", "bdf"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(res.stdout.split("HEAVY_IMPORTED=")[-1]) == ["torch"]
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            "import argparse; p = argparse.ArgumentParser(); "
            "p.add_argument('--a', required=True); p.parse_args(['--b'])",
        ],
        capture_output=True,
        text=True,
    )
    assert len(plain.stderr.splitlines()) > 1


# ---------------------------------------------------------------- happy paths stay quiet
def warning_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if "Warning" in ln or "warnings.warn" in ln]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, wordlevel_dir):
    """A small chat file from the built-in sample, preprocessed by the tool itself."""
    d = tmp_path_factory.mktemp("front_doors")
    src = os.path.join(ROOT, "megatron_pack", "assets", "sample_chat.jsonl")
    with open(src) as f, open(d / "chat.jsonl", "w") as out:
        out.writelines(f.readlines()[:64])
    res = run_tool(
        "preprocess",
        "--input",
        d / "chat.jsonl",
        "--tokenizer",
        wordlevel_dir,
        "--output-prefix",
        d / "sft",
        "--chat-template",
        "llama3",
        "--no-progress",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return {"dir": d, "prefix": str(d / "sft"), "tokenizer": wordlevel_dir, "preprocess_stderr": res.stderr}


def test_preprocess_happy_path_quiet(workspace):
    assert warning_lines(workspace["preprocess_stderr"]) == [], workspace["preprocess_stderr"]
    assert os.path.isfile(workspace["prefix"] + "_summary.json")


def test_pack_report_happy_path_quiet(workspace):
    d = workspace["dir"]
    res = run_tool(
        "pack_report",
        "--data-prefix",
        workspace["prefix"],
        "--max-seq-length",
        "256",
        "--json",
        d / "report.json",
        "--plot",
        d / "report.png",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert warning_lines(res.stderr) == [], res.stderr
    assert os.path.getsize(d / "report.png") > 0


def test_plan_happy_path_quiet(workspace):
    res = run_tool(
        "plan",
        "--model",
        "tiny",
        "--nnodes",
        "1",
        "--gpus-per-node",
        "1",
        "--vocab-size",
        "256",
        "--seq-length",
        "256",
        "--global-batch-size",
        "2",
        "--data-path",
        workspace["prefix"],
        "--lr",
        "1e-4",
    )  # a training flag: listed as not modelled, not an error
    assert res.returncode == 0, res.stdout + res.stderr
    assert warning_lines(res.stderr) == [], res.stderr
    assert "not modelled, ignored: --lr 1e-4" in res.stdout
    # negative control: with the filters off, the same command shows Megatron-Core's import noise
    loud = run_tool(
        "plan",
        "--model",
        "tiny",
        "--nnodes",
        "1",
        "--gpus-per-node",
        "1",
        "--vocab-size",
        "256",
        "--seq-length",
        "256",
        "--global-batch-size",
        "2",
        env={"MEGATRON_PACK_SHOW_LIBRARY_WARNINGS": "1"},
    )
    assert loud.returncode == 0 and warning_lines(loud.stderr), loud.stderr


def test_train_resume_and_export_happy_path_quiet(workspace):
    """A fresh run that saves (Megatron-Core warned 'Overwriting old incomplete' here), its resume
    (torch's load_state_dict / ShardedTensor FutureWarnings), then the HF export."""
    d = workspace["dir"]
    common = [
        "--data-path",
        workspace["prefix"],
        "--tokenizer-model",
        workspace["tokenizer"],
        "--model",
        "tiny",
        "--seq-length",
        "256",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--save",
        d / "ckpt",
        "--load",
        d / "ckpt",
        "--save-interval",
        "1",
        "--log-interval",
        "1",
    ]
    first = run_tool("train", *common, "--train-iters", "3", "--exit-interval", "2")  # same schedule on resume
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "> backends: layers:" in first.stdout  # what is in use, stated once instead of warnings
    assert first.stdout.count("> backends:") == 1
    header = next(ln for ln in first.stdout.splitlines() if ln.startswith("> backends:"))
    assert header.count("fusions:") == 1 and header.endswith(  # one fusions entry, every switch named once
        "; fusions: grad-accum off, rope off, bias-swiglu off, masked-softmax off"
    ), header
    resumed = run_tool("train", *common, "--train-iters", "3")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    export = run_tool("convert", "megatron-to-hf", "--load", d / "ckpt", "--output", d / "hf", "--no-progress")
    assert export.returncode == 0, export.stdout + export.stderr
    for res in (first, resumed, export):
        assert warning_lines(res.stderr) == [], res.stderr
        assert "Overwriting" not in res.stdout + res.stderr
    cfg = json.loads((d / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 4)  # the run's tokenizer (tiny: bos 0, eos <|eot_id|> 4)


def test_import_happy_path_quiet(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = tmp_path / "hf"
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(hf), safe_serialization=True)
    res = run_tool("convert", "hf-to-megatron", "--hf-dir", hf, "--output", tmp_path / "imp", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert warning_lines(res.stderr) == [], res.stderr


def test_quiet_filters_only_the_listed_messages():
    """The filters match exact messages: the listed noise is silenced, any other warning shows
    (negative control), and MEGATRON_PACK_SHOW_LIBRARY_WARNINGS=1 turns them off."""
    code = (
        "import warnings, sys; from megatron_pack.quiet import quiet_library_noise; quiet_library_noise(); "
        "warnings.warn('Transformer Engine and Apex are not installed. Falling back'); "
        "warnings.warn('Please use DTensor instead and we are deprecating ShardedTensor.', FutureWarning); "
        "warnings.warn('something the user must see')"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert "something the user must see" in res.stderr
    assert "Transformer Engine" not in res.stderr and "ShardedTensor" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**_env(), "MEGATRON_PACK_SHOW_LIBRARY_WARNINGS": "1"},
    )
    assert "Transformer Engine" in res.stderr and "ShardedTensor" in res.stderr


def _readme_exit_table() -> dict:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("### Exit status (every command line)", 1)[1].split("\n### ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return {ln.split("`")[1]: [c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows}


def test_readme_exit_status_table_covers_every_command_line():
    """One table for every front door, and a bad-invocation case (exit 2) above for each."""
    table = _readme_exit_table()
    scripts = sorted(f"tools/{f}" for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
    modules = {"python -m megatron_pack.train", "python -m megatron_pack.demo", "python -m megatron_pack.experiment"}
    assert set(scripts) | modules == set(table), table
    assert all(len(cells) == 4 and cells[3] for cells in table.values())  # every command says what a 2 means
    tested = {t for t, _, _ in BAD}
    for name, target in TOOLS.items():  # every command line has a case that must exit 2
        assert name in tested, f"no bad-invocation case for {name} ({target})"
    assert {os.path.relpath(t, ROOT) for t in TOOLS.values() if t.endswith(".py")} == set(scripts)
    # negative control: the section parsed is the table, not an empty match
    assert "2: bad invocation or input" in open(os.path.join(ROOT, "README.md")).read()
