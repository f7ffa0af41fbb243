"""HF interop end to end, for every supported family (``hf_families``: Llama, Llama-3.1 with
RoPE scaling, Mistral, Qwen2): a tiny random model built with transformers (CPU, no download)
-> ``hf-to-megatron`` -> megatron_pack logits equal HF's (fp32, <= 1e-5) at TP1, TP2 and PP2
on one packed row of several documents (one launch for all families and layouts); the round
trip through TP2 x PP2 gives back identical tensors, config and generation config;
fine-tuning an import of a non-preset model with ``python -m megatron_pack.train --load IMPORT``
(no ``--model``) and exporting gives a HF model whose loss equals megatron_pack's."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import launcher
import numpy as np
import pytest
import torch
from _launch_train import REPO, describe_failure, make_dataset, run_train
from hf_families import FAMILIES, LLAMA31_ORIGINAL_CONTEXT, VOCAB, build_hf_model, hf_doc_logits, load_hf

transformers = pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("_convert_worker.py")
TOL = 1e-5  # fp32
# Three documents packed in one row: megatron_pack sees them with cu_seqlens, HF one at a time.
# The last runs to position 89, beyond the llama3.1 model's original context (64).
DOCS = [[5, 17, 250, 3, 99, 101, 7, 7, 42, 288, 1], [260, 2, 33, 150, 299, 8, 64, 12, 9],
        [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 90)]]
LAYOUTS = ((1, 1), (2, 1), (1, 2))


def convert(*args):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args, "--no-progress"],
                         capture_output=True, text=True, cwd=str(REPO))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def megatron_logits(tmp_path, layouts, extra=(), nprocs=2, monkeypatch=None) -> list:
    """Logits per layout from the worker (the first rank that wrote them)."""
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(DOCS))
    out = tmp_path / "worker"
    monkeypatch.setattr(launcher, "WORKER", WORKER)
    launcher.launch(nprocs, ["--docs", str(docs), "--layouts", ";".join(layouts), *extra], out, timeout=200)
    result = []
    for i in range(len(layouts)):
        files = sorted(out.glob(f"logits_{i}_rank*.npy"))
        assert files, f"layout {layouts[i]} wrote no logits"
        result.append(torch.from_numpy(np.load(files[0])))
    return result


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for family in FAMILIES:
        dirs[family] = root / family.replace(".", "_")
        build_hf_model(family, dirs[family])
    return dirs


@pytest.fixture(scope="module")
def hf_dir(hf_dirs):
    return hf_dirs["llama"]


@pytest.fixture(scope="module")
def family_logits(hf_dirs, tmp_path_factory):
    """``{family: [(tp, pp, logits), ...]}``: every family at TP1, TP2 and PP2 in ONE 2-rank launch."""
    from megatron_pack.convert import convert_hf_to_megatron

    tmp = tmp_path_factory.mktemp("family_logits")
    layouts, keys = [], []
    for family, path in hf_dirs.items():
        for tp, pp in LAYOUTS:
            out = tmp / f"{path.name}_tp{tp}_pp{pp}"
            convert_hf_to_megatron(str(path), str(out), tensor_model_parallel_size=tp,
                                   pipeline_model_parallel_size=pp, progress=False)
            layouts.append(f"{tp},{pp},{out}")
            keys.append((family, tp, pp))
    mp = pytest.MonkeyPatch()
    try:
        logits = megatron_logits(tmp, layouts, monkeypatch=mp)
    finally:
        mp.undo()
    result = {}
    for (family, tp, pp), lg in zip(keys, logits):
        result.setdefault(family, []).append((tp, pp, lg))
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf_at_tp1_tp2_pp2(family, hf_dirs, family_logits):
    ref = hf_doc_logits(load_hf(hf_dirs[family]), DOCS)
    n = sum(len(d) for d in DOCS)
    assert ref.shape == (n, VOCAB) and ref.std() > 0.3
    for tp, pp, logits in family_logits[family]:
        assert logits.shape == (n, 384 if tp == 1 else 512), (tp, pp)
        diff = (logits[:, :VOCAB] - ref).abs().max().item()
        print(f"{family} TP{tp} PP{pp}: max |megatron - HF| = {diff:.2e}")
        assert diff <= TOL, f"{family} TP{tp} PP{pp}: max |megatron - HF| = {diff}"
        assert not logits[:, VOCAB:].any(), "padded vocabulary rows must be zero"


def test_family_negative_controls(hf_dirs, family_logits):
    """The logits comparison sees what each family switch does: HF with the switch changed
    differs from megatron_pack by far more than the tolerance."""
    import copy

    from megatron_pack.model.architecture import rope_inv_freq
    from megatron_pack.model.hf_architecture import load_hf_architecture

    def far(family, model):
        meg = family_logits[family][0][2][:, :VOCAB]
        return (hf_doc_logits(model, DOCS) - meg).abs().max().item()

    # llama3.1 with Megatron-Core's hard-coded scaling (low 1, high 4, original context 8192)
    arch = load_hf_architecture(str(hf_dirs["llama3.1"]))
    hard_coded = dataclasses.replace(arch, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                     rope_original_max_position_embeddings=8192)
    m = load_hf(hf_dirs["llama3.1"])
    m.model.rotary_emb.inv_freq = rope_inv_freq(hard_coded)
    m.model.rotary_emb.original_inv_freq = m.model.rotary_emb.inv_freq
    assert far("llama3.1", m) > 100 * TOL
    # ... and with no scaling at all
    m.model.rotary_emb.inv_freq = rope_inv_freq(dataclasses.replace(arch, rope_scaling_type="none"))
    assert far("llama3.1", m) > 100 * TOL
    # the import computes positions beyond the original context as transformers does
    assert len(DOCS[-1]) > LLAMA31_ORIGINAL_CONTEXT
    # mistral's linear scaling ignored
    m = load_hf(hf_dirs["mistral"])
    m.model.rotary_emb.inv_freq = m.model.rotary_emb.inv_freq * 2.0
    assert far("mistral", m) > 100 * TOL
    # qwen2 without its q/k/v biases
    m = copy.deepcopy(load_hf(hf_dirs["qwen2"]))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.bias.zero_()
    assert far("qwen2", m) > 100 * TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_tp2_pp2_identical_tensors(family, hf_dirs, tmp_path):
    """HF -> import (TP2 x PP2) -> HF: every tensor bitwise, the same architecture in config.json,
    special token ids and generation_config.json carried, identical logits in transformers.
    Llama goes through the command line, the others through the library calls it makes."""
    from safetensors.torch import load_file

    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_pack.model.architecture import architecture_differences
    from megatron_pack.model.hf_architecture import load_hf_architecture

    hf_dir = hf_dirs[family]
    meg, back = tmp_path / "meg", tmp_path / "back"
    if family == "llama":
        convert("hf-to-megatron", "--hf-dir", str(hf_dir), "--output", str(meg), "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "2", "--tokenizer", str(hf_dir))
        assert (meg / "tokenizer" / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
        convert("megatron-to-hf", "--load", str(meg), "--output", str(back), "--max-shard-size", "100KB")
    else:
        convert_hf_to_megatron(str(hf_dir), str(meg), tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                               tokenizer=str(hf_dir), progress=False)
        convert_megatron_to_hf(str(meg), str(back), max_shard_size="100KB", progress=False)
    orig = load_file(str(hf_dir / "model.safetensors"))
    got = {}
    index = json.loads((back / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(back / f)))
    assert len(set(index["weight_map"].values())) > 1
    assert set(got) == set(orig)
    for name, t in orig.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert (back / "tokenizer_config.json").exists() and (back / "tokenizer.json").exists()
    assert architecture_differences(load_hf_architecture(str(back)), load_hf_architecture(str(hf_dir))) == {}
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    for k in ("model_type", "architectures", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert out_cfg[k] == src_cfg[k], k
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    hf, ref = load_hf(back), load_hf(hf_dir)  # transformers reads config + index
    assert type(hf) is type(ref)
    assert hf.generation_config.eos_token_id == [2, 7] and hf.generation_config.temperature == 0.6
    assert torch.equal(hf_doc_logits(hf, DOCS), hf_doc_logits(ref, DOCS))


def masked_lm_loss(logits: torch.Tensor, tokens: list, mask: list) -> float:
    """Mean CE of predicting tokens[t+1] where its loss-mask flag is set (the batch contract)."""
    tgt = torch.tensor(tokens[1:])
    w = torch.tensor(mask[1:], dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:-1].double(), tgt, reduction="none")
    return float((ce * w).sum() / w.sum())


def test_finetune_import_without_model_flag_export_hf_loss_equals_megatron(hf_dirs, tmp_path, monkeypatch):
    """A Qwen2 model (q/k/v bias; no preset describes it): import at TP2, train with no
    ``--model`` (the architecture comes from the import), export the TP2 training checkpoint
    (the architecture and special tokens come from its run_config.json) and compare losses."""
    from megatron_pack.files.indexed import SFTIndexedDataset

    hf_dir = hf_dirs["qwen2"]
    prefix = make_dataset(str(tmp_path / "sft"), n=48, seed=3)
    imp, ck, out = tmp_path / "imported", tmp_path / "ckpt", tmp_path / "exported"
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    t0 = time.monotonic()
    convert_hf_to_megatron(str(hf_dir), str(imp), tensor_model_parallel_size=2, progress=False)
    t1 = time.monotonic()
    args = ["--data-path", prefix, "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-iters", "4", "--lr", "1e-3", "--valid-fraction", "0", "--tensor-model-parallel-size", "2",
            "--log-interval", "1", "--load", str(imp), "--save", str(ck)]
    res = run_train(2, args, tmp_path / "train", timeout=300)
    assert res.returncodes == [0, 0], describe_failure(res)
    assert "imported weights" in res.output, res.output[-2000:]
    assert f"model {hf_dir.name}: vocab {VOCAB}" in res.output, res.output[-2000:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    losses = [float(line.split("lm loss: ")[1].split()[0].rstrip("|")) for line in res.output.splitlines()
              if "lm loss: " in line]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses  # the loss falls
    rc = json.loads(next(ck.glob("iter_*/run_config.json")).read_text())
    assert rc["architecture"]["family"] == "qwen2" and rc["architecture"]["qkv_bias"] is True
    assert rc["hf"]["special_tokens"]["eos_token_id"] == 2

    t2 = time.monotonic()
    convert_megatron_to_hf(str(ck), str(out), tokenizer=str(hf_dir), progress=False)  # no --model
    hf, base = load_hf(out), load_hf(hf_dir)
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.eos_token_id == 2
    assert hf.generation_config.eos_token_id == [2, 7]
    moved = (hf.model.layers[0].self_attn.q_proj.bias - base.model.layers[0].self_attn.q_proj.bias).abs().max()
    assert moved > 1e-4, "fine-tuning did not change the q bias"
    exported = json.loads((out / "config.json").read_text())  # special ids carried from the import
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (base.config.bos_token_id, base.config.eos_token_id)
    assert exported["bos_token_id"] is not None

    ds = SFTIndexedDataset(prefix)
    conv = [ds[i] for i in range(2)]
    docs = [c.tokens.tolist() for c in conv]
    hf_logits = hf_doc_logits(hf, docs)
    # megatron_pack's model from the training checkpoint (dist checkpoint, model weights only), TP1 here
    monkeypatch.setattr(sys.modules[__name__], "DOCS", docs)
    (meg,) = megatron_logits(tmp_path, [f"1,1,{ck}"], ["--dist"], nprocs=1, monkeypatch=monkeypatch)
    print(f"timing: import {t1 - t0:.1f}s, train {t2 - t1:.1f}s, export+eval {time.monotonic() - t2:.1f}s")
    offsets = np.cumsum([0] + [len(d) for d in docs])
    for c, a, b in zip(conv, offsets[:-1], offsets[1:]):
        toks, mask = c.tokens.tolist(), c.loss_mask.tolist()
        hf_loss = masked_lm_loss(hf_logits[a:b], toks, mask)
        mp_loss = masked_lm_loss(meg[a:b, :VOCAB], toks, mask)
        print(f"loss on a sample: HF {hf_loss:.7f}, megatron_pack {mp_loss:.7f}")
        assert abs(hf_loss - mp_loss) <= TOL, (hf_loss, mp_loss)
        base_loss = masked_lm_loss(hf_doc_logits(base, [toks]), toks, mask)
        assert hf_loss < base_loss, (hf_loss, base_loss)  # the fine-tune learnt the data
        assert abs(base_loss - mp_loss) > 100 * TOL  # negative control: the comparison sees the fine-tune


def test_model_flag_conflicting_with_the_import_is_refused(hf_dirs, tmp_path):
    from megatron_pack.config.cli import parse_args
    from megatron_pack.config.spec import ConfigError
    from megatron_pack.convert import convert_hf_to_megatron
    from megatron_pack.training.setup import resolve_architecture

    imp = tmp_path / "imp"
    convert_hf_to_megatron(str(hf_dirs["qwen2"]), str(imp), progress=False)
    base = ["--data-path", "x", "--train-iters", "1", "--load", str(imp)]
    arch, extras = resolve_architecture(parse_args(base))
    assert arch.family == "qwen2" and extras["special_tokens"]["eos_token_id"] == 2
    same, _ = resolve_architecture(parse_args(base + ["--model", str(hf_dirs["qwen2"])]))  # agrees: accepted
    assert same == arch
    with pytest.raises(ConfigError, match=r"--model tiny: .*differs.*qkv_bias.*\(True, False\)"):
        resolve_architecture(parse_args(base + ["--model", "tiny"]))
