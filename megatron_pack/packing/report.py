"""Compare packing modes on a length distribution: a table, JSON rows and plots.

``report(lengths, max_seq_length, modes)`` plans every mode and returns one dict per mode;
``format_table(rows)`` renders them; ``plot_report`` draws fill-ratio and length
histograms. ``tools/pack_report.py`` is the command-line front-end.

Columns: sequences, packing efficiency (real tokens / sequences * max length), the lower
bound ceil(tokens / max length) and the gap to it, samples per sequence, samples split by
the mode / cut at turns / truncated / dropped / left out with no trained target (as training
leaves them out, read from the dataset's loss mask), attention cost sum(s_i^2) relative to
``padding`` (with the document mask, s_i are segments; without it, whole sequences),
and planning seconds.
"""

from __future__ import annotations

import os
import time

import numpy as np

from megatron_pack.files.atomic import save_figure_atomic, write_json_atomic
from megatron_pack.packing.modes import DEFAULT_MODES, get_mode
from megatron_pack.packing.plan import PackingPlan, build_plan
from megatron_pack.packing.step_scope import spread
from megatron_pack.reporting import markdown_table


def _sum_sq(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.dot(x, x))


def plan_row(plan: PackingPlan, seconds: float, padding_cost: float) -> dict:
    """The report row of one plan; ``padding_cost`` = sum of squared item lengths."""
    s = plan.stats
    lb = plan.lower_bound_sequences
    per_seq = plan.pieces_per_sequence()
    lb_eff = s.placed_tokens / max(1, lb * plan.max_seq_length)
    return {
        "mode": plan.mode,
        "num_sequences": int(plan.num_sequences),
        "efficiency": float(plan.efficiency),
        "lower_bound_sequences": int(lb),
        "lower_bound_efficiency": float(lb_eff),
        "gap_sequences": int(plan.num_sequences - lb),
        "gap_points": float(100.0 * (lb_eff - plan.efficiency)),
        "samples_per_sequence_mean": float(per_seq.mean()) if per_seq.size else 0.0,
        "samples_per_sequence_max": int(per_seq.max(initial=0)),
        "split_samples": int(s.split_items),
        "turn_split_samples": int(s.turn_split_docs),
        "truncated_samples": int(s.truncated_docs),
        "dropped_samples": int(s.dropped_docs),
        "placed_tokens": int(s.placed_tokens),
        "truncated_tokens": int(s.truncated_tokens),
        "dropped_tokens": int(s.dropped_tokens),
        "unsupervised_samples": int(s.unsupervised_items),  # no trained target left: not packed, as in training
        "unsupervised_tokens": int(s.unsupervised_tokens),
        "mode_dropped_samples": int(s.mode_dropped_docs),  # paper-code variants: in dropped_* already
        "mode_dropped_tokens": int(s.mode_dropped_tokens),
        "attention_cost_doc_mask": _sum_sq(plan.piece_lengths) / max(padding_cost, 1.0),
        "attention_cost_no_mask": _sum_sq(plan.sequence_lengths()) / max(padding_cost, 1.0),
        "seconds": float(seconds),
    }


