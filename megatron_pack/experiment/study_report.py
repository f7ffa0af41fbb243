"""Tables and figures of the study (:mod:`.study`) from every seed's ``study_seed{S}.json``
(re-runnable alone: ``python -m megatron_pack.experiment --report-only --output-dir OUT``): the
all-seed summary (:func:`.study_seeds.aggregate`) goes to ``OUT/study.json``, the tables to
study.md; figures are the mean over seeds with min-max error bars, each seed a dot."""

from __future__ import annotations

import os

from megatron_pack.experiment.settings import LEAKAGE_PAIR, setting_names
from megatron_pack.experiment.speedup import speedup
from megatron_pack.experiment.study_seeds import aggregate, load_seed_states
from megatron_pack.experiment.tables import rows_table
from megatron_pack.reporting import markdown_table

#: Table order: padding (either), per-step packing, then each of the paper's modes with and
#: without the mask; other settings after them as they come.
ORDER = ("padding", "padding:pad_to=longest", "padding+sample", "bfd@step", "bfd@step+sample",
         *setting_names()[1:])


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None else fmt.format(x)


def _s(sp, fmt=_f):
    """mean [min-max] over seeds; the mean alone for one seed."""
    if sp is None:
        return "n/a"
    if sp["n"] < 2:
        return fmt(sp["mean"])
    return f"{fmt(sp['mean'])} [{fmt(sp['min'])}, {fmt(sp['max'])}]"


def _sf(fmt):
    return lambda x: _f(x, fmt)


def ordered(agg: dict) -> list:
    st = agg["settings"]
    return [(k, st[k]) for k in ORDER if k in st] + [(k, v) for k, v in st.items() if k not in ORDER]


def label(agg: dict) -> str:
    c, p = agg.get("config", {}), agg.get("prepared") or {}
    return (f"preset {c.get('preset')}: {p.get('train_docs')} train / {p.get('heldout_docs')} held-out chats, "
            f"seq {c.get('seq_length')}, batch {c.get('gbs')}, lr {c.get('lr')}, {c.get('epochs')} epoch(s), "
            f"data seed {c.get('data_seed', 1234)}, training seeds {', '.join(map(str, agg['seeds']))}")


def time_table(agg: dict) -> str:
    pad = agg["settings"].get(agg.get("baseline") or "padding")
    x = _sf("{:.2f}x")
    m = lambda key, fmt: lambda ne: _s(ne[1]["metrics"][key], fmt)  # noqa: E731
    ideal = lambda ne: _f(speedup(pad["sequences"], ne[1].get("sequences"), None) if pad else None,  # noqa: E731
                          "{:.2f}x")
    columns = [("setting", lambda ne: ne[0]), ("seeds", lambda ne: str(len(ne[1]["seeds"]))),
               ("sequences", lambda ne: f"{ne[1]['sequences']:,}"), ("steps", lambda ne: str(ne[1]["steps"])),
               ("training time (s)", m("wall_time", _sf("{:.1f}"))), ("speedup (within seed)", m("time_speedup", x)),
               ("steps x median step (s)", m("median_time", _sf("{:.1f}"))),
               ("speedup (median)", m("median_speedup", x)), ("ideal", ideal),
               ("real tokens/s", m("tokens_per_s", _sf("{:.0f}")))]
    return rows_table(ordered(agg), columns)


def speedup_by_seed_table(agg: dict) -> str:
    """Wall-clock speedup over padding per seed: how much of the time spread is machine load."""
    seeds = agg["seeds"]
    heads = ["setting"] + [f"seed {s}" for s in seeds]
    cells = []
    for name, e in ordered(agg):
        by = e["by_seed"]["time_speedup"]
        cells.append([name] + [_f(by.get(s), "{:.2f}x") for s in seeds])
    loads = []
    for s in seeds:
        vals = [x for x in agg["seed_runs"][s]["loadavg_1m"] if x is not None]
        loads.append(f"{min(vals):.1f}-{max(vals):.1f}" if vals else "not recorded")
    cells.append(["1-min load average after each setting"] + loads)
    return markdown_table(heads, cells)


def quality_table(agg: dict) -> str:
    heads = ["model", "seeds", "held-out loss (trainer, mask)", "held-out loss (HF, each chat alone)",
             "± std", "QA answer-contained", "QA exact", "real tokens seen"]
    b = agg.get("base")
    cells = []
    if b:
        g = b["generation"]
        cells.append(["base (no fine-tune)", "-", "", _f(b["heldout_loss_hf"]), "", _pct(g.get("contained")),
                      _pct(g.get("exact")), "0"])
    for name, e in ordered(agg):
        m = e["metrics"]
        h = m["heldout_loss_hf"]
        cells.append([name, str(len(e["seeds"])), _s(m["valid_loss"]), _s(h),
                      _f(h["std"]) if h and h["n"] > 1 else "", _s(m["qa_contained"], _pct),
                      _s(m["qa_exact"], _pct), f"{e['real_tokens_seen']:,}"])
    n = (b or {}).get("generation", {}).get("prompts", 0)
    return (markdown_table(heads, cells) + f"\n\n(mean [min, max] over training seeds; QA: {n} held-out prompts, "
            f"one answer flips a score by {_pct(1 / n if n else None)})")


