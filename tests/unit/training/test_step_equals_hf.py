"""megatron_pack's first training step equals transformers' on the same documents.

A tiny random HF Llama and Qwen2 (built here, saved to a temporary HF directory) go the way a
user takes them: ``convert_hf_to_megatron`` -> ``python -m megatron_pack.train --load IMPORT``
(parsed by the real CLI, run in this process) with ``bfd`` packing and the document mask, one
step of plain SGD (no clipping, no weight decay) -> ``convert_megatron_to_hf``. transformers
then runs the same conversations one per row (padded, labels -100 outside the loss mask)::

    megatron_pack (bfd, mask on)         transformers (one conversation per row)
    [a a a b b c c c . .]  cu_seqlens     [a a a . .]   labels: a's tokens where trained,
    [d d d d e e . . . .]  per row        [b b . . .]           -100 elsewhere
                                          ...

Both losses are the mean over every supervised token of the batch (megatron_pack divides the
global batch's summed token losses by its supervised-token count; transformers' causal-LM
loss averages over the labels that are not -100 of the one batch), so they must agree, and
so must the exported weights after the step (``W - lr * grad``), to fp32 noise. The
negative control trains the same rows with ``--no-document-mask``: attention crosses the
conversations of a row and the loss moves far outside the tolerance.

The real small model (``MEGATRON_PACK_SMALL_MODEL``, default where ``scripts/fetch_small_model.sh``
puts SmolLM2-135M-Instruct) runs the same comparison; skipped when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 300
SEQ = 256
LR = 1.0  # plain SGD: a large step keeps W - lr*grad well above fp32 rounding of W
LOSS_RTOL = 1e-5
COMMON = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def hf_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=500000.0)
    return transformers.Qwen2Config(**COMMON, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False)


def save_hf_model(family: str, path: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family)).float()
    if family == "qwen2":  # HF initialises the q/k/v biases to zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def conversations(seed: int = 0, n: int = 9, vocab: int = VOCAB):
    """(tokens, loss_mask) of multi-turn chats: a prompt, then 1-3 (answer, follow-up) turns."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks, mask, turns = [], [], []
        for turn in range(int(rng.integers(1, 4))):
            turns.append(len(toks))
            prompt, answer = int(rng.integers(4, 30)), int(rng.integers(3, 40))
            toks += rng.integers(3, vocab, prompt + answer).tolist()
            mask += [0] * prompt + [1] * answer
        out.append((toks, mask, turns))
    return out


def write_dataset(prefix: str, convs) -> str:
    from megatron_pack.files.indexed import SFTDatasetWriter

    with SFTDatasetWriter(prefix) as w:
        for toks, mask, turns in convs:
            w.add(toks, mask, turns)
    return prefix


def num_sequences(convs, mode: str = "bfd") -> int:
    from megatron_pack.packing.plan import build_plan

    return build_plan([len(c[0]) for c in convs], SEQ, mode).num_sequences