def report(
    lengths,
    max_seq_length: int,
    modes=DEFAULT_MODES,
    *,
    seed: int = 1234,
    epoch: int = 0,
    overlong: str = "truncate",
    turn_starts=None,
    engine: str = "cpp",
    plans: dict | None = None,
    supervised=None,
    step_global_batch_size: int | None = None,
) -> list[dict]:
    """Plan ``lengths`` with every mode; one row per mode (see module docstring).

    ``step_global_batch_size``: add the row of ``--pack-scope step`` (:func:`step_scope_row`).

    ``supervised`` is :func:`~megatron_pack.packing.plan.build_plan`'s: with
    ``dataset_supervised(dataset)`` items left without a trained target are left out and counted,
    exactly as the trainer's plan does. Pass a dict as ``plans`` to get the plans back too
    (name -> :class:`PackingPlan`).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    padding_cost = None
    rows = []
    kw = dict(seed=seed, epoch=epoch, overlong=overlong, turn_starts=turn_starts, engine=engine, supervised=supervised)
    for spec in modes:
        mode = get_mode(spec)
        t0 = time.perf_counter()
        plan = build_plan(lengths, max_seq_length, mode, seed=seed, epoch=epoch, overlong=overlong,
                          turn_starts=turn_starts, engine=engine, supervised=supervised)
        seconds = time.perf_counter() - t0
        if padding_cost is None:
            # segments of the padding baseline = the items after the over-long policy
            base = build_plan(lengths, max_seq_length, "padding", overlong=overlong, turn_starts=turn_starts,
                              supervised=supervised)
            padding_cost = _sum_sq(base.piece_lengths)
        rows.append(plan_row(plan, seconds, padding_cost))
        if plans is not None:
            plans[str(mode)] = plan
    if step_global_batch_size is not None:
        rows.append(step_scope_row(lengths, max_seq_length, step_global_batch_size, padding_cost=padding_cost, **kw))
    return rows


def step_scope_row(lengths, max_seq_length: int, global_batch_size: int, *, padding_cost: float | None = None,
                   seed: int = 1234, epoch: int = 0, overlong: str = "truncate", turn_starts=None,
                   engine: str = "cpp", supervised=None) -> dict:
    """The report row of ``--pack-scope step``: the padded run's steps of ``global_batch_size``
    conversations (its epoch order, ``seed``/``epoch``), each packed by bfd; adds ``steps`` and
    ``rows_per_step`` (min/mean/max). Planning seconds include the padding plan."""
    from megatron_pack.packing.step_scope import build_step_plan, padded_epoch_order

    t0 = time.perf_counter()
    padding = build_plan(lengths, max_seq_length, "padding", seed=seed, epoch=epoch, overlong=overlong,
                         turn_starts=turn_starts, engine=engine, supervised=supervised)
    steps = build_step_plan(padding, padded_epoch_order(padding.num_sequences, seed, epoch), global_batch_size,
                            engine=engine)
    seconds = time.perf_counter() - t0
    if padding_cost is None:
        padding_cost = _sum_sq(padding.piece_lengths)
    row = plan_row(steps.plan, seconds, padding_cost)
    row["mode"] = f"bfd per step of {global_batch_size}"
    row.update(scope="step", steps=steps.num_steps, rows_per_step=spread(steps.rows_per_step()))
    return row


def format_scope_table(rows: list[dict], global_batch_size: int) -> str:
    """Steps and rows per step of every row at ``global_batch_size``: epoch scope steps take that
    many rows (sequences), the per-step row that many conversations in however many rows they need."""
    cells = []
    for r in rows:
        if r.get("scope") == "step":
            rs = r["rows_per_step"]
            cells.append([r["mode"], "step", f"{r['steps']:,}", f"{r['num_sequences']:,}", str(rs["min"]),
                          f"{rs['mean']:.2f}", str(rs["max"])])
        else:
            g = str(global_batch_size)
            cells.append([r["mode"], "epoch", f"{r['num_sequences'] // global_batch_size:,}",
                          f"{r['num_sequences'] // global_batch_size * global_batch_size:,}", g, g, g])
    return markdown_table(["mode", "scope", "steps", "rows", "rows/step min", "mean", "max"], cells)


_COLUMNS = [
    ("mode", "mode", "{}"),
    ("sequences", "num_sequences", "{:,}"),
    ("efficiency", "efficiency", "{:.2%}"),
    ("lower bound", "lower_bound_sequences", "{:,}"),
    ("gap (seq)", "gap_sequences", "{:,}"),
    ("gap (pts)", "gap_points", "{:.2f}"),
    ("samples/seq", "samples_per_sequence_mean", "{:.2f}"),
    ("max", "samples_per_sequence_max", "{}"),
    ("split", "split_samples", "{:,}"),
    ("turn-split", "turn_split_samples", "{:,}"),
    ("truncated", "truncated_samples", "{:,}"),
    ("dropped", "dropped_samples", "{:,}"),
    ("unsupervised", "unsupervised_samples", "{:,}"),
    ("attn doc-mask", "attention_cost_doc_mask", "{:.3f}"),
    ("attn no-mask", "attention_cost_no_mask", "{:.3f}"),
    ("seconds", "seconds", "{:.3f}"),
]


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one row per mode (Markdown-compatible)."""
    cells = [[fmt.format(r[key]) for _, key, fmt in _COLUMNS] for r in rows]
    return markdown_table([h for h, _, _ in _COLUMNS], cells)


#: (line style, width) per mode in plot order: thick solid first, thinner dashed/dotted on top.
PLOT_STYLES = (("-", 3.0), ("--", 2.4), (":", 2.4), ("-.", 1.8), ((0, (6, 2, 1, 2)), 1.4), ((0, (1, 1)), 1.0))