def leakage_models(agg: dict) -> list:
    out = []
    if (agg.get("base") or {}).get("leakage"):
        out.append(("base", "-", agg["base"]["leakage"]))
    for name in LEAKAGE_PAIR:
        e = agg["settings"].get(name)
        if e and e.get("leakage"):
            tag = f"fine-tuned {name}" + ("" if name.endswith("/nomask") else " (mask)")
            out.append((tag, str(len(e["seeds"])), e["leakage"]))
    return out


def leakage_table(agg: dict) -> str:
    heads = ["model", "seeds", "neighbours", "rows / chats", "leak d=0", "leak d>=128", "sink d=0", "sink d>=128",
             "contamination mean (nats)", "s.e. over chats", "mean abs", "removed sep.", "doubled sep.", "docs scored"]
    cells = []
    sg = _sf("{:+.4f}")
    for name, n, lk in leakage_models(agg):
        for arr, s in lk.items():
            cells.append([name, n, arr, f"{s['sequences']} / {s['documents']}", _s(s["leak_d0"], _pct),
                          _s(s["leak_d128+"], _pct), _s(s["sink_d0"], _pct), _s(s["sink_d128+"], _pct),
                          _s(s["contamination_mean"], sg), _s(s["contamination_se"]), _s(s["contamination_mean_abs"]),
                          _s(s["contamination_removed"], sg), _s(s["contamination_doubled"], sg),
                          str(s["contamination_docs"])])
    return markdown_table(heads, cells)


def comparison_table(agg: dict) -> str:
    heads = ["a", "b", "metric", "mean a - mean b", "a range", "b range", "seeds (a, b)", "verdict"]
    pct = {"qa_contained", "leak_d0", "leak_d128+"}

    def fmt(m, x):
        return _pct(x) if m in pct else _f(x, "{:+.4f}" if m == "contamination_mean" else "{:.4f}")

    cells = []
    for c in agg["comparisons"]:
        m = c["metric"]
        rng = lambda r: "n/a" if r is None else f"[{fmt(m, r[0])}, {fmt(m, r[1])}]"  # noqa: E731
        d = c["diff_mean"]
        cells.append([c["a"], c["b"], m, "n/a" if d is None else (f"{100 * d:+.1f} pt" if m in pct else f"{d:+.4f}"),
                      rng(c["a_range"]), rng(c["b_range"]), f"{c['n'][0]}, {c['n'][1]}", c["verdict"]])
    return markdown_table(heads, cells)


def _bars(ax, names, spreads, colors):
    """Mean bars, min-max error bars, one dot per seed."""
    import numpy as np

    mean = np.array([s["mean"] if s else np.nan for s in spreads])
    # clipped at 0: the mean of equal values can round a hair outside their range
    lo = np.clip([s["mean"] - s["min"] if s else 0 for s in spreads], 0, None)
    hi = np.clip([s["max"] - s["mean"] if s else 0 for s in spreads], 0, None)
    x = np.arange(len(names))
    ax.bar(x, mean, color=colors, yerr=[lo, hi], capsize=4)
    for i, s in enumerate(spreads):
        if s and s["n"] > 1:
            ax.plot([i] * s["n"], s["values"], "k.", ms=4)
    ax.set_xticks(x, names, rotation=45)


