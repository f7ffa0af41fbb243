"""Hostile sizes in a HF ``config.json``: refused on one line before anything is sized from them,
by the conversion (checked against the tensors present, headers only), by training's and the
planner's ``--model PATH`` (the shared reader's bounds), in bounded memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest
from test_convert_mapping import hf_config, write_hf_dir

from megatron_pack.model.architecture import SIZE_LIMITS, Architecture, ArchitectureError
from megatron_pack.model.presets import PRESETS, get_preset

REPO = os.path.join(os.path.dirname(__file__), "..", "..", "..")
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
# A normal 2-layer conversion (python + torch + safetensors) runs in ~700 MB of address space
# (measured: 600 MB fails in torch's import); the 10^9-layer config reached 22.7 GB of RSS.
ADDRESS_SPACE = 1 << 30


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _convert(hf, out):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, TOOL, "hf-to-megatron", "--hf-dir", str(hf), "--output", str(out),
                          "--no-progress"], capture_output=True, text=True, preexec_fn=_limited, timeout=120)
    return res, time.monotonic() - t0


def test_billion_layer_config_refused_on_one_line_in_bounded_memory(tmp_path):
    write_hf_dir(tmp_path / "hf")
    ok, _ = _convert(tmp_path / "hf", tmp_path / "ok")  # control: the limit leaves a normal run room
    assert ok.returncode == 0, ok.stderr[-2000:]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(num_hidden_layers=10**9)))
    res, seconds = _convert(tmp_path / "hf", tmp_path / "out")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_hidden_layers = 1000000000: exceeds 1,024" in lines[0], lines
    assert seconds < 60 and not (tmp_path / "out").exists()


def test_layer_count_checked_against_the_tensors_before_names_are_built(tmp_path):
    """Within the bound but more layers than the file holds: refused by counting the layers the
    headers name, not by building the expected name of every layer first."""
    from megatron_pack.convert import ConversionError, convert_hf_to_megatron

    write_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(num_hidden_layers=SIZE_LIMITS["num_layers"])))
    with pytest.raises(ConversionError, match=r"num_hidden_layers = 1024, but the safetensors in .* hold 2 layers "
                                              r"\(model.layers.0 .. 1\)"):
        convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("key, value, named", [
    ("hidden_size", 10**9, "hidden_size = 1000000000: exceeds 131,072"),
    ("num_hidden_layers", 10**9, "num_hidden_layers = 1000000000: exceeds 1,024"),
    ("vocab_size", 10**12, "vocab_size = 1000000000000: exceeds 16,777,216"),
    ("intermediate_size", 2**40, "intermediate_size = 1099511627776: exceeds"),
    ("max_position_embeddings", 10**15, "max_position_embeddings = 1000000000000000: exceeds"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps = NaN: must be a finite number"),
    ("rope_theta", float("inf"), "rope_theta = Infinity: must be a finite number"),
])
def test_model_path_sizes_bounded_on_parse(tmp_path, key, value, named):
    """``train --model PATH`` and the planner read configs through ``get_preset``: the sizes that
    made them die with MemoryError (hidden 10^9: a 7.68 TB allocation) are refused there."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config(**{key: value})))
    with pytest.raises(ArchitectureError, match=named.replace("(", r"\(")):
        get_preset(str(tmp_path))
    get_preset(str(_write(tmp_path / "fine", hf_config())))  # control: the same file with sane values reads


def _write(d, cfg):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_planner_refuses_hostile_config_on_one_line(tmp_path):
    cfg = _write(tmp_path / "m", hf_config(num_hidden_layers=10**9))
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallel.py"), "--model", str(cfg)],
                         capture_output=True, text=True, preexec_fn=_limited, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"plan_parallel.py: error: --model: {cfg / 'config.json'}: num_hidden_layers = 1000000000: "
        "exceeds 1,024 (the sane bound for this size; no published model comes near it)"
    ]


def test_presets_within_bounds_and_checkpoint_metadata_bounded():
    for p in PRESETS.values():  # every published size fits
        assert p.num_layers <= SIZE_LIMITS["num_layers"] and p.hidden_size <= SIZE_LIMITS["hidden_size"]
    import dataclasses

    with pytest.raises(ArchitectureError, match="num_layers = 1000000000: exceeds"):  # e.g. a forged run_config.json
        dataclasses.replace(PRESETS["tiny"], num_layers=10**9)
    with pytest.raises(ArchitectureError, match="hidden_size = '64': must be a positive integer"):
        Architecture("x", 2, "64", 176, 4, 2, None)


def test_train_refuses_hostile_config_on_one_line_before_torch(tmp_path):
    """``train --model PATH``: the config is read with the flags, before any heavy import (hidden
    10^9 used to reach the model build and die with MemoryError)."""
    cfg = _write(tmp_path / "m", hf_config(hidden_size=10**9))
    res = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "megatron_pack.train",
            "--model",
            str(cfg),
            "--data-path",
            str(tmp_path / "absent"),
            "--train-iters",
            "1",
        ],
        capture_output=True,
        text=True,
        preexec_fn=_limited,
        timeout=120,
    )
    lines = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert f"--model: {cfg / 'config.json'}: hidden_size = 1000000000: exceeds 131,072" in lines[0]
    assert " torch\n" not in res.stderr and "| torch" not in res.stderr  # refused before torch was imported
