"""Across-seed aggregation for the study (:mod:`.study`): each ``study_seed{S}.json`` is one
training seed's table; this module reduces them to per-setting mean / min / max / std and says,
for the comparisons the study is about, whether a difference is larger than the seed spread.

Why min-max overlap: with 2-3 seeds a standard error is itself noise; "the seed ranges do not
overlap" is the weakest claim the data can carry, and "within noise" when they do."""

from __future__ import annotations

import glob
import json
import math
import os
import re

from megatron_pack.experiment.settings import LEAKAGE_PAIR, baseline_name, quality_pairs
from megatron_pack.experiment.speedup import add_speedups

#: per-setting scalars aggregated over seeds (row key path -> name in the aggregate)
METRICS = {
    "valid_loss": ("valid_loss",), "heldout_loss_hf": ("heldout_loss_hf",),
    "qa_contained": ("generation", "contained"), "qa_exact": ("generation", "exact"),
    "wall_time": ("wall_time",), "median_time": ("median_time",), "tokens_per_s": ("tokens_per_s",),
    "time_speedup": ("time_speedup",), "median_speedup": ("median_speedup",),
    "final_train_loss": ("final_train_loss",), "loadavg_1m": ("loadavg_1m",),
}
#: per-arrangement leakage scalars
LEAK_METRICS = ("leak_d0", "leak_d1", "leak_d128+", "sink_d0", "sink_d128+", "alone_first_d128+", "leak_overall",
                "contamination_mean", "contamination_mean_abs", "contamination_se", "contamination_removed",
                "contamination_doubled")


def load_seed_states(out: str) -> dict[int, dict]:
    """``{seed: state}`` from ``OUT/study_seed*.json``, ascending seed."""
    states = {}
    for path in glob.glob(os.path.join(out, "study_seed*.json")):
        m = re.fullmatch(r"study_seed(-?\d+)\.json", os.path.basename(path))
        if m:
            states[int(m.group(1))] = json.load(open(path))
    return dict(sorted(states.items()))


def spread(values: list) -> dict | None:
    """mean / min / max / sample std (0 for one value) of the non-missing values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": mean, "min": min(v), "max": max(v), "std": std, "values": v}


def _get(row: dict, path: tuple):
    for k in path:
        if not isinstance(row, dict) or k not in row:
            return None
        row = row[k]
    return row


def _with_speedups(state: dict) -> dict:
    """Rows with speedups over the baseline (padding) computed inside the seed (same machine
    load), if it ran."""
    rows = {k: dict(v) for k, v in state.get("rows", {}).items()}
    base = baseline_name(list(rows))
    if base is not None and base.startswith("padding"):
        add_speedups(list(rows.values()), rows[base],
                     {"time_speedup": "wall_time", "median_speedup": "median_time"}, missing=None)
    return rows


def _leakage(sources: list[dict]) -> dict:
    """``{arrangement: {metric: spread}}`` over the given per-seed leakage dicts, plus the
    by-distance leak curve's mean / min / max per bucket."""
    out = {}
    for arr in dict.fromkeys(a for s in sources for a in s):
        present = [s[arr] for s in sources if arr in s]
        agg = {m: spread([p.get(m) for p in present]) for m in LEAK_METRICS}
        curves = [p["by_bucket"] for p in present if p.get("by_bucket")]
        if curves:
            per = list(zip(*[c["leak"] for c in curves]))
            agg["by_bucket"] = {"buckets": curves[0]["buckets"], "counts": curves[0]["counts"],
                                "leak": [spread(list(x)) for x in per]}
        agg["sequences"], agg["documents"] = present[0].get("sequences"), present[0].get("documents")
        agg["contamination_docs"] = present[0].get("contamination_docs")
        out[arr] = agg
    return out


def verdict(a: dict | None, b: dict | None, exact_b: bool = False) -> str:
    """'exceeds seed spread' when both have >= 2 seeds (or ``b`` is exact, e.g. the base model,
    which has no training noise) and the [min, max] ranges do not overlap; 'within noise' when
    they overlap; 'one seed only' otherwise."""
    if a is None or b is None:
        return "missing"
    if a["n"] < 2 or (b["n"] < 2 and not exact_b):
        return "one seed only"
    return "exceeds seed spread" if a["min"] > b["max"] or a["max"] < b["min"] else "within noise"


