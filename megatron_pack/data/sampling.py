"""The training stream: global batches for one DP rank, resumable at any step.

The split is :mod:`megatron_pack.data.split`, the datasets :mod:`megatron_pack.data.datasets`,
the held-out batches :mod:`megatron_pack.data.eval_batches`.

Every rank, on every pipeline stage and TP rank, builds the same datasets and iterates the
same micro-batches for its data-parallel rank. Intermediate pipeline stages ignore the
tokens but still need ``cu_seqlens`` for their attention layers (a known Megatron-LM bug is
stages without them), so each stage derives its ``PackedSeqParams`` from its own copy.

Order of sequences within an epoch (``G`` = global batch, ``D`` = data-parallel ranks)::

    epoch order (PackedSFTDataset.set_epoch permutation):  s0 s1 s2 ... s_{N-1}
    step k takes s[kG : (k+1)G]; DP rank r takes s[kG + r*G/D : kG + (r+1)*G/D],
    cut into micro-batches of --micro-batch-size.

With a ``BatchBalancer`` (:mod:`megatron_pack.data.balance`, on by default when DP > 1 or
PP > 1) step k still takes s[kG : (k+1)G], but which rank and micro-batch gets each
sequence is chosen to even out their compute (a pure function of the step's sequences).

The position is ``(epoch, step in epoch)``, saved in checkpoints; the last partial global
batch of an epoch is dropped (as Megatron does) so every step has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_pack.data.collate import collate_thd, trim_to_longest, trimmed_length
from megatron_pack.data.packed_dataset import PackedSFTDataset


def steps_in_epoch(num_sequences: int, global_batch_size: int) -> int:
    return num_sequences // global_batch_size


@dataclass
class DataPosition:
    """Where the train stream is: checkpointed, so ``--load`` continues with the next batch."""

    epoch: int = 0
    step_in_epoch: int = 0
    consumed_samples: int = 0  # sequences over the whole run (Megatron's "consumed samples")
    consumed_conversations: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "DataPosition":
        return cls(**{k: int(v) for k, v in sd.items() if k in cls.__dataclass_fields__})


def _annotate(dataset: PackedSFTDataset, idx: list, batch: dict) -> dict:
    """Add per-batch counters the logs need: samples placed and capacity."""
    counts = dataset.plan.pieces_per_sequence()[dataset.order[np.asarray(idx)]]
    batch["num_samples"] = torch.tensor(int(counts.sum()), dtype=torch.int64)
    batch["capacity"] = torch.tensor(batch["tokens"].numel(), dtype=torch.int64)  # cut with pad_to=longest
    return batch


class TrainStream:
    """Global batches of the training split for one DP rank, resumable at any step.

    ``next_step()`` returns the list of micro-batches (THD-collated dicts) of the next
    global batch, moving to the next epoch (new plan for shuffling modes, new order) when
    the current one runs out.
    """

    def __init__(self, dataset: PackedSFTDataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, position: DataPosition | None = None, balancer=None):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch size * DP")
        self.ds, self.gbs, self.mbs = dataset, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pos = position or DataPosition()
        self.balancer = balancer  # a data.balance.BatchBalancer, or None: contiguous placement
        if self.ds.epoch != self.pos.epoch:
            self.ds.set_epoch(self.pos.epoch)
        self._check_epoch_size()

    def _check_epoch_size(self):
        if steps_in_epoch(len(self.ds), self.gbs) == 0:
            raise ValueError(f"epoch {self.ds.epoch} has {len(self.ds)} sequences, fewer than one global batch "
                             f"({self.gbs}); lower --global-batch-size or add data")

    def next_step(self) -> list:
        if self.pos.step_in_epoch >= steps_in_epoch(len(self.ds), self.gbs):
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
            self.ds.set_epoch(self.pos.epoch)
            self._check_epoch_size()
        start = self.pos.step_in_epoch * self.gbs
        idx = np.arange(start, start + self.gbs)
        per_rank = self.gbs // self.dp_size
        seqs = self.ds.order[idx]
        balance = {}
        if self.balancer is None:  # contiguous: rank r takes the r-th slice, cut into micro-batches
            placement = [
                [np.arange(r * per_rank + i, r * per_rank + i + self.mbs) for i in range(0, per_rank, self.mbs)]
                for r in range(self.dp_size)
            ]
        else:
            placement, balance = self.balancer.placement(self.ds, seqs)
        micro = [self.micro_batch(idx[mb].tolist()) for mb in placement[self.dp_rank]]
        samples = int(self.ds.plan.pieces_per_sequence()[seqs].sum())
        # Global-batch figures for the logs, from the plan: no communication needed.
        capacity = self.gbs * self.ds.padded_length
        if self.ds.mode.pads_to_longest:  # each micro-batch as long as its longest sequence
            lens = self.ds.used_lengths(seqs)  # real tokens; CP: up to the last padded document's end
            m = self.ds.pad_multiple
            capacity = 0
            for mb in (mb for rank in placement for mb in rank):
                longest = int(lens[mb].max())
                capacity += trimmed_length(longest, m, self.ds.padded_length) * len(mb)
        self.last_stats = {
            "real_tokens": int(self.ds.plan.sequence_lengths()[seqs].sum()),
            "samples": samples,
            "capacity": capacity,
            **balance,
        }
        self.pos.step_in_epoch += 1
        self.pos.consumed_samples += self.gbs
        self.pos.consumed_conversations += samples
        return micro

    def micro_batch(self, idx: list) -> dict:
        items = [self.ds[i] for i in idx]
        if self.ds.mode.pads_to_longest:
            items = trim_to_longest(items, self.ds.pad_multiple)
        return _annotate(self.ds, idx, collate_thd(items))


def epochs_to_iters(dataset: PackedSFTDataset, global_batch_size: int, epochs: float) -> int:
    """Optimizer steps in ``epochs`` passes; shuffling modes re-plan each epoch, so the
    number of sequences (and steps) may differ slightly from epoch to epoch."""
    whole, frac = int(epochs), epochs - int(epochs)
    saved = dataset.epoch
    total = 0
    for e in range(whole + (1 if frac > 0 else 0)):
        if dataset.epoch != e:
            dataset.set_epoch(e)
        n = getattr(dataset, "num_steps", None)  # per-step scope: the padded run's steps
        n = steps_in_epoch(len(dataset), global_batch_size) if n is None else n
        total += n if e < whole else int(n * frac)
    if dataset.epoch != saved:
        dataset.set_epoch(saved)
    return max(total, 1)
