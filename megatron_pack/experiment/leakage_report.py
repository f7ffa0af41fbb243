"""``tools/analyze_leakage.py``: pick packed sequences from a dataset, load a model, measure
(:mod:`.leakage`), write a table, JSON and a PNG.

The model is an HF Llama directory, or a training checkpoint / HF import of this project,
exported to a temporary HF directory with :func:`convert_megatron_to_hf` first.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np

from megatron_pack.files.atomic import save_figure_atomic, write_json_atomic
from megatron_pack.reporting import markdown_table


def detect_separator(data, limit: int = 10000) -> int | None:
    """The most common last token of the conversations: the template's end token (EOS/eot)."""
    last = Counter()
    for i in range(min(len(data), limit)):
        n = int(data.lengths[i])
        if n:
            last[int(data.get_slice(i, n - 1, n)[0][0])] += 1
    return last.most_common(1)[0][0] if last else None


def pick_sequences(data, seq_length: int, mode: str, max_sequences: int, seed: int = 1234) -> list:
    """Up to ``max_sequences`` sequences of >= 2 documents from ``mode``'s plan (seeded choice),
    each a list of ``(tokens, supervised)`` in packed order."""
    from megatron_pack.packing.plan import build_plan

    plan = build_plan(data.lengths, seq_length, mode, seed=seed)
    multi = np.flatnonzero(plan.pieces_per_sequence() >= 2)
    if multi.size == 0:
        raise ValueError(f"no sequence of {mode} at --seq-length {seq_length} holds two documents; raise it")
    chosen = np.sort(np.random.default_rng(seed).permutation(multi)[:max_sequences])
    return [[data.get_slice(int(d), int(a), int(b)) for d, a, b in plan.sequence(int(i))] for i in chosen]



def documents(data) -> list:
    """Every conversation of ``data`` as ``(tokens, supervised)``, in file order."""
    return [data.get_slice(i, 0, int(data.lengths[i])) for i in range(len(data))]


def rows_in_order(docs: list, seq_length: int, order) -> list:
    """``docs`` taken in ``order`` and cut next-fit into rows of ``seq_length`` (one token of room
    per document, for the doubled-separator variant); the rows holding two or more documents.
    Unlike :func:`pick_sequences` (a packing mode's plan) this keeps the given order, so chats that
    are neighbours in the file stay neighbours in a row."""
    rows, cur, used = [], [], 0
    for i in order:
        n = len(docs[i][0]) + 1
        if cur and used + n > seq_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(docs[i])
        used += n
    rows.append(cur)
    return [r for r in rows if len(r) >= 2]


def neighbour_rows(data, seq_length: int, seed: int) -> dict:
    """The same chats in rows two ways: ``file order`` (same-topic neighbours) and ``shuffled``
    (seeded): how much of the leakage depends on what the neighbours are."""
    import random

    docs = documents(data)
    order = list(range(len(docs)))
    shuffled = order[:]
    random.Random(seed).shuffle(shuffled)
    return {"file order": rows_in_order(docs, seq_length, order), "shuffled": rows_in_order(docs, seq_length, shuffled)}

#: checkpoint.imported.META_NAME and checkpoint.dist's run config, named here because those
#: modules import torch and this is read before any heavy import (a test keeps them equal).
IMPORT_META_NAME = "megatron_pack_import.json"
RUN_CONFIG_NAME = "run_config.json"


def recorded_num_layers(path: str, model_preset: str | None = None) -> int | None:
    """Layers of the model at ``path`` from its JSON alone (HF ``config.json``, an import's or a
    training checkpoint's record, or ``model_preset``), so ``--layers`` is checked before the
    model is loaded; None when nothing records it (then it is checked after loading)."""
    import json

    from megatron_pack.checkpoint.iterations import CheckpointError, resolve_iteration_dir
    from megatron_pack.model.presets import get_preset

    def read(f):
        try:
            with open(f) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not readable JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{f}: expected a JSON object")
        return d

    hf = os.path.join(path, "config.json")
    if os.path.isfile(hf):
        n = read(hf).get("num_hidden_layers")
        return int(n) if isinstance(n, int) else None
    if model_preset:
        return get_preset(model_preset).num_layers
    try:
        d = resolve_iteration_dir(path)
    except CheckpointError:
        return None
    for name in (IMPORT_META_NAME, RUN_CONFIG_NAME):
        f = os.path.join(d, name)
        if os.path.isfile(f):
            rec = read(f)
            arch = rec.get("architecture")
            if isinstance(arch, dict) and isinstance(arch.get("num_layers"), int):
                return arch["num_layers"]
            preset = (rec.get("model") or {}).get("model") if isinstance(rec.get("model"), dict) else None
            return get_preset(preset).num_layers if preset else None
    return None


