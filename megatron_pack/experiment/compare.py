"""Train the same model from the same initial weights under several packing settings and
compare them the way "Packing Analysis" (arXiv 2410.08081) does, on your data.

Every run gets the same training flags except ``--pack-mode``/``--no-document-mask``: the same
seed (so the same initial weights and held-out split), the same number of epochs, and the same
held-out evaluation (``--eval-pack-mode`` with the document mask, whatever the run trained
with), ``evals_per_run`` times per run so loss can be plotted against wall time and tokens.
Outputs, under ``output_dir``::

    results.json        every number: settings, rows, held-out curves
    time.md             training time and steps per setting, speedup over padding (Table 5 shape)
    loss.md             held-out and final training loss per setting
    loss_vs_time.png    held-out loss against training seconds and against real tokens seen
    runs/<setting>.jsonl  each run's step log

Collective under torchrun (every rank calls it; rank 0 writes). Training seconds exclude the
evaluations and are the sum of step times; ``steps x median step`` is beside it because on a
shared machine one stalled step can decide a sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import numpy as np

from megatron_pack.experiment.settings import Setting, baseline
from megatron_pack.experiment.tables import column, rows_table
from megatron_pack.files.atomic import save_figure_atomic, write_json_atomic


def setting_config(base, setting: Setting, log_file: str, eval_interval: int | None, save: str | None = None):
    """``base`` (a TrainConfig) with the setting's packing, its own log, and no checkpoints
    unless ``save`` (then the final one only, for a study that scores the trained model)."""
    d, p = base.data, base.data.packing
    packing = dataclasses.replace(p, pack_mode=setting.mode, document_mask=setting.document_mask,
                                  pack_scope=setting.pack_scope)
    return dataclasses.replace(
        base,
        data=dataclasses.replace(d, packing=packing),
        train=dataclasses.replace(base.train, eval_interval=eval_interval, loss_weighting=setting.loss_weighting),
        checkpoint=dataclasses.replace(base.checkpoint, save=save, load=None, save_interval=None, exit_interval=None),
        logging=dataclasses.replace(base.logging, log_file=log_file),
    )


def planned_run(base, setting: Setting) -> dict:
    """Sequences, steps and drops of a setting's training split: the datasets training builds
    (:func:`megatron_pack.config.datasets.build_datasets`: blends, CP/document padding), planned
    without the cache (every rank computes the same numbers, nothing is written)."""
    from megatron_pack.config.datasets import build_datasets
    from megatron_pack.data.sampling import epochs_to_iters

    t = base.train
    spec = setting_config(base, setting, log_file=None, eval_interval=None)
    ds = build_datasets(spec, use_cache=False, with_valid=False).train
    steps = t.train_iters or epochs_to_iters(ds, t.global_batch_size, t.train_epochs)
    s = ds.plan.stats
    return {"sequences": len(ds), "steps": int(steps), "mode_dropped_samples": s.mode_dropped_docs,
            "mode_dropped_tokens": s.mode_dropped_tokens, "dropped_samples": s.dropped_docs,
            "efficiency": float(ds.plan.efficiency)}


def _curve(log_file: str, history: list) -> list[dict]:
    """Held-out points of a run's log, placed at the training seconds and tokens before them."""
    secs = np.cumsum([h["seconds"] for h in history])
    toks = np.cumsum([h["real tokens"] for h in history])
    out = []
    if not os.path.isfile(log_file):
        return out
    with open(log_file) as f:
        for line in f:
            rec = json.loads(line)
            if "validation lm loss" in rec and 1 <= rec["iteration"] <= len(history):
                k = rec["iteration"] - 1
                out.append({"iteration": rec["iteration"], "train_seconds": float(secs[k]),
                            "real_tokens_seen": int(toks[k]), "valid_loss": rec["validation lm loss"]})
    return out


def run_setting(base, setting: Setting, output_dir: str, evals_per_run: int = 4, save: str | None = None) -> dict:
    """Train one setting; the row of figures the tables are made of. ``save``: keep the final
    checkpoint there."""
    from megatron_pack.training.loop import train

    planned = planned_run(base, setting)
    log_file = os.path.join(output_dir, "runs", setting.name.replace("/", "_").replace(":", "_") + ".jsonl")
    if os.path.exists(log_file):
        os.remove(log_file)
    interval = max(1, math.ceil(planned["steps"] / max(1, evals_per_run))) if evals_per_run else None
    res = train(setting_config(base, setting, log_file, interval, save))
    hist = res["history"]
    timed = hist[1:] or hist  # the first step pays for warm-up
    step_s = float(np.median([h["seconds"] for h in timed]))
    real = float(np.mean([h["real tokens"] for h in timed]))
    return {
        "setting": setting.name, "mode": setting.mode, "document_mask": setting.document_mask,
        "pack_scope": setting.pack_scope, "loss_weighting": setting.loss_weighting,
        **planned, "steps": res["iteration"], "sequences": res["num_train_sequences"],
        "wall_time": float(res["wall_time"]), "step_s": step_s, "median_time": step_s * res["iteration"],
        "tokens_per_s": real / step_s if step_s else float("nan"),
        "real_tokens_seen": int(sum(h["real tokens"] for h in hist)),
        "supervised_tokens_seen": int(sum(h["tokens"] for h in hist)),
        "final_train_loss": res["final_train_loss"], "valid_loss": res["valid_loss"],
        "padding_fraction": res["padding_fraction"], "curve": _curve(log_file, hist), "log_file": log_file,
    }


