"""Expected per-step compute imbalance of a packing plan, with and without balanced placement.

What ``tools/pack_report.py`` and the planner print before a run: the plan's sequences in
the order the training stream serves them (:meth:`PackedSFTDataset.set_epoch`'s seeded
permutation), cut into global batches, each step placed contiguously (Megatron's default)
and by :func:`megatron_pack.data.balance.place`. Step time follows the slowest DP rank, so::

    slowdown = sum over steps of max-rank cost / sum over steps of mean-rank cost

multiplies a perfectly balanced step time (the planner's FLOP estimate) and
``gain = slowdown(contiguous) / slowdown(balanced)``. Only the first ``max_steps`` steps are
placed (the figures settle within a few hundred; the placement of a large step costs ms).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_pack.data.balance import contiguous, lower_bound, place, sequence_costs

DEFAULT_MAX_STEPS = 256


@dataclass
class Forecast:
    steps: int
    """steps placed (at most max_steps of the epoch)"""
    sequences_per_rank: int
    imbalance_contiguous: float
    """mean over steps of max/mean rank cost"""
    imbalance_balanced: float
    worst_contiguous: float
    worst_balanced: float
    slowdown_contiguous: float
    slowdown_balanced: float
    bound: float = 1.0
    """mean over steps of a lower bound on max/mean for any placement of the step's sequences
    (the heaviest sequence with the lightest others, or the mean): balanced near it means
    the remaining imbalance is the packing's, not the placement's"""

    @property
    def gain(self) -> float:
        return self.slowdown_contiguous / self.slowdown_balanced

    def to_json(self) -> dict:
        return {**asdict(self), "gain": self.gain}


def forecast(plan, cost_model, *, global_batch_size: int, dp_size: int, micro_batch_size: int = 1,
             padded_length: int | None = None, document_mask: bool = True, seed: int = 1234, epoch: int = 0,
             shuffle: bool = True, max_steps: int = DEFAULT_MAX_STEPS) -> Forecast:
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(f"global batch size {global_batch_size} is not a multiple of micro batch size "
                         f"{micro_batch_size} x DP {dp_size}")
    n = plan.num_sequences
    costs = sequence_costs(plan, cost_model, padded_length=padded_length or plan.max_seq_length,
                           document_mask=document_mask)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)  # as set_epoch
    steps = min(n // global_batch_size, max_steps)
    base = contiguous(global_batch_size, dp_size, micro_batch_size)
    per = {"contiguous": [], "balanced": []}
    means, bounds = [], []
    for k in range(steps):
        c = costs[order[k * global_batch_size:(k + 1) * global_batch_size]]
        mean = c.sum() / dp_size
        means.append(mean)
        bounds.append(lower_bound(c, dp_size) / mean)
        for name, placement in (("contiguous", base), ("balanced", place(c, dp_size, micro_batch_size))):
            per[name].append(max(c[[i for mb in r for i in mb]].sum() for r in placement) / mean)
    if not steps:
        return Forecast(0, global_batch_size // dp_size, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    means = np.asarray(means)
    slow = {name: float(np.dot(np.asarray(v), means) / means.sum()) for name, v in per.items()}
    return Forecast(steps, global_batch_size // dp_size, float(np.mean(per["contiguous"])),
                    float(np.mean(per["balanced"])), float(np.max(per["contiguous"])),
                    float(np.max(per["balanced"])), slow["contiguous"], slow["balanced"], float(np.mean(bounds)))


def format_forecasts(rows: dict, dp_size: int, global_batch_size: int) -> str:
    """A Markdown table, one row per mode (``rows``: mode -> :class:`Forecast`)."""
    from megatron_pack.reporting import markdown_table

    cells = [[mode, f"{f.steps:,}", f"{f.sequences_per_rank}", f"{f.imbalance_contiguous:.3f}",
              f"{f.worst_contiguous:.3f}", f"{f.imbalance_balanced:.3f}", f"{f.worst_balanced:.3f}",
              f"{f.bound:.3f}", f"{f.gain:.3f}x"] for mode, f in rows.items()]
    head = ["mode", "steps", "seq/rank", "max/mean contiguous", "worst", "max/mean balanced", "worst",
            "lower bound", "step-time gain"]
    return (f"Compute imbalance per step over DP {dp_size} (global batch {global_batch_size}; "
            f"cost = linear + attention FLOPs per sequence):\n" + markdown_table(head, cells))
