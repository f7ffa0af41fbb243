"""Tables and figures of ``bench_real_model_study.py`` from its ``study.json`` (re-runnable alone:
``python benchmarks/bench_real_model_report.py OUT/study.json``)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pack.reporting import markdown_table  # noqa: E402

ORDER = ("padding", "greedy", "greedy/nomask", "random", "random/nomask", "bfd", "bfd/nomask")


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None else fmt.format(x)


def ordered_rows(state: dict) -> list:
    rows = state["rows"]
    return [rows[k] for k in ORDER if k in rows] + [v for k, v in rows.items() if k not in ORDER]


def label(state: dict) -> str:
    c = state.get("config", {})
    p = state.get("prepared", {})
    return (f"preset {c.get('preset')}: {p.get('train_docs')} train / {p.get('heldout_docs')} held-out chats, "
            f"seq {c.get('seq_length')}, batch {c.get('gbs')}, lr {c.get('lr')}, {c.get('epochs')} epoch(s), "
            f"seed {c.get('seed')}; reduced run on a shared, loaded 2-core CPU")


def quality_table(state: dict) -> str:
    heads = ["model", "held-out loss (trainer, mask)", "held-out loss (HF, each chat alone)",
             "QA answer-contained", "QA exact", "real tokens seen"]
    b = state.get("base")
    cells = []
    if b:
        g = b["generation"]
        cells.append(["base (no fine-tune)", "", _f(b["heldout_loss_hf"]), _pct(g.get("contained")),
                      _pct(g.get("exact")), "0"])
    for r in ordered_rows(state):
        g = r["generation"]
        cells.append([r["setting"], _f(r["valid_loss"]), _f(r["heldout_loss_hf"]), _pct(g.get("contained")),
                      _pct(g.get("exact")), f"{r['real_tokens_seen']:,}"])
    n = (b or {}).get("generation", {}).get("prompts", 0)
    return markdown_table(heads, cells) + f"\n\n(QA: {n} held-out prompts; one answer flips a score by {_pct(1 / n if n else None)})"


def leakage_models(state: dict) -> list:
    out = []
    if state.get("base", {}).get("leakage"):
        out.append(("base", state["base"]["leakage"]))
    for name in ("greedy/nomask", "greedy"):
        r = state["rows"].get(name)
        if r and r.get("leakage"):
            out.append((f"fine-tuned {name}" + (" (mask)" if name == "greedy" else ""), r["leakage"]))
    return out


def leakage_table(state: dict) -> str:
    heads = ["model", "neighbours", "rows / chats", "leak d=0", "leak d=1", "leak d>=128 (tokens)", "sink d=0",
             "sink d>=128", "own first alone d>=128", "contamination mean (nats)", "± s.e.", "mean abs", "removed sep.",
             "doubled sep.", "docs scored"]
    cells = []
    for name, lk in leakage_models(state):
        for arr, s in lk.items():
            cells.append([name, arr, f"{s['sequences']} / {s['documents']}", _pct(s["leak_d0"]), _pct(s["leak_d1"]),
                          f"{_pct(s['leak_d128+'])} ({s['tokens_d128+']})", _pct(s["sink_d0"]), _pct(s["sink_d128+"]),
                          _pct(s["alone_first_d128+"]), _f(s["contamination_mean"], "{:+.4f}"),
                          _f(s.get("contamination_se")), _f(s["contamination_mean_abs"]), _f(s["contamination_removed"], "{:+.4f}"),
                          _f(s["contamination_doubled"], "{:+.4f}"), str(s["contamination_docs"])])
    return markdown_table(heads, cells)


def plot_quality(state: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_pack.files.atomic import save_figure_atomic

    names = (["base"] if state.get("base") else []) + [r["setting"] for r in ordered_rows(state)]
    src = ([state["base"]] if state.get("base") else []) + ordered_rows(state)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = ["0.6" if n == "base" else ("tab:red" if n.endswith("/nomask") else "tab:blue") for n in names]
    axes[0].bar(names, [s["heldout_loss_hf"] for s in src], color=colors)
    axes[0].set_ylabel("held-out loss (nats, HF, each chat alone)")
    axes[1].bar(names, [100 * (s["generation"].get("contained") or 0) for s in src], color=colors)
    axes[1].set_ylabel("QA answer-contained (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("SmolLM2-135M-Instruct fine-tunes (blue: mask, red: no mask). " + label(state), fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def plot_leakage(state: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_pack.files.atomic import save_figure_atomic

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    models = leakage_models(state)
    for name, lk in models:
        for arr, ls in (("shuffled", "-"), ("file order", "--")):
            if arr not in lk:
                continue
            bb = lk[arr]["by_bucket"]
            used = [i for i, c in enumerate(bb["counts"]) if c > 0]
            axes[0].plot(range(len(used)), [bb["leak"][i] for i in used], ls=ls, marker="o", label=f"{name}, {arr}")
            axes[0].set_xticks(range(len(used)), [bb["buckets"][i] for i in used], rotation=45)
    axes[0].set_xlabel("distance from the document's start (tokens)")
    axes[0].set_ylabel("attention on earlier documents, sink excluded (layer mean)")
    axes[0].legend(fontsize=7)
    x = np.arange(len(models))
    for k, (arr, off) in enumerate((("shuffled", -0.2), ("file order", 0.2))):
        vals = [lk.get(arr, {}).get("contamination_mean") or 0.0 for _, lk in models]
        axes[1].bar(x + off, vals, width=0.4, label=f"{arr} neighbours")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xticks(x, [n for n, _ in models], rotation=15)
    axes[1].set_ylabel("loss packed after others minus alone (nats)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Leakage without the mask, before/after fine-tuning. " + label(state), fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def write_report(state: dict, out: str) -> str:
    from megatron_pack.experiment.compare import add_speedups, plot_curves, time_table

    rows = ordered_rows(state)
    parts = [f"Real-model study ({label(state)})."]
    if rows:
        base = "padding" if "padding" in state["rows"] else rows[0]["setting"]
        add_speedups(rows, base)
        parts += [f"\n### Training time (speedup over {base})\n", time_table(rows)]
        plot_curves(rows, os.path.join(out, "loss_vs_time.png"))
    parts += ["\n### Quality\n", quality_table(state)]
    parts += ["\n### Leakage without the mask (same held-out rows for every model; layer mean)\n", leakage_table(state)]
    mc = state.get("base", {}).get("mask_check")
    if mc:
        parts.append(f"\nScored with the document mask (the measurement's check, base model): largest attention "
                     f"figure {mc['attention_max']:.1e}, largest |contamination| {mc['contamination_max_abs']:.1e} nats.")
    missing = [s for s in state.get("config", {}).get("settings", []) if s not in state["rows"]]
    if missing:
        parts.append(f"\nNot run yet (rerun the same command to continue): {', '.join(missing)}")
    if state.get("base"):
        plot_quality(state, os.path.join(out, "study_quality.png"))
        plot_leakage(state, os.path.join(out, "study_leakage.png"))
    md = "\n".join(parts) + "\n"
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    p = sys.argv[1]
    print(write_report(json.load(open(p)), os.path.dirname(os.path.abspath(p))))