def plot_report(plans: dict, lengths, max_seq_length: int, out_png: str) -> str:
    """Fill-ratio histogram per mode and the sample-length histogram, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fill, ax_len) = plt.subplots(1, 2, figsize=(13, 4.5))
    bins = np.linspace(0, 1, 51)
    for i, (name, plan) in enumerate(plans.items()):
        fill = plan.sequence_lengths() / plan.max_seq_length
        # modes that pack alike (bfd, windowed_bfd) draw identical steps: style and width tell them apart
        style, width = PLOT_STYLES[i % len(PLOT_STYLES)]
        ax_fill.hist(fill, bins=bins, histtype="step", linestyle=style, linewidth=width,
                     label=f"{name} ({plan.efficiency:.1%})", weights=np.full(fill.size, 1.0 / max(fill.size, 1)))
    ax_fill.set(xlabel="sequence fill ratio (real tokens / max length)", ylabel="fraction of sequences",
                title=f"fill ratio per mode, max length {max_seq_length}")
    ax_fill.legend(fontsize=8)
    lengths = np.asarray(lengths)
    ax_len.hist(lengths, bins=100, color="tab:gray")
    ax_len.axvline(max_seq_length, color="tab:red", linestyle="--", label=f"max length {max_seq_length}")
    ax_len.set(xlabel="sample length (tokens)", ylabel="samples", yscale="log",
               title=f"{lengths.size:,} samples, {int(lengths.sum()):,} tokens")
    ax_len.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, out_png)


def load_lengths(data_prefix: str | None = None, lengths_file: str | None = None):
    """``(lengths, turn_starts, supervised)`` from an SFT indexed dataset or a 1-D integer ``.npy``;
    ``supervised`` (the trainer's count of trained targets per item) is None for a bare ``.npy``."""
    if (data_prefix is None) == (lengths_file is None):
        raise ValueError("give exactly one of data_prefix and lengths_file")
    if data_prefix is not None:
        from megatron_pack.files.indexed import SFTIndexedDataset
        from megatron_pack.packing.plan import dataset_supervised

        ds = SFTIndexedDataset(data_prefix)
        return ds.lengths, ds.turns, dataset_supervised(ds)
    if not os.path.exists(lengths_file):
        raise FileNotFoundError(f"{lengths_file}: no such lengths file")
    try:
        lengths = np.load(lengths_file, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{lengths_file}: not a readable .npy file ({e})") from e
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"{lengths_file}: expected a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"{lengths_file}: negative length at index {int(np.argmin(lengths))}")
    return lengths.astype(np.int64), None, None


def run(
    max_seq_length: int,
    *,
    data_prefix: str | None = None,
    lengths_file: str | None = None,
    modes=DEFAULT_MODES,
    seed: int = 1234,
    overlong: str = "truncate",
    json_out: str | None = None,
    plot_out: str | None = None,
    plans: dict | None = None,
    step_global_batch_size: int | None = None,
) -> list[dict]:
    """What ``tools/pack_report.py`` does: load, report, print the table, write JSON/PNG.
    Pass a dict as ``plans`` to get the plans back (mode name -> plan)."""
    lengths, turns, supervised = load_lengths(data_prefix, lengths_file)
    if plans is None and plot_out:
        plans = {}
    rows = report(lengths, max_seq_length, modes, seed=seed, overlong=overlong, turn_starts=turns, plans=plans,
                  supervised=supervised, step_global_batch_size=step_global_batch_size)
    src = data_prefix or lengths_file
    print(f"{src}: {lengths.size:,} samples, {int(lengths.sum()):,} tokens, max length {max_seq_length}, "
          f"over-long policy {overlong}"
          + ("" if supervised else "; a lengths file has no loss mask, so items without a trained target are "
                                   "not left out as training leaves them"))
    print(format_table(rows))
    if step_global_batch_size is not None:
        print(f"\nsteps of --global-batch-size {step_global_batch_size} (epoch scope: sequences; step scope: "
              "conversations, the padded run's steps):")
        print(format_scope_table(rows, step_global_batch_size))
    if json_out:
        write_json_atomic(rows, json_out)
        print(f"wrote {json_out}")
    if plot_out:
        plot_report(plans, lengths, max_seq_length, plot_out)
        print(f"wrote {plot_out}")
    return rows