def _compare(a_name, b_name, metric, a, b, exact_b=False) -> dict:
    return {"a": a_name, "b": b_name, "metric": metric, "a_mean": a and a["mean"], "b_mean": b and b["mean"],
            "diff_mean": (a["mean"] - b["mean"]) if a and b else None,
            "a_range": a and [a["min"], a["max"]], "b_range": b and [b["min"], b["max"]],
            "n": [a and a["n"], b and b["n"]], "verdict": verdict(a, b, exact_b)}


def aggregate(states: dict[int, dict]) -> dict:
    """The all-seed summary written to ``OUT/study.json``."""
    if not states:
        raise ValueError("no study_seed*.json states to aggregate")
    first = next(iter(states.values()))
    base = next((s["base"] for s in states.values() if s.get("base")), None)
    rows = {seed: _with_speedups(s) for seed, s in states.items()}
    names = list(dict.fromkeys(n for r in rows.values() for n in r))
    settings = {}
    for name in names:
        present = {seed: r[name] for seed, r in rows.items() if name in r}
        one = next(iter(present.values()))
        entry = {"seeds": list(present), "mode": one.get("mode"), "document_mask": one.get("document_mask"),
                 "sequences": one.get("sequences"), "steps": one.get("steps"),
                 "real_tokens_seen": one.get("real_tokens_seen"), "efficiency": one.get("efficiency"),
                 "mode_dropped_samples": one.get("mode_dropped_samples"),
                 "metrics": {m: spread([_get(r, p) for r in present.values()]) for m, p in METRICS.items()},
                 "by_seed": {m: {seed: _get(r, p) for seed, r in present.items()} for m, p in METRICS.items()}}
        leaks = [r["leakage"] for r in present.values() if r.get("leakage")]
        if leaks:
            entry["leakage"] = _leakage(leaks)
        settings[name] = entry
    comparisons = []
    baseline = baseline_name(names)
    for a, b in quality_pairs(names, baseline):
        if a in settings and b in settings:
            for m in ("heldout_loss_hf", "qa_contained"):
                comparisons.append(_compare(a, b, m, settings[a]["metrics"][m], settings[b]["metrics"][m]))
    base_leak = _leakage([base["leakage"]]) if base and base.get("leakage") else {}
    for name in LEAKAGE_PAIR:
        lk = settings.get(name, {}).get("leakage", {})
        for arr, agg in lk.items():
            for m in ("leak_d0", "leak_d128+", "contamination_mean"):
                if arr in base_leak:
                    comparisons.append(_compare(f"{name} [{arr}]", f"base [{arr}]", m, agg[m], base_leak[arr][m],
                                                exact_b=True))
        if "file order" in lk and "shuffled" in lk:
            comparisons.append(_compare(f"{name} [file order]", f"{name} [shuffled]", "contamination_mean",
                                        lk["file order"]["contamination_mean"], lk["shuffled"]["contamination_mean"]))
    nomask, mask = LEAKAGE_PAIR
    if nomask in settings and mask in settings:
        a, b = settings[nomask].get("leakage", {}), settings[mask].get("leakage", {})
        for m in ("leak_d0", "contamination_mean"):
            if "shuffled" in a and "shuffled" in b:
                comparisons.append(_compare(f"{nomask} [shuffled]", f"{mask} [shuffled]", m,
                                            a["shuffled"][m], b["shuffled"][m]))
    config = {k: v for k, v in first.get("config", {}).items() if k not in ("seed", "max_minutes")}
    return {"seeds": list(states), "per_seed_files": [f"study_seed{s}.json" for s in states],
            "config": config, "prepared": first.get("prepared"), "baseline": baseline,
            "base": base and {"heldout_loss_hf": base.get("heldout_loss_hf"), "generation": base.get("generation"),
                              "leakage": base_leak, "mask_check": base.get("mask_check")},
            "settings": settings, "comparisons": comparisons,
            "seed_runs": {s: {"settings": list(st.get("rows", {})), "loadavg_1m": [r.get("loadavg_1m") for r in
                                                                                 st.get("rows", {}).values()]}
                          for s, st in states.items()}}
