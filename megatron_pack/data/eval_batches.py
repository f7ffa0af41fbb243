"""The held-out split as global batches: every sequence scored once, the same micro-batch
count on every rank."""

from __future__ import annotations

import numpy as np

from megatron_pack.data.collate import collate_thd
from megatron_pack.data.packed_dataset import PackedSFTDataset


def eval_batches(dataset: PackedSFTDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, max_steps: int | None = None, balancer=None):
    """The held-out split as global batches (lists of micro-batches) for one DP rank.

    The tail that does not fill a global batch is kept: ranks without a sequence for a
    micro-batch get an all-padding one (zero loss mask), so every token is scored exactly
    once and the micro-batch count is the same on every rank. ``balancer`` (the
    :class:`~megatron_pack.data.balance.BatchBalancer` of training's ``--balance-batches``)
    places each step's sequences on ranks and micro-batches as training does, the tail's
    empty fillers counting as free; ``None``: contiguous, rank ``r`` takes the ``r``-th block.
    Placement changes no figure: every sequence is still scored once, only where.
    """
    from megatron_pack.data.balance import contiguous

    n = len(dataset)
    steps = -(-n // global_batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    for s in range(steps):
        lo = s * global_batch_size
        real = min(global_batch_size, n - lo)
        if balancer is None:
            placement = contiguous(global_batch_size, dp_size, micro_batch_size)
        else:
            placement, _ = balancer.placement(dataset, dataset.order[lo:lo + real], fillers=global_batch_size - real)
        yield [collate_thd([dataset[lo + p] if p < real else _empty_item(dataset) for p in mb])
               for mb in placement[dp_rank]]


def _empty_item(dataset: PackedSFTDataset) -> dict:
    return dataset.assemble(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
