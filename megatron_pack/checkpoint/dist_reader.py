"""Reading training (dist) checkpoints one tensor or one layer at a time, in one process.

Dist checkpoints are layout-agnostic: ``decoder.layers.*`` tensors are stacked
``[num_layers, ...]`` global tensors. :class:`DistCheckpointReader` asks
``torch.distributed.checkpoint`` for one layer's slice at a time (no process group).
"""

from __future__ import annotations

import torch

from megatron_pack.checkpoint.iterations import CheckpointError, resolve_iteration_dir
from megatron_pack.checkpoint.safe_metadata import SafeBytesMixin, read_dist_metadata, safe_load_strategies, safe_reader
from megatron_pack.model import state_keys as K


def _slice_planner_cls():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(SafeBytesMixin, DefaultLoadPlanner):
        """Reads a box of each requested global tensor (``offsets`` + the destination's shape) in a
        single process: Megatron-Core's loader assumes each rank owns its part of a regular grid
        and cannot ask a world of one for one layer of a stacked tensor."""

        def __init__(self, offsets: dict):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.offsets = offsets

        def create_local_plan(self):
            items = []
            for fqn, off in self.offsets.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=self.state_dict[fqn].shape)
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            # dest_offsets are relative to the requested box, i.e. to the destination tensor
            t = self.state_dict[read_item.dest_index.fqn]
            for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(dim, off, length)
            return t

    return SlicePlanner


class DistCheckpointReader:
    """One global tensor, or one layer's slice of the stacked ``decoder.layers.*`` tensors, at a
    time, straight through ``torch.distributed.checkpoint`` (no process group needed)."""

    LAYER_PREFIX = "decoder.layers."

    def __init__(self, iter_path: str):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron_pack.checkpoint.dist_files import check_dist_files

        self._metadata = read_dist_metadata(iter_path)  # before anything else reads the directory
        check_dist_files(iter_path, self._metadata)
        self.path = iter_path
        md = self._metadata.state_dict_metadata
        self.meta = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)
                     and not k.startswith("optimizer")}
        needed = [K.MEG_EMBEDDING, K.MEG_FINAL_NORM] + [self.LAYER_PREFIX + n for n in K.MEGATRON_LAYER_NAMES]
        missing = [n for n in needed if n not in self.meta]
        if missing:
            raise CheckpointError(f"{iter_path}: dist checkpoint lacks {missing} (not a megatron_pack GPT checkpoint?)")
        self.num_layers = self.meta[self.LAYER_PREFIX + K.MEGATRON_LAYER_NAMES[0]].size[0]

    def has(self, key: str) -> bool:
        return key in self.meta

    def shape(self, key: str) -> tuple:
        return tuple(self.meta[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key].properties.dtype

    def _read(self, boxes: dict) -> dict:
        """``{key: (offsets, shape)}`` -> ``{key: tensor}``."""
        import torch.distributed.checkpoint as dcp

        out = {k: torch.empty(shape, dtype=self.dtype(k)) for k, (_, shape) in boxes.items()}
        dcp.load(out, storage_reader=safe_reader(self.path, self._metadata),
                 planner=_slice_planner_cls()({k: off for k, (off, _) in boxes.items()}), no_dist=True)
        return out

    def tensor(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self._read({key: ((0,) * len(shape), shape)})[key]

    def layer(self, i: int) -> dict:
        """Canonical-name tensors of global layer ``i`` (unsharded: qkv interleaved, fc1 [gate; up])."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} of {self.num_layers}")
        names = K.MEGATRON_LAYER_NAMES + tuple(n for n in K.OPTIONAL_LAYER_NAMES if self.has(self.LAYER_PREFIX + n))
        boxes = {}
        for n in names:
            shape = self.shape(self.LAYER_PREFIX + n)
            boxes[self.LAYER_PREFIX + n] = ((i,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
        got = self._read(boxes)
        return {n: got[self.LAYER_PREFIX + n][0] for n in names}


def load_model_from_dist_checkpoint(path: str, model) -> str:
    """Model weights only (no optimizer, scheduler, RNG) from a training checkpoint, at any
    TP/PP: for evaluation, or fine-tuning again from a finished run. Returns the directory."""
    from megatron.core import dist_checkpointing

    d = resolve_iteration_dir(path)
    sharded, common = safe_load_strategies(d)  # reads .metadata through the allow-list first
    bare = K.unwrap(model)
    loaded = dist_checkpointing.load({"model": bare.sharded_state_dict()}, d, sharded_strategy=sharded,
                                     common_strategy=common)
    bare.load_state_dict(loaded["model"])
    return d
