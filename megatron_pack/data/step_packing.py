"""The per-step packed training stream (``--pack-scope step``).

:class:`~megatron_pack.data.step_dataset.StepPackedDataset` serves an epoch's rows: the padded
run's steps (same conversations, same order, same seed), each packed by best-fit decreasing.
:class:`StepTrainStream` hands step ``k``'s rows to the ranks::

    step k: R rows  ->  rounded up to a multiple of D * micro-batch size with empty rows
                        (all-zero loss mask: they add nothing to the loss, its count or a gradient)
                    ->  placed on D ranks and micro-batches by the compute balancer
                        (data/balance.py), or contiguously when it is off
                    ->  without pipeline parallelism (shapes may vary, as for padding:pad_to=longest)
                        the empty rows are left out again: a micro-batch keeps its real rows, cut
                        to its longest one (as padding:pad_to=longest does), one with none becomes a
                        single empty row of the smallest legal length

so every DP rank (and each of its pipeline stages) runs the same number of micro-batches in a
step, while that number may change from step to step (Megatron-Core's schedules take it per call).
E.g. R = 5, D = 2, micro-batch size 2: 8 slots, 2 micro-batches per rank; with PP 1 rank 0 runs
rows [a b] [c], rank 1 [d e] [empty] (the empty one a few tokens long). The data position is
``(epoch, step in epoch)`` as for every scope.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_pack.data.balance import contiguous
from megatron_pack.data.collate import collate_thd, trim_to_longest, trimmed_length
from megatron_pack.data.sampling import TrainStream
from megatron_pack.data.step_dataset import StepPackedDataset


class StepTrainStream(TrainStream):
    """:class:`~megatron_pack.data.sampling.TrainStream` for a :class:`StepPackedDataset`: step ``k``
    is its ``k``-th group of rows (a variable count), placed on ranks and micro-batches."""

    #: Pipeline parallelism sends fixed-shape activations between stages: keep every micro-batch
    #: at micro-batch size x padded length (empty rows included). False (PP 1): real rows only.
    fixed_shapes = True

    def _check_epoch_size(self):
        if self.ds.num_steps == 0:
            raise ValueError(f"epoch {self.ds.epoch} has {len(self.ds.padded)} conversations, fewer than one "
                             f"global batch ({self.gbs}); lower --global-batch-size or add data")

    def next_step(self) -> list:
        if self.pos.step_in_epoch >= self.ds.num_steps:
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
            self.ds.set_epoch(self.pos.epoch)
            self._check_epoch_size()
        k = self.pos.step_in_epoch
        rows = np.arange(self.ds.step_offsets[k], self.ds.step_offsets[k + 1])
        unit = self.dp_size * self.mbs
        fillers = -(-rows.size // unit) * unit - rows.size
        balance = {}
        if self.balancer is None:
            placement = contiguous(rows.size + fillers, self.dp_size, self.mbs)
        else:
            placement, balance = self.balancer.placement(self.ds, rows, fillers=fillers)
        micro = [self._micro_batch(rows, mb) for mb in placement[self.dp_rank]]
        samples = int(self.ds.plan.pieces_per_sequence()[rows].sum())
        self.last_stats = {"real_tokens": int(self.ds.plan.sequence_lengths()[rows].sum()), "samples": samples,
                           "capacity": sum(self._computed_tokens(rows, mb) for r in placement for mb in r),
                           "rows": int(rows.size), "micro_batches": len(placement[self.dp_rank]), **balance}
        self.pos.step_in_epoch += 1
        self.pos.consumed_samples += self.gbs  # conversations, as the padded run counts them
        self.pos.consumed_conversations += samples
        return micro

    def _computed_tokens(self, rows: np.ndarray, positions) -> int:
        """Tokens the micro-batch at ``positions`` runs through the model (for the padding fraction)."""
        if self.fixed_shapes:
            return len(positions) * self.ds.padded_length
        lens = self.ds.used_lengths(rows[[p for p in positions if p < rows.size]])
        longest = trimmed_length(int(lens.max(initial=0)), self.ds.pad_multiple, self.ds.padded_length)
        return max(1, lens.size) * longest

    def _micro_batch(self, rows: np.ndarray, positions) -> dict:
        real = [int(rows[p]) for p in positions if p < rows.size]
        if self.fixed_shapes:
            items = [self.ds[int(rows[p])] if p < rows.size else self.ds.empty_row() for p in positions]
        else:
            items = trim_to_longest([self.ds[r] for r in real] or [self.ds.empty_row()], self.ds.pad_multiple)
        batch = collate_thd(items)
        batch["num_samples"] = torch.tensor(int(self.ds.plan.pieces_per_sequence()[real].sum()), dtype=torch.int64)
        batch["capacity"] = torch.tensor(batch["tokens"].numel(), dtype=torch.int64)
        return batch


def train_stream(dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 position=None, balancer=None, fixed_shapes: bool = True) -> TrainStream:
    """The stream for ``dataset``'s scope: per step for a :class:`StepPackedDataset`, else per epoch.
    ``fixed_shapes`` (pipeline parallelism): per-step micro-batches keep their empty rows."""
    if not isinstance(dataset, StepPackedDataset):
        return TrainStream(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size, position, balancer=balancer)
    stream = StepTrainStream(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size, position,
                             balancer=balancer)
    stream.fixed_shapes = fixed_shapes
    return stream


def steps_per_epoch(dataset, global_batch_size: int) -> int | None:
    """Steps of the current epoch when the dataset fixes them itself (per-step scope), else None."""
    return dataset.num_steps if isinstance(dataset, StepPackedDataset) else None