def plot_quality(agg: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_pack.files.atomic import save_figure_atomic

    b = agg.get("base")
    one = lambda v: v is not None and {"n": 1, "mean": v, "min": v, "max": v, "values": [v]}  # noqa: E731
    names = (["base"] if b else []) + [n for n, _ in ordered(agg)]
    loss = ([one(b["heldout_loss_hf"])] if b else []) + [e["metrics"]["heldout_loss_hf"] for _, e in ordered(agg)]
    qa = [one(b["generation"].get("contained"))] if b else []
    qa += [e["metrics"]["qa_contained"] for _, e in ordered(agg)]
    qa = [s and {**s, **{k: 100 * s[k] for k in ("mean", "min", "max")}, "values": [100 * v for v in s["values"]]}
          for s in qa]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = ["0.6" if n == "base" else ("tab:red" if n.endswith("/nomask") else "tab:blue") for n in names]
    _bars(axes[0], names, loss, colors)
    axes[0].set_ylabel("held-out loss (nats, HF, each chat alone)")
    lows = [s["min"] for s in loss if s]
    axes[0].set_ylim(min(lows) - 0.1, max(s["max"] for s in loss if s) + 0.05)
    _bars(axes[1], names, qa, colors)
    axes[1].set_ylabel("QA answer-contained (%)")
    fig.suptitle("SmolLM2-135M-Instruct fine-tunes (blue: mask, red: no mask; bars: seed mean, whiskers: min-max, "
                 "dots: seeds).\n" + label(agg), fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def plot_leakage(agg: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_pack.files.atomic import save_figure_atomic

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    models = leakage_models(agg)
    for name, _, lk in models:
        for arr, ls in (("shuffled", "-"), ("file order", "--")):
            if arr not in lk or "by_bucket" not in lk[arr]:
                continue
            bb = lk[arr]["by_bucket"]
            used = [i for i, c in enumerate(bb["counts"]) if c > 0 and bb["leak"][i]]
            x = np.arange(len(used))
            mean = [bb["leak"][i]["mean"] for i in used]
            line, = axes[0].plot(x, mean, ls=ls, marker="o", label=f"{name}, {arr}")
            axes[0].fill_between(x, [bb["leak"][i]["min"] for i in used], [bb["leak"][i]["max"] for i in used],
                                 color=line.get_color(), alpha=0.2)
            axes[0].set_xticks(x, [bb["buckets"][i] for i in used], rotation=45)
    axes[0].set_xlabel("distance from the document's start (tokens)")
    axes[0].set_ylabel("attention on earlier documents, sink excluded (layer mean)")
    axes[0].legend(fontsize=7)
    x = np.arange(len(models))
    for arr, off in (("shuffled", -0.2), ("file order", 0.2)):
        sp = [lk.get(arr, {}).get("contamination_mean") for _, _, lk in models]
        mean = [s["mean"] if s else 0.0 for s in sp]
        err = np.clip([[s["mean"] - s["min"] if s else 0 for s in sp], [s["max"] - s["mean"] if s else 0 for s in sp]],
                      0, None)
        axes[1].bar(x + off, mean, width=0.4, yerr=err, capsize=4, label=f"{arr} neighbours")
        for i, s in enumerate(sp):
            if s and s["n"] > 1:
                axes[1].plot([i + off] * s["n"], s["values"], "k.", ms=4)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xticks(x, [n for n, _, _ in models], rotation=15)
    axes[1].set_ylabel("loss packed after others minus alone (nats)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Leakage without the mask, before/after fine-tuning (mean over seeds, min-max).\n" + label(agg),
                 fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def curve_seed(states: dict) -> int:
    """The seed whose loss curves are plotted: the one with the most settings, lowest seed first."""
    return max(states, key=lambda s: (len(states[s].get("rows", {})), -s))


def write_report(states: dict, out: str) -> str:
    from megatron_pack.experiment.compare import plot_curves
    from megatron_pack.files.atomic import write_json_atomic

    agg = aggregate(states)
    write_json_atomic(agg, os.path.join(out, "study.json"))
    parts = [f"Real-model study ({label(agg)}). Mean [min, max] over training seeds; the held-out chats, QA "
             f"prompts and leakage rows are the same for every seed."]
    if agg["settings"]:
        base = agg.get("baseline") or "padding"
        parts += [f"\n### Training time (speedup over {base}, computed within each seed)\n", time_table(agg),
                  f"\nWall-clock speedup over {base}, per seed:\n", speedup_by_seed_table(agg)]
        cs = curve_seed(states)
        rows = [dict(r) for r in states[cs]["rows"].values()]
        if rows:
            plot_curves(rows, os.path.join(out, "loss_vs_time.png"))
            parts.append(f"\n(loss_vs_time.png: the curves of seed {cs})")
    parts += ["\n### Quality\n", quality_table(agg)]
    parts += ["\n### Leakage without the mask (same held-out rows for every model; layer mean)\n", leakage_table(agg)]
    parts += ["\n### Differences against the seed spread (ranges over seeds; the base model has no training noise)\n",
              comparison_table(agg)]
    mc = (agg.get("base") or {}).get("mask_check")
    if mc:
        parts.append(f"\nScored with the document mask (the measurement's check, base model): largest attention "
                     f"figure {mc['attention_max']:.1e}, largest |contamination| "
                     f"{mc['contamination_max_abs']:.1e} nats.")
    wanted = agg.get("config", {}).get("settings", [])
    for seed, st in states.items():
        missing = [s for s in wanted if s not in st.get("rows", {})]
        if missing:
            parts.append(f"\nSeed {seed}, not run yet (rerun with --seed {seed} to continue): {', '.join(missing)}")
    if agg.get("base"):
        plot_quality(agg, os.path.join(out, "study_quality.png"))
        plot_leakage(agg, os.path.join(out, "study_leakage.png"))
    md = "\n".join(parts) + "\n"
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(md)
    return md


def report_dir(out: str) -> str:
    return write_report(load_seed_states(out), out)

