"""The one place a checkpoint's pickled parts are read: a restricted unpickler and the readers
built on it.

torch.distributed.checkpoint keeps its index (``.metadata``) as a pickle and unpickles it with
plain ``pickle.load`` (any ``__reduce__`` runs); Megatron-Core reads ``common.pt`` with
``torch.load`` whose ``weights_only`` default the environment can turn off
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``); DCP's default load planner unpickles byte items with
``weights_only=False``. Every path that opens a dist checkpoint (``--load``,
``--pretrained-checkpoint``, ``megatron-to-hf``) goes through this module instead:

* :func:`read_dist_metadata` unpickles ``.metadata`` allowing exact ``(module, name)`` pairs
  (DCP's own dataclasses, ``torch.Size``, dtypes), never a dotted name (protocol 4 resolves
  ``STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')`` through attributes);
* :class:`SafeFileSystemReader` hands DCP that already-checked object, so torch never unpickles
  the file itself (nothing can swap the bytes between the check and the load);
* :func:`safe_torch_load` passes ``weights_only=True`` explicitly (the environment variable only
  overrides an unset argument), and :func:`safe_load_strategies` gives Megatron-Core's
  ``dist_checkpointing.load`` a common strategy and a planner that do the same.

No process-wide state changes while any of this runs, so loads in several threads are
independent: the allow-list lives in the unpickler instance, the safe reader and planner are
handed to DCP by the strategy object (never swapped into Megatron-Core's module globals), and
torch's ``serialization.safe_globals`` is not used (in torch 2.13 it edits one module-level set,
visible to every thread's ``torch.load``).
"""

from __future__ import annotations

import io
import os
import pickle

import torch

from megatron_pack.checkpoint.iterations import CheckpointError

_DCP = "torch.distributed.checkpoint"
# Every global a torch_dist checkpoint written by Megatron-Core 0.16 / torch 2.x holds.
_ALLOWED = frozenset(
    [(f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.filesystem", n) for n in ("_StorageInfo", "_StoragePrefix")]
    + [(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                        "BytesIOWriteData")]
    + [("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")]
    + [("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if "." in name or (module, name) not in _ALLOWED:
            raise CheckpointError(f"checkpoint metadata references {module}:{name}, which a torch_dist checkpoint "
                                  "never holds; refusing to load it")
        return super().find_class(module, name)


def read_dist_metadata(iter_path: str):
    """``iter_path/.metadata`` unpickled with the allow-list; :class:`CheckpointError` names the
    file and the reason when it holds anything else or is unreadable."""
    path = os.path.join(iter_path, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_path}: no .metadata (not a torch_dist checkpoint directory)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    return md


def safe_torch_load(path, **kw):
    """``torch.load`` with ``weights_only=True`` passed explicitly, so
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment cannot turn code execution back on."""
    kw.pop("weights_only", None)
    try:
        return torch.load(path, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused (only tensors and plain values are loaded): "
                              f"{str(e).splitlines()[0]}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or corrupt zip archive
        first = (str(e).splitlines()[0] if str(e) else type(e).__name__).split(". ")[0]
        raise CheckpointError(f"{path}: unreadable ({first}; truncated or damaged)") from None


def _safe_reader_cls():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's reader, but the index comes from :func:`read_dist_metadata` (read once, then
        cached: the object checked is the object used)."""

        def __init__(self, path, metadata=None):
            super().__init__(path)
            self._checked = metadata if metadata is not None else read_dist_metadata(str(path))

        def read_metadata(self, *args, **kwargs):
            md = self._checked
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader


def safe_reader(iter_path: str, metadata=None):
    """A ``FileSystemReader`` for ``iter_path`` that never unpickles ``.metadata`` itself."""
    return _safe_reader_cls()(iter_path, metadata)


class SafeBytesMixin:
    """For DCP load planners: byte items (Megatron's ``ShardedObject``) are unpickled with
    ``weights_only=True``, not DCP's default ``weights_only=False``."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load_strategies(iter_path: str, metadata=None):
    """``(sharded_strategy, common_strategy)`` for ``megatron.core.dist_checkpointing.load``: the
    torch_dist strategy reading through :class:`SafeFileSystemReader` with a bytes-safe planner,
    and the torch common strategy loading ``common.pt`` with ``weights_only=True``."""
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    from megatron_pack.checkpoint.dist_files import check_dist_files

    md = metadata if metadata is not None else read_dist_metadata(iter_path)
    check_dist_files(iter_path, md)  # every shard the index names there and long enough

    class SafePlanner(SafeBytesMixin, mtorch.MCoreLoadPlanner):
        pass

    class SafeShardedStrategy(mtorch.TorchDistLoadShardedStrategy):
        """Megatron-Core 0.16's ``TorchDistLoadShardedStrategy.load`` with the reader and the planner
        passed in, not looked up as module globals: nothing outside this object changes while a load
        runs, so concurrent loads (threads, other checkpoints) never see each other's reader."""

        def load(self, sharded_state_dict, checkpoint_dir):
            from megatron.core.dist_checkpointing.dict_utils import nested_values
            from megatron.core.dist_checkpointing.mapping import ShardedTensor
            from torch.distributed import checkpoint

            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            orig = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict)
            pyt_state_dict = mtorch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            checkpoint.load_state_dict(
                pyt_state_dict, safe_reader(str(checkpoint_dir), md), no_dist=no_dist,
                planner=SafePlanner(
                    shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
                    allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch}))
            self.cached_global_metadata = md
            out = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            out = mtorch._replace_sharded_keys_with_state_dict_keys(out, flat_mapping, rename_mapping)
            mtorch._restore_dict_types(out, orig)
            return out

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            return super().load_tensors_metadata(checkpoint_dir, md if metadata is None else metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            from megatron.core.dist_checkpointing.mapping import ShardedObject
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata

            out = {}
            for key, storage in md.state_dict_metadata.items():
                if isinstance(storage, BytesStorageMetadata):
                    obj = ShardedObject.empty_from_unique_key(key)
                    out[obj.unique_key] = obj
            out.update(self.load_tensors_metadata(checkpoint_dir, md))
            return out

    class SafeCommonStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
            return safe_torch_load(path, map_location="cpu")

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir}: separately saved sharded objects are not read")

    return SafeShardedStrategy(), SafeCommonStrategy()
