"""HF Llama interop end to end: a tiny random ``LlamaForCausalLM`` (transformers, CPU, no
download) -> ``hf-to-megatron`` -> megatron_pack logits equal HF's at TP1, TP2 and PP2; the CLI
round trip through TP2 x PP2 gives back identical tensors; fine-tuning the import with
``python -m megatron_pack.train --load IMPORT`` and exporting gives a HF model whose loss
equals megatron_pack's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import launcher
from _launch_train import REPO, describe_failure, make_dataset, run_train

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 128: padded to 384 at TP1 and 512 at TP2
WORKER = Path(__file__).with_name("_convert_worker.py")
# Two documents packed in one row: megatron_pack sees them with cu_seqlens, HF one at a time.
DOCS = [[5, 17, 250, 3, 99, 101, 7, 7, 42, 288, 1], [260, 2, 33, 150, 299, 8, 64, 12, 9]]


def tiny_llama(path: Path, seed: int = 0):
    """The ``tiny`` preset's architecture (so training can use ``--model tiny``), random weights
    with std 0.1 so logits are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    return model


def hf_doc_logits(model, docs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([d])).logits[0] for d in docs])


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
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    path.mkdir()
    tiny_llama(path)
    return path


def test_logits_equal_hf_at_tp1_tp2_pp2(hf_dir, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from megatron_pack.convert import convert_hf_to_megatron

    layouts = []
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out = tmp_path / f"meg_tp{tp}_pp{pp}"
        convert_hf_to_megatron(str(hf_dir), str(out), tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, progress=False)
        layouts.append(f"{tp},{pp},{out}")
    ref = hf_doc_logits(LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval(), DOCS)
    assert ref.shape == (20, VOCAB) and ref.std() > 0.3
    for layout, logits in zip(layouts, megatron_logits(tmp_path, layouts, monkeypatch=monkeypatch)):
        padded = 384 if layout.startswith("1,") else 512
        assert logits.shape == (20, padded), layout
        diff = (logits[:, :VOCAB] - ref).abs().max().item()
        assert diff <= 1e-4, f"{layout}: max |megatron - HF| = {diff}"
        assert not logits[:, VOCAB:].any(), "padded vocabulary rows must be zero"


def test_round_trip_tp2_pp2_identical_tensors(hf_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    meg, back = tmp_path / "meg", tmp_path / "back"
    convert("hf-to-megatron", "--hf-dir", str(hf_dir), "--output", str(meg), "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--tokenizer", str(hf_dir))
    assert (meg / "tokenizer" / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    convert("megatron-to-hf", "--load", str(meg), "--output", str(back), "--max-shard-size", "100KB")
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
    hf = LlamaForCausalLM.from_pretrained(str(back)).float().eval()  # transformers reads config + index
    ref = LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    assert torch.equal(hf_doc_logits(hf, DOCS), hf_doc_logits(ref, DOCS))


def masked_lm_loss(logits: torch.Tensor, tokens: list, mask: list) -> float:
    """Mean CE of predicting tokens[t+1] where its loss-mask flag is set (the batch contract)."""
    tgt = torch.tensor(tokens[1:])
    w = torch.tensor(mask[1:], dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:-1].double(), tgt, reduction="none")
    return float((ce * w).sum() / w.sum())


def test_finetune_import_export_hf_loss_equals_megatron(hf_dir, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from megatron_pack.files.indexed import SFTIndexedDataset

    prefix = make_dataset(str(tmp_path / "sft"), n=48, seed=3)
    imp, ck, out = tmp_path / "imported", tmp_path / "ckpt", tmp_path / "exported"
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf

    t0 = time.monotonic()
    convert_hf_to_megatron(str(hf_dir), str(imp), tensor_model_parallel_size=2, progress=False)
    t1 = time.monotonic()
    args = ["--model", "tiny", "--vocab-size", str(VOCAB), "--data-path", prefix, "--seq-length", "256",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
            "--valid-fraction", "0", "--tensor-model-parallel-size", "2", "--load", str(imp), "--save", str(ck)]
    res = run_train(2, args, tmp_path / "train", timeout=200)
    assert res.returncodes == [0, 0], describe_failure(res)
    assert "imported weights" in res.output, res.output[-2000:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    t2 = time.monotonic()
    convert_megatron_to_hf(str(ck), str(out), tokenizer=str(hf_dir), progress=False)  # a TP2 dist checkpoint
    hf = LlamaForCausalLM.from_pretrained(str(out)).float().eval()
    base = LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    exported = json.loads((out / "config.json").read_text())  # from the import the run started from
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (base.config.bos_token_id, base.config.eos_token_id)
    assert exported["bos_token_id"] is not None
    moved = (hf.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight).abs().max()
    assert moved > 1e-4, "fine-tuning did not change the weights"

    ds = SFTIndexedDataset(prefix)
    conv = [ds[i] for i in range(2)]
    docs = [c.tokens.tolist() for c in conv]
    hf_logits = hf_doc_logits(hf, docs)
    # megatron_pack's model from the training checkpoint (dist checkpoint, model weights only), TP1 here
    monkeypatch.setattr(sys.modules[__name__], "DOCS", docs)
    (meg,) = megatron_logits(tmp_path, [f"1,1,{ck}"], ["--dist", "--vocab-size", str(VOCAB)], nprocs=1,
                             monkeypatch=monkeypatch)
    print(f"timing: import {t1 - t0:.1f}s, train {t2 - t1:.1f}s, export+eval {time.monotonic() - t2:.1f}s")
    offsets = np.cumsum([0] + [len(d) for d in docs])
    for c, a, b in zip(conv, offsets[:-1], offsets[1:]):
        toks, mask = c.tokens.tolist(), c.loss_mask.tolist()
        hf_loss = masked_lm_loss(hf_logits[a:b], toks, mask)
        mp_loss = masked_lm_loss(meg[a:b, :VOCAB], toks, mask)
        print(f"loss on a sample: HF {hf_loss:.6f}, megatron_pack {mp_loss:.6f} (over the padded vocabulary: "
              f"{masked_lm_loss(meg[a:b], toks, mask):.6f})")
        assert abs(hf_loss - mp_loss) <= 1e-4, (hf_loss, mp_loss)
        base_loss = masked_lm_loss(hf_doc_logits(base, [toks]), toks, mask)
        assert hf_loss < base_loss, (hf_loss, base_loss)  # the fine-tune learnt the data