def add_speedups(rows: list[dict], base_name: str) -> None:
    """Speedups over the baseline row (:mod:`.speedup`): measured time (the paper's), steps x
    median step time, real tokens/s, and the ideal (baseline sequences / the row's)."""
    from megatron_pack.experiment.speedup import add_speedups as add
    from megatron_pack.experiment.speedup import speedup

    b = next(r for r in rows if r["setting"] == base_name)
    add(rows, b, {"time_speedup": "wall_time", "median_speedup": "median_time"})
    for r in rows:
        r["speedup"] = speedup(r["tokens_per_s"], b["tokens_per_s"])  # a rate: the row's over the baseline's
    add(rows, b, {"ideal_speedup": "sequences"})


TIME_COLUMNS = [
    column("setting", "setting"), column("sequences", "sequences", "{:,}"), column("steps", "steps"),
    column("training time (s)", "wall_time", "{:.1f}"), column("speedup", "time_speedup", "{:.2f}x"),
    column("steps x median step (s)", "median_time", "{:.1f}"),
    column("speedup (median)", "median_speedup", "{:.2f}x"), column("ideal", "ideal_speedup", "{:.2f}x"),
    column("real tokens/s", "tokens_per_s", "{:,.0f}"), column("dropped samples", "mode_dropped_samples"),
]
LOSS_COLUMNS = [
    column("setting", "setting"), column("held-out loss", "valid_loss", "{:.4f}", "n/a"),
    column("final train loss", "final_train_loss", "{:.4f}", "n/a"),
    column("real tokens seen", "real_tokens_seen", "{:,}"),
    column("supervised tokens seen", "supervised_tokens_seen", "{:,}"),
]


def time_table(rows: list[dict]) -> str:
    """The paper's Table 5 shape: training time and steps per setting, speedup over padding."""
    return rows_table(rows, TIME_COLUMNS)


def loss_table(rows: list[dict]) -> str:
    return rows_table(rows, LOSS_COLUMNS)


def plot_curves(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    kind = lambda r: r["setting"].replace("/nomask", "")  # noqa: E731  (a mode with its scope and weighting)
    modes = list(dict.fromkeys(kind(r) for r in rows))
    colors = plt.get_cmap("tab10" if len(modes) <= 10 else "tab20")
    for r in rows:
        c = r["curve"]
        if not c:
            continue
        y = [p["valid_loss"] for p in c]
        style = dict(marker="o", label=r["setting"], color=colors(modes.index(kind(r))),
                     ls="-" if r["document_mask"] else "--")  # one colour per setting's kind, dashed without the mask
        axes[0].plot([p["train_seconds"] for p in c], y, **style)
        axes[1].plot([p["real_tokens_seen"] for p in c], y, **style)
    axes[0].set_xlabel("training seconds (evaluation excluded)")
    axes[1].set_xlabel("real tokens seen")
    axes[0].set_ylabel("held-out loss (document mask, same for every run)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


@contextlib.contextmanager
def one_process_group(base):
    """Hold one process group (and Megatron-Core's groups) for every run of a comparison.

    ``train()`` creates and destroys the group when none is up, but under torchrun (``env://``
    on one MASTER_PORT) a second rendezvous in the same processes hangs: rank 1 waited forever at
    the second setting. With a group up, ``train()`` joins it and leaves it up."""
    import torch.distributed as dist

    from megatron_pack.parallel import destroy_distributed, initialize_distributed

    owns = not (dist.is_available() and dist.is_initialized())
    if owns:
        p = base.parallel
        initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                               backend=p.distributed_backend, timeout_minutes=p.distributed_timeout_minutes)
    try:
        yield
    finally:
        if owns:
            destroy_distributed()


def run_comparison(base, settings: list[Setting], output_dir: str, evals_per_run: int = 4,
                   log=print) -> dict:
    """Train every setting from ``base`` (a TrainConfig) and write the outputs (rank 0).
    Returns ``{"rows": [...], "baseline": name, "time_table": md, "loss_table": md, ...}``."""
    if not settings:
        raise ValueError("no settings to compare")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"settings repeat: {names}")
    main = int(os.environ.get("RANK", "0")) == 0
    os.makedirs(os.path.join(output_dir, "runs"), exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    with one_process_group(base):
        for s in settings:
            if main:
                log(f"\n=== {s.name} ===")
            rows.append(run_setting(base, s, output_dir, evals_per_run))
    base_name = baseline(settings).name
    add_speedups(rows, base_name)
    out = {"baseline": base_name, "rows": rows, "time_table": time_table(rows), "loss_table": loss_table(rows),
           "config": dataclasses.asdict(base), "total_seconds": time.perf_counter() - t0}
    if main:
        with open(os.path.join(output_dir, "time.md"), "w") as f:
            f.write(out["time_table"] + "\n")
        with open(os.path.join(output_dir, "loss.md"), "w") as f:
            f.write(out["loss_table"] + "\n")
        out["plot"] = plot_curves(rows, os.path.join(output_dir, "loss_vs_time.png"))
        write_json_atomic(out, os.path.join(output_dir, "results.json"))
    return out
