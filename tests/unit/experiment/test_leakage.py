"""Leakage measurement against a model whose attention is known, and its zero with the mask."""

import json
import os

import numpy as np
import pytest
import torch

from megatron_pack.experiment.leakage import (
    AttentionStats,
    analyze_sequences,
    assemble,
    bucket_of,
    capture_attention,
    forward_nll,
)

SEP = 2


def tiny_llama(uniform: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    if uniform:  # q = 0: every score 0, softmax uniform over the visible tokens
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    return model


def docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = rng.integers(3, 64, size=n)
        t[0], t[-1] = 1, SEP  # BOS ... separator
        m = np.zeros(n, bool)
        m[n // 2:] = True  # the answer half is supervised
        out.append((t, m))
    return out


def test_assemble_separator_variants_by_hand():
    d = [(np.array([1, 5, 6, SEP]), np.array([0, 0, 1, 1], bool)), (np.array([1, 7, SEP]), np.array([0, 1, 1], bool))]
    p = assemble(d, SEP)
    assert p.tokens.tolist() == [1, 5, 6, SEP, 1, 7, SEP]
    assert p.starts.tolist() == [0, 4] and p.ends.tolist() == [4, 7] and p.core_ends.tolist() == [3, 6]
    assert assemble(d, SEP, "removed").tokens.tolist() == [1, 5, 6, 1, 7, SEP]  # the last keeps its own
    assert assemble(d, SEP, "doubled").tokens.tolist() == [1, 5, 6, SEP, SEP, 1, 7, SEP]
    assert assemble(d, SEP, "doubled").starts.tolist() == [0, 5]


def test_uniform_attention_gives_earlier_over_visible_exactly():
    """q = 0 makes attention uniform: token t of a document starting at s puts (s - 1)/(t + 1) on
    earlier documents (sink excluded) and 1/(t + 1) on token 0, exactly, in every layer and head."""
    model = tiny_llama(uniform=True)
    seq = docs([7, 5, 9])
    p = assemble(seq, SEP)
    stats = AttentionStats([0, 1], 4)
    with capture_attention(model, [0, 1], lambda li, w: stats.add_packed(li, w, p)), torch.no_grad():
        forward_nll(model, p, document_mask=False)
    t = np.arange(p.ends[-1])
    s = p.starts[p.doc_of_token()]
    keep = s > 0
    b, t, s = bucket_of(t[keep] - s[keep]), t[keep], s[keep]
    want_leak = np.bincount(b, (s - 1) / (t + 1), minlength=stats.count.size)
    want_sink = np.bincount(b, 1 / (t + 1), minlength=stats.count.size)
    np.testing.assert_array_equal(stats.count, np.bincount(b, minlength=stats.count.size))
    for li in range(2):
        for h in range(4):
            np.testing.assert_allclose(stats.leak[li, h], want_leak, atol=1e-6)
            np.testing.assert_allclose(stats.sink[li, h], want_sink, atol=1e-6)
    # a model with real queries attends otherwise: the control that the comparison can fail
    other = AttentionStats([0], 4)
    real = tiny_llama(uniform=False, seed=1)
    with torch.no_grad():
        for layer in real.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)  # sharpen: far from uniform
    with capture_attention(real, [0], lambda li, w: other.add_packed(li, w, p)), torch.no_grad():
        forward_nll(real, p, document_mask=False)
    assert np.abs(other.leak[0] - want_leak).max() > 1e-3


def test_only_analysed_layers_are_materialised_and_attention_restored():
    model = tiny_llama(uniform=False)
    seen = []
    p = assemble(docs([4, 6]), SEP)
    with torch.no_grad():
        before = forward_nll(model, p, document_mask=False)
        with capture_attention(model, [1], lambda li, w: seen.append((li, tuple(w.shape)))):
            inside = forward_nll(model, p, document_mask=False)
        after = forward_nll(model, p, document_mask=False)
    assert seen == [(0, (4, 10, 10))]  # layer 1 alone handed its probabilities over
    assert model.config._attn_implementation == "sdpa"  # the loaded attention is back
    torch.testing.assert_close(inside, before)  # eager in layer 1 computes what sdpa does
    assert torch.equal(after, before)


def test_contamination_is_zero_with_the_mask_and_not_without():
    model = tiny_llama(uniform=False)
    seqs = [docs([9, 6, 8], seed=1), docs([5, 12], seed=2)]
    masked = analyze_sequences(model, seqs, SEP, [0, 1], document_mask=True)
    for v, c in masked["contamination"].items():
        assert c["documents"] == 3 and c["max_abs"] < 1e-5, (v, c)
    att = masked["attention"]
    assert np.nanmax(np.abs(att["leak"])) < 1e-6 and np.nanmax(np.abs(att["sink"])) < 1e-6
    plain = analyze_sequences(model, seqs, SEP, [0, 1], document_mask=False)
    assert plain["contamination"]["as-is"]["max_abs"] > 1e-4  # the negative control
    assert np.nanmin(plain["attention"]["leak"][0]) > 0


def test_tool_end_to_end_on_an_hf_directory(tmp_path):
    from megatron_pack.files.indexed import SFTDatasetWriter
    from tools.analyze_leakage import main

    hf = tmp_path / "hf"
    tiny_llama(uniform=False).save_pretrained(hf)
    prefix = str(tmp_path / "sft")
    with SFTDatasetWriter(prefix) as w:
        for t, m in docs([20, 14, 30, 9, 17, 25, 11, 16], seed=3):
            w.add(t.tolist(), m.astype(np.uint8).tolist(), [0])
    out = tmp_path / "out"
    assert main(["--model", str(hf), "--data-prefix", prefix, "--output-dir", str(out), "--seq-length", "64",
                 "--max-sequences", "2", "--layers", "1"]) == 0
    res = json.load(open(out / "leakage.json"))
    assert res["separator_id"] == SEP and res["sequences"] == 2 and res["attention"]["layers"] == [1]
    assert len(res["attention"]["per_head"]["leak"][0]) == 4  # per head in the JSON
    assert os.path.getsize(out / "leakage.png") > 0 and "contamination" in open(out / "leakage.md").read().lower()
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nope"), "--data-prefix", prefix])


# Runs the tool and reports which heavy modules were imported by the time it exited.
_HEAVY_WRAPPER = r"""
import atexit, json, runpy, sys
target = sys.argv[1]; sys.argv = [target] + sys.argv[2:]
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in ("torch", "transformers", "megatron.core")
                                                     if m in sys.modules])))
sys.path.insert(0, __import__("os").path.dirname(target))
runpy.run_path(target, run_name="__main__")
"""


def _fast_fail(*args):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    res = subprocess.run([sys.executable, "-c", _HEAVY_WRAPPER, os.path.join(root, "tools", "analyze_leakage.py"),
                          *map(str, args)], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return res.returncode, lines, json.loads(res.stdout.split("HEAVY=")[-1])


@pytest.fixture
def leak_inputs(tmp_path):
    from megatron_pack.files.indexed import SFTDatasetWriter

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))  # no weights
    prefix = str(tmp_path / "sft")
    with SFTDatasetWriter(prefix) as w:
        w.add([1, 2, 3], [0, 1, 1], [0])
    return str(hf), prefix