def megatron_step(hf_dir: Path, prefix: str, n_seq: int, work: Path, *, mask: bool):
    """One SGD step the user's way (the global batch = every sequence, several micro-batches);
    returns (first-step loss, lr, exported HF state dict)."""
    micro = 2 if n_seq % 2 == 0 and n_seq > 2 else 1
    from megatron_pack.config.cli import parse_args
    from megatron_pack.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_pack.parallel import cpu_compat
    from megatron_pack.training.loop import train

    imp, ck, out = work / "import", work / "ckpt", work / "exported"
    if not imp.exists():
        convert_hf_to_megatron(str(hf_dir), str(imp), progress=False)
    args = ["--load", str(imp), "--save", str(ck), "--data-path", prefix, "--seq-length", str(SEQ),
            "--pack-mode", "bfd", "--micro-batch-size", str(micro), "--global-batch-size", str(n_seq),
            "--train-iters", "1", "--optimizer", "sgd", "--lr", str(LR), "--lr-decay-style", "constant",
            "--clip-grad", "0", "--weight-decay", "0", "--valid-fraction", "0", "--log-interval", "1000"]
    if not mask:
        args.append("--no-document-mask")
    try:
        res = train(parse_args(args))
    finally:
        cpu_compat.disable()  # process-wide: the CPU redirection tests expect it off
    step = res["history"][0]
    assert res["num_train_sequences"] == n_seq and step["skipped"] == 0
    convert_megatron_to_hf(str(ck), str(out), progress=False)
    return step["lm loss"], step["learning rate"], _load_state(out)


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def hf_step(hf_dir: Path, convs, lr: float):
    """transformers' loss of the conversations one per row, and its weights after SGD(lr)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.train()
    width = max(len(c[0]) for c in convs)
    ids = torch.zeros(len(convs), width, dtype=torch.long)
    att = torch.zeros(len(convs), width, dtype=torch.long)
    labels = torch.full((len(convs), width), -100, dtype=torch.long)
    for i, (toks, mask, _) in enumerate(convs):
        t = torch.tensor(toks)
        ids[i, : len(toks)], att[i, : len(toks)] = t, 1
        labels[i, : len(toks)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, torch.tensor(-100))
    loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return float(loss), state


def compare_updates(before: dict, meg: dict, hf: dict) -> dict:
    """Largest gap between the two updates (W_after - W_before) relative to the largest update."""
    worst, biggest = 0.0, 0.0
    for name in meg:
        w0 = before[name]
        d_meg, d_hf = meg[name].double() - w0.double(), hf[name].double() - w0.double()
        worst = max(worst, (d_meg - d_hf).abs().max().item())
        biggest = max(biggest, d_hf.abs().max().item())
    return {"max_update": biggest, "max_gap": worst, "rel_gap": worst / biggest}


def run_comparison(hf_dir: Path, convs, tmp_path: Path, *, negative_control: bool = True) -> dict:
    prefix = write_dataset(str(tmp_path / "sft"), convs)
    n_seq = num_sequences(convs)
    assert n_seq < len(convs), "bfd must pack several conversations into a row for the test to mean anything"
    before = _load_state(hf_dir)
    loss, lr, after = megatron_step(hf_dir, prefix, n_seq, tmp_path / "on", mask=True)
    assert lr == LR
    hf_loss, hf_after = hf_step(hf_dir, convs, lr)
    # every exported tensor compared; a tied model's export has no lm_head.weight of its own
    assert set(after) <= set(before) and set(after) <= set(hf_after), set(after) ^ set(before)
    assert set(before) - set(after) <= {"lm_head.weight"}
    res = {"loss": loss, "hf_loss": hf_loss, **compare_updates(before, after, hf_after)}
    if negative_control:
        res["loss_no_mask"] = megatron_step(hf_dir, prefix, n_seq, tmp_path / "off", mask=False)[0]
    print(res)
    return res


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_first_step_loss_and_update_equal_transformers(family, tmp_path):
    hf_dir = save_hf_model(family, tmp_path / "hf")
    res = run_comparison(hf_dir, conversations(seed=1), tmp_path)
    assert res["loss"] > 3.0  # a random model on a 300-token vocabulary
    assert abs(res["loss"] - res["hf_loss"]) <= LOSS_RTOL * res["hf_loss"], res
    assert res["max_update"] > 1e-2, res  # the step really moved the weights
    assert res["rel_gap"] <= 1e-5, res
    # negative control: the same packed rows without the document mask
    assert abs(res["loss_no_mask"] - res["hf_loss"]) > 100 * LOSS_RTOL * res["hf_loss"], res


def test_negative_control_an_off_by_one_label_breaks_the_comparison(tmp_path):
    """The HF side is sensitive to the label alignment the contract fixes: shifting the loss
    mask by one token moves transformers' loss outside the tolerance."""
    hf_dir = save_hf_model("llama", tmp_path / "hf")
    convs = conversations(seed=1)
    shifted = [(t, [0] + m[:-1], s) for t, m, s in convs]
    a, _ = hf_step(hf_dir, convs, LR)
    b, _ = hf_step(hf_dir, shifted, LR)
    assert abs(a - b) > 100 * LOSS_RTOL * a


# The real small model: MEGATRON_PACK_SMALL_MODEL, else where scripts/fetch_small_model.sh puts it.
SMALL = os.environ.get("MEGATRON_PACK_SMALL_MODEL") or os.path.join(
    os.environ.get("MEGATRON_PACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_pack"),
    "smollm2-135m-instruct",
)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SMALL, "config.json")),
    reason=f"no HF model at {SMALL}: run scripts/fetch_small_model.sh or set "
    "MEGATRON_PACK_SMALL_MODEL (nothing downloads in tests)",
)
def test_first_step_equals_transformers_on_the_real_small_model(tmp_path):
    cfg = json.loads(Path(SMALL, "config.json").read_text())
    convs = conversations(seed=2, n=6, vocab=min(int(cfg["vocab_size"]), 32000))
    res = run_comparison(Path(SMALL), convs, tmp_path, negative_control=False)
    # SmolLM2-135M (30 layers, tied embeddings), measured: loss 1.3e-7 relative, update 1.7e-6
    assert abs(res["loss"] - res["hf_loss"]) <= LOSS_RTOL * res["hf_loss"], res
    assert res["max_update"] > 1e-2 and res["rel_gap"] <= 2e-5, res
