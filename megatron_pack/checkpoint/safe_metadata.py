"""The one place a checkpoint's pickled metadata is read: a restricted unpickler.

torch.distributed.checkpoint stores its index (``.metadata``) as a pickle and unpickles it
on load; every path that opens a dist checkpoint reads it here first.
"""

from __future__ import annotations

import os
import pickle

import torch

from megatron_pack.checkpoint.layout import CheckpointError

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        ok = module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
        if not ok:
            raise CheckpointError(f"checkpoint metadata references {module}.{name}, which a torch_dist checkpoint "
                                  "never holds; refusing to load it")
        return super().find_class(module, name)


def check_dist_metadata(iter_path: str) -> None:
    """torch.distributed.checkpoint keeps its index (``.metadata``) as a pickle and unpickles it on
    load. Unpickle it first with an allow-list of DCP's own classes: the stream is the same bytes,
    so if this passes, torch's load constructs nothing else."""
    path = os.path.join(iter_path, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_path}: no .metadata (not a torch_dist checkpoint directory)")
    with open(path, "rb") as f:
        try:
            _MetadataUnpickler(f).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:  # truncated or corrupt
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