@pytest.mark.parametrize("extra, expect", [
    (["--layers", "0", "5"], "--layers 5: outside [0, 2) (the model's 2 layers)"),
    (["--layers", "-1"], "--layers -1: outside"),
    (["--layers", "1", "1"], "a layer is given twice"),
    (["--pack-mode", "bdf"], "--pack-mode: unknown packing mode 'bdf'"),
    (["--max-sequences", "0"], "--max-sequences 0: must be >= 1"),
    (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
    (["--output-dir", "/nonexistent/dir/out"], "parent directory /nonexistent/dir does not exist"),
    (["--layrs", "1"], "did you mean --layers?"),
])
def test_bad_flags_fail_fast_before_the_model_loads(leak_inputs, extra, expect):
    hf, prefix = leak_inputs
    rc, lines, heavy = _fast_fail("--model", hf, "--data-prefix", prefix, *extra)
    assert rc == 2 and len(lines) == 1 and expect in lines[0], lines
    assert heavy == [], f"imported {heavy} before rejecting the flags"


def test_good_layers_pass_the_checks_and_reach_the_model_load(leak_inputs):
    """Negative control: --layers 1 on a 2-layer model passes the checks; the load (no weights
    here) is what fails, after the heavy imports."""
    hf, prefix = leak_inputs
    rc, lines, heavy = _fast_fail("--model", hf, "--data-prefix", prefix, "--layers", "1", "--seq-length", "8")
    assert rc != 0 and "torch" in heavy and "--layers" not in "\n".join(lines)


def test_recorded_num_layers_reads_checkpoint_records(tmp_path):
    from megatron_pack.checkpoint import dist, imported
    from megatron_pack.experiment.leakage_report import IMPORT_META_NAME, RUN_CONFIG_NAME, recorded_num_layers

    assert IMPORT_META_NAME == imported.META_NAME
    it = tmp_path / "ckpt" / "iter_0000002"
    it.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    (it / RUN_CONFIG_NAME).write_text(json.dumps({"architecture": {"num_layers": 3}}))
    assert dist.saved_run_config(str(it))["architecture"]["num_layers"] == 3  # the file training writes
    assert recorded_num_layers(str(tmp_path / "ckpt")) == 3
    assert recorded_num_layers(str(tmp_path / "ckpt"), "llama3-8b") == 32  # --model-preset wins
    assert recorded_num_layers(str(tmp_path)) is None
