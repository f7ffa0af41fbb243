"""Work that rank 0 does alone while the other ranks wait, safely past the process group's timeout.

The study scores each fine-tune in transformers on rank 0 (minutes to hours on a big model) while
the other ranks go on to the next training run and block in its first collective. That
collective runs under the process group's timeout (``--distributed-timeout-minutes``, 30 by
default): a long scoring step killed the job there. Here the waiting ranks wait in a barrier of
their own gloo group created with its own, generous timeout, so only that wait is long; the
training collectives keep their short one and still catch a hung rank.
"""

from __future__ import annotations

import datetime

#: How long the other ranks wait for rank 0's scoring by default (a 70B model's QA pass fits).
DEFAULT_WAIT_MINUTES = 24 * 60


class RankZeroWork:
    """``run(fn)``: ``fn()`` on rank 0, every rank leaves together. Create it on every rank at
    the same point (it makes a process group, a collective call) while the default group is up;
    without one (a single process) it is a plain call."""

    def __init__(self, wait_minutes: float = DEFAULT_WAIT_MINUTES):
        import torch.distributed as dist

        self.group = None
        self.rank = 0
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank()
            if dist.get_world_size() > 1:
                self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=wait_minutes))

    def run(self, fn, *args, **kwargs):
        """``fn``'s result on rank 0, None elsewhere, after every rank has reached this point."""
        import torch.distributed as dist

        out = fn(*args, **kwargs) if self.rank == 0 else None
        if self.group is not None:
            dist.barrier(group=self.group)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
