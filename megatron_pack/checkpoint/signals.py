"""SIGTERM turned into a collective "save and stop" request at a step boundary."""

from __future__ import annotations

import signal

import torch


class SignalHandler:
    """Remembers a SIGTERM instead of dying, so the loop can save at a step boundary.

    ``stop_requested()`` is collective (a max over all ranks) so every rank sees the same
    answer even if the signal reached them at different moments.
    """

    def __init__(self, sig=signal.SIGTERM):
        self.sig = sig
        self.received = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(self.sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
        return False

    def stop_requested(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