def load_model(path: str, device: str = "cpu", dtype: str = "float32", model: str | None = None):
    """An HF causal LM from an HF directory, or from a checkpoint/import (exported first)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_pack.experiment.leakage import LOADED_ATTENTION as attention

    torch_dtype = getattr(torch, dtype)
    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attention).to(device)
    from megatron_pack.convert.megatron_to_hf import convert_megatron_to_hf

    with tempfile.TemporaryDirectory(prefix="leakage_hf_") as tmp:
        out = os.path.join(tmp, "hf")
        convert_megatron_to_hf(path, out, dtype="fp32", model=model, progress=False)
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, attn_implementation=attention).to(device)


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def attention_table(att: dict, max_buckets: int = 8) -> str:
    """Per layer: leakage (sink excluded) by distance from the document start, sink, alone."""
    used = [i for i, c in enumerate(att["tokens_per_bucket"]) if c > 0][:max_buckets]
    heads = ["layer"]
    if used:
        last = att["buckets"][used[-1]]
        heads += [f"leak d={att['buckets'][i]}" for i in used] + ["leak all", "sink all", f"sink d={last}",
                                                                   f"own first (alone) d={last}"]
    rows = [["uniform attention"] + [_pct(att["uniform"][i]) for i in used] + ["", "", "", ""]]
    for li, layer in enumerate(att["layers"]):
        rows.append(
            [str(layer)]
            + [_pct(att["leak"][li][i]) for i in used]
            + [
                _pct(att["leak_overall"][li]),
                _pct(att["sink_overall"][li]),
                _pct(att["sink"][li][used[-1]]),
                _pct(att["alone_first"][li][used[-1]]),
            ]
        )
    return markdown_table(heads, rows)


def contamination_table(con: dict) -> str:
    heads = ["separator", "documents", "mean (nats)", "mean abs", "p5", "median", "p95"]
    f = lambda c, k: f"{c[k]:+.4f}" if k in c else "n/a"  # noqa: E731
    rows = [
        [v, str(c.get("documents", 0)), f(c, "mean"), f(c, "mean_abs"), f(c, "p5"), f(c, "p50"), f(c, "p95")]
        for v, c in con.items()
    ]
    return markdown_table(heads, rows)


def plot_leakage(att: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = [i for i, c in enumerate(att["tokens_per_bucket"]) if c > 0]
    x = np.arange(len(used))
    labels = [att["buckets"][i] for i in used]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for li, layer in enumerate(att["layers"]):
        axes[0].plot(x, [att["leak"][li][i] for i in used], marker="o", label=f"layer {layer}")
        (line,) = axes[1].plot(x, [att["sink"][li][i] for i in used], marker="o", label=f"layer {layer}: packed sink")
        axes[1].plot(
            x,
            [att["alone_first"][li][i] for i in used],
            ls="--",
            color=line.get_color(),
            label=f"layer {layer}: own first token, alone",
        )
    axes[0].plot(x, [att["uniform"][i] for i in used], color="k", ls=":", label="uniform attention")
    axes[0].set_title("attention on earlier documents (sink excluded)")
    axes[1].set_title("attention on token 0 (the sink)")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=45)
        ax.set_xlabel("distance from the document's start (tokens)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of the token's attention")
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def run_leakage(
    model_path: str,
    data_prefix: str,
    output_dir: str,
    *,
    seq_length: int = 512,
    mode: str = "greedy",
    max_sequences: int = 8,
    layers=None,
    separator: int | None = None,
    document_mask: bool = False,
    device: str = "cpu",
    seed: int = 1234,
    model_preset: str | None = None,
) -> dict:
    """Measure and write ``leakage.json``, ``leakage.md`` and ``leakage.png`` under ``output_dir``."""
    from megatron_pack.experiment.leakage import analyze_sequences
    from megatron_pack.files.indexed import SFTIndexedDataset

    data = SFTIndexedDataset(data_prefix)
    sep = separator if separator is not None else detect_separator(data)
    sequences = pick_sequences(data, seq_length, mode, max_sequences, seed)
    model = load_model(model_path, device, model=model_preset)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"--layers: {bad} outside [0, {n_layers})")
    res = analyze_sequences(model, sequences, sep, layers, document_mask=document_mask, device=device)
    res.update(
        {
            "model": model_path,
            "data": data_prefix,
            "mode": mode,
            "seq_length": seq_length,
            "sequences": len(sequences),
            "documents": sum(len(s) for s in sequences),
            "separator_id": sep,
            "scored_with_document_mask": document_mask,
        }
    )
    os.makedirs(output_dir, exist_ok=True)
    md = (
        "Attention leakage per layer (mean over heads; `leak`: share on earlier documents, sink excluded; "
        "`sink`: share on token 0; `own first (alone)`: the same document scored alone):\n\n"
        + attention_table(res["attention"])
        + "\n\nLoss contamination (document's loss packed after others minus alone, nats):\n\n"
        + contamination_table(res["contamination"])
        + "\n"
    )
    with open(os.path.join(output_dir, "leakage.md"), "w") as f:
        f.write(md)
    res["plot"] = plot_leakage(res["attention"], os.path.join(output_dir, "leakage.png"))
    write_json_atomic(res, os.path.join(output_dir, "leakage.json"))
    res["markdown"] = md
    return res
