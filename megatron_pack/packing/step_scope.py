"""Per-step packing (``--pack-scope step``): the padded run's steps, each packed on its own.

A padded run's epoch serves its conversations (the ``padding`` plan's items, one per row) in
the order ``order`` and step ``k`` takes ``G = --global-batch-size`` of them. Per-step
packing keeps exactly those steps and packs each one with best-fit decreasing into as few
rows as it needs; no row spans two steps::

    padded epoch order    c7 c2 c5 c0 | c3 c6 c1 c4 | c8 (tail, dropped as in the padded run)
    step plan (G = 4)     step 0: [c7 c2] [c5 c0]    step 1: [c6 c1 c4] [c3]
    step_offsets          [0, 2, 4]  (step k is rows step_offsets[k] .. step_offsets[k + 1])

With the document mask and a token mean over the step the loss and gradient are the padded
step's; only the number of rows (and of micro-batches) changes from step to step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_pack.packing.modes import Engine, _engine
from megatron_pack.packing.plan import PackingPlan

PACK_SCOPES = ("epoch", "step")


@dataclasses.dataclass
class StepPlan:
    """A :class:`PackingPlan` of the epoch's steps (rows in step order) and where each step starts."""

    plan: PackingPlan
    step_offsets: np.ndarray  # int64 [steps + 1]

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    def rows_per_step(self) -> np.ndarray:
        return np.diff(self.step_offsets)


def build_step_plan(padding_plan: PackingPlan, order, global_batch_size: int, *, pad_multiple: int = 1,
                    engine: Engine = "cpp") -> StepPlan:
    """Pack every full step of ``order`` (the padded epoch order of ``padding_plan``'s rows) with
    best-fit decreasing at ``padding_plan``'s capacity; lengths rounded up to ``pad_multiple``
    (context parallelism) as the plans of every other scope are."""
    if global_batch_size < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch_size}")
    if np.any(padding_plan.pieces_per_sequence() != 1):
        raise ValueError("per-step packing starts from a padding plan (one item per row)")
    order = np.asarray(order, dtype=np.int64)
    steps = order.size // global_batch_size
    items = np.take(padding_plan.pieces, order[: steps * global_batch_size], axis=0)
    lengths = np.ascontiguousarray(items[:, 2] - items[:, 1])
    if pad_multiple > 1:
        lengths = -(-lengths // pad_multiple) * pad_multiple
    groups = np.arange(0, steps * global_batch_size + 1, global_batch_size, dtype=np.int64)
    item, seq_offsets, step_offsets = _engine(engine).pack_bfd_groups(lengths, groups, padding_plan.max_seq_length)
    pieces = np.ascontiguousarray(np.take(items, np.asarray(item, dtype=np.int64), axis=0))
    stats = dataclasses.replace(padding_plan.stats, placed_tokens=int((items[:, 2] - items[:, 1]).sum()))
    plan = PackingPlan(pieces=pieces, seq_offsets=np.asarray(seq_offsets, dtype=np.int64),
                       max_seq_length=padding_plan.max_seq_length, mode=f"bfd per step of {global_batch_size}",
                       stats=stats)
    return StepPlan(plan, np.asarray(step_offsets, dtype=np.int64))


def padded_epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order a padded run serves its rows in (``PackedSFTDataset``'s shuffled order)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def spread(rows: np.ndarray) -> dict:
    """``{min, mean, max}`` rows per step: what the logs, ``pack_report`` and the planner show."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(rows.min()), "mean": float(rows.mean()), "max": int(rows.max())}
