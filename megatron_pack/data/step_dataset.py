"""``StepPackedDataset``: the rows of per-step packing (``--pack-scope step``) for one epoch.

The padded run's epoch (its cached ``padding`` plan and shuffled order) cut into steps of
``--global-batch-size`` conversations, each step packed on its own by best-fit decreasing
(:mod:`megatron_pack.packing.step_scope`); rows are served in step order.
"""

from __future__ import annotations

import numpy as np

from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.packing.step_scope import build_step_plan, spread


class StepPackedDataset(PackedSFTDataset):
    """Rows of the epoch's per-step plan, in step order (``step_offsets`` says where each step starts).

    Takes :class:`PackedSFTDataset`'s arguments (``mode`` is the per-step packer: ``bfd``) and
    ``global_batch_size`` in conversations. The padded run's plan comes from the plan cache,
    so the ``padding`` run and this one share it; the per-step plan is rebuilt from it each
    epoch (deterministic, well under a second for a million conversations).
    """

    def __init__(self, dataset, seq_length: int, mode="bfd", *, global_batch_size: int, **kwargs):
        from megatron_pack.packing.plan import get_mode

        if get_mode(mode).name != "bfd":
            raise ValueError(f"--pack-scope step packs each step with bfd; got --pack-mode {mode}")
        if not kwargs.get("shuffle_sequences", True):
            raise ValueError("per-step packing follows the padded run's shuffled order")
        self.global_batch_size = int(global_batch_size)
        padded_kwargs = {k: v for k, v in kwargs.items() if k not in ("document_mask", "plan")}
        self.padded = PackedSFTDataset(dataset, seq_length, "padding", **padded_kwargs)
        super().__init__(self.padded.data, seq_length, mode, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.padded.epoch != self.epoch:
            self.padded.set_epoch(self.epoch)
        steps = build_step_plan(self.padded.plan, self.padded.order, self.global_batch_size,
                                pad_multiple=self.document_multiple)
        self.plan, self.step_offsets = steps.plan, steps.step_offsets
        self.order = np.arange(self.plan.num_sequences)
        counts = self.plan.pieces_per_sequence()
        self.cu_seqlens_len = int(counts.max(initial=1)) + 1 if self.document_mask else 2

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    def rows_per_step(self) -> np.ndarray:
        return np.diff(self.step_offsets)

    def rows_spread(self) -> dict:
        return spread(self.rows_per_step())

    def empty_row(self) -> dict:
        """A row of padding only (zero loss mask): fills a step up to the same micro-batch count per rank."""
        return self.assemble(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
