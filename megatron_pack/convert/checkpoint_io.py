"""Megatron side of the conversion: the import format, and reading dist checkpoints layer by layer.

**Import format** (what ``hf-to-megatron`` writes; ``--load`` starts fine-tuning from it). A
dist checkpoint (torch_dist) save needs the whole model's state dict in one place, so a
70B model could not be converted on one host; this format is written one layer at a time,
Megatron-LM's legacy per-rank layout with safetensors instead of pickles::

    OUT/latest_checkpointed_iteration.txt          "0"
    OUT/iter_0000000/megatron_pack_import.json     format, TP, PP, architecture, vocab sizes, dtype
    OUT/iter_0000000/mp_rank_{tp:02d}_{pp:03d}/
        embedding.safetensors                      first stage: this rank's padded vocab rows
        layer_{local:03d}.safetensors              each of this stage's layers, this rank's shards
        head.safetensors                           last stage: final norm, output layer rows
    OUT/tokenizer/                                 tokenizer files, when given

Tensor names inside are canonical (see :mod:`megatron_pack.convert.mapping`), layer files
without the ``decoder.layers.{i}.`` prefix. It is valid for exactly the TP/PP it was
written for; each rank reads only its own directory.

**Dist checkpoints** (what training saves) are layout-agnostic: ``decoder.layers.*``
tensors are stacked ``[num_layers, ...]`` global tensors. :class:`DistCheckpointReader`
asks Megatron-Core for one layer's slice at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Optional

import torch

from megatron_pack.convert import mapping as M
from megatron_pack.convert.hf_io import ConversionError
from megatron_pack.model.presets import LlamaPreset
from megatron_pack.training.checkpoint import MARKER, iter_dir, latest_iteration

IMPORT_FORMAT = "megatron_pack.hf_import"
IMPORT_VERSION = 1
META_NAME = "megatron_pack_import.json"


def rank_dir(iter_path: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(iter_path, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def layer_file(local: int) -> str:
    return f"layer_{local:03d}.safetensors"


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global layer indices of pipeline stage ``pp_rank`` (even split, no virtual stages)."""
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


# ---- locating checkpoints ----------------------------------------------------------------------

def _latest(root: str) -> Optional[int]:
    """The training checkpoints' marker, with a malformed one reported as a conversion error."""
    try:
        return latest_iteration(root)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def resolve_iteration_dir(path: str) -> str:
    """``path`` may be a checkpoint root (with the marker file) or one ``iter_*`` directory."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such checkpoint directory")
    it = _latest(path)
    if it is not None:
        d = iter_dir(path, it)
        if not os.path.isdir(d):
            raise ConversionError(f"{os.path.join(path, MARKER)} names iteration {it} but {d} is missing")
        return d
    return path


def read_import_metadata(path: str) -> Optional[dict]:
    """The import metadata under ``path`` (root or iteration directory), None if it is no import."""
    if not os.path.isdir(path):
        return None
    try:
        d = resolve_iteration_dir(path)
    except ConversionError:
        return None
    meta_path = os.path.join(d, META_NAME)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != IMPORT_FORMAT:
        raise ConversionError(f"{meta_path}: format {meta.get('format')!r}, expected {IMPORT_FORMAT!r}")
    if meta.get("version") != IMPORT_VERSION:
        raise ConversionError(f"{meta_path}: version {meta.get('version')} is not supported (expected {IMPORT_VERSION})")
    meta["_dir"] = d
    return meta


def is_imported_checkpoint(path: Optional[str]) -> bool:
    return bool(path) and read_import_metadata(path) is not None


def preset_from_metadata(meta: dict) -> LlamaPreset:
    fields = {f.name for f in dataclasses.fields(LlamaPreset)}
    return LlamaPreset(**{k: v for k, v in meta["architecture"].items() if k in fields})


# ---- writing the import format ------------------------------------------------------------------

def write_metadata(iter_path: str, meta: dict) -> None:
    with open(os.path.join(iter_path, META_NAME), "w") as f:
        json.dump(meta, f, indent=1)


def save_tensors(path: str, tensors: dict) -> None:
    from megatron_pack.convert.hf_io import write_safetensors

    write_safetensors(path, tensors, metadata={"format": IMPORT_FORMAT})


def read_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing from the imported checkpoint")
    return load_file(path)


# ---- loading the import format into a model (the --load hook) -----------------------------------

def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def check_architecture(meta: dict, preset: LlamaPreset, vocab_size: Optional[int] = None, where: str = "") -> None:
    """The run's preset/vocabulary must be the imported model's; say what differs."""
    got = preset_from_metadata(meta)
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "rope_theta", "norm_eps", "tie_word_embeddings")
    diff = {k: (getattr(got, k), getattr(preset, k)) for k in keys if getattr(got, k) != getattr(preset, k)}
    if diff:
        raise ConversionError(f"{where}: the imported model's architecture differs from --model {preset.name} "
                              f"(imported, run): {diff}")
    if vocab_size is not None and vocab_size != meta["vocab_size"]:
        raise ConversionError(f"{where}: imported vocabulary has {meta['vocab_size']} tokens but the run uses "
                              f"{vocab_size}; pass --vocab-size {meta['vocab_size']}")


def load_imported_weights(path: str, model, *, preset: Optional[LlamaPreset] = None,
                          vocab_size: Optional[int] = None) -> dict:
    """Copy this rank's imported weights into ``model`` (any DDP/Float16Module wrapping).

    Every parameter must be covered and every shape must match; the run's TP/PP must be
    the import's. Returns the import metadata. Optimizer and scheduler are untouched (a
    fine-tune starts them fresh at iteration 0); with bf16 and fp32 main parameters call
    ``optimizer.reload_model_params()`` afterwards.
    """
    from megatron.core import parallel_state as ps

    meta = read_import_metadata(path)
    if meta is None:
        raise ConversionError(f"{path}: not a checkpoint written by `convert_checkpoint.py hf-to-megatron`")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    want_tp, want_pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    if (tp, pp) != (want_tp, want_pp):
        raise ConversionError(
            f"{path} was converted for --tensor-model-parallel-size {want_tp} --pipeline-model-parallel-size "
            f"{want_pp}, but this run has TP {tp}, PP {pp}: pass those sizes, or convert again with "
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}")
    if preset is not None:
        check_architecture(meta, preset, vocab_size, where=path)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    d = rank_dir(meta["_dir"], tp_rank, pp_rank)
    bare = _unwrap(model)
    params = dict(bare.named_parameters())
    filled: set = set()
    arch = preset_from_metadata(meta)

    def put(canonical: str, tensor: torch.Tensor, optional: bool = False):
        key = M.model_key(canonical, params)
        if key not in params:
            if optional:
                return
            raise ConversionError(f"{d}: tensor {canonical} has no parameter in this rank's model")
        p = params[key]
        if tuple(p.shape) != tuple(tensor.shape):
            raise ConversionError(f"{d}: {canonical} has shape {list(tensor.shape)}, the model's parameter "
                                  f"{key} has {list(p.shape)}")
        with torch.no_grad():
            p.data.copy_(tensor.to(device=p.device, dtype=p.dtype))
        filled.add(key)

    layers = stage_layers(arch.num_layers, pp, pp_rank)
    if getattr(bare, "pre_process", pp_rank == 0):
        for k, v in read_tensors(os.path.join(d, "embedding.safetensors")).items():
            put(k, v)
    for local, _ in enumerate(layers):
        for k, v in read_tensors(os.path.join(d, layer_file(local))).items():
            put(f"decoder.layers.{local}.{k}", v)
    if getattr(bare, "post_process", pp_rank == pp - 1):
        for k, v in read_tensors(os.path.join(d, "head.safetensors")).items():
            put(k, v, optional=(k == M.MEG_OUTPUT and arch.tie_word_embeddings))
    missing = sorted(set(params) - filled)
    if missing:
        raise ConversionError(f"{d}: the import has no values for {len(missing)} parameters, e.g. {missing[:3]}")
    return meta


def resolve_finetune_load(load: Optional[str], save: Optional[str]) -> tuple:
    """``(directory to load, is it an import?)`` for ``--load``/``--save``.

    ``--load IMPORT --save DIR`` fine-tunes from the import the first time; once DIR holds a
    checkpoint of the run, the same command line resumes from DIR instead (a scheduler that
    restarts a job with identical flags must not start over from the HF weights)."""
    if not load or not is_imported_checkpoint(load):
        return load, False
    if save and os.path.abspath(save) != os.path.abspath(load) and _latest(save) is not None:
        return save, False
    return load, True


def start_from_import(path: str, model, optimizer, preset: Optional[LlamaPreset] = None,
                      vocab_size: Optional[int] = None) -> dict:
    """The training loop's ``--load IMPORT`` path: imported weights, fresh optimizer and
    scheduler, iteration 0. The optimizer's fp32 main copies (bf16 runs) were taken from the
    random init when it was built, so they are refreshed from the loaded weights."""
    meta = load_imported_weights(path, model, preset=preset, vocab_size=vocab_size)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    return meta


# ---- reading dist checkpoints -------------------------------------------------------------------

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        ok = module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
        if not ok:
            raise ConversionError(f"checkpoint metadata references {module}.{name}, which a torch_dist checkpoint "
                                  "never holds; refusing to load it")
        return super().find_class(module, name)


def check_dist_metadata(iter_path: str) -> None:
    """torch.distributed.checkpoint keeps its index (``.metadata``) as a pickle and unpickles it on
    load. Unpickle it first with an allow-list of DCP's own classes: the stream is the same bytes,
    so if this passes, torch's load constructs nothing else."""
    path = os.path.join(iter_path, ".metadata")
    if not os.path.isfile(path):
        raise ConversionError(f"{iter_path}: no .metadata (not a torch_dist checkpoint directory)")
    with open(path, "rb") as f:
        try:
            _MetadataUnpickler(f).load()
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        except Exception as e:  # truncated or corrupt
            raise ConversionError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None


def _slice_planner_cls():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
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
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        check_dist_metadata(iter_path)
        self.path = iter_path
        md = FileSystemReader(iter_path).read_metadata().state_dict_metadata
        self.meta = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)
                     and not k.startswith("optimizer")}
        needed = [M.MEG_EMBEDDING, M.MEG_FINAL_NORM] + [self.LAYER_PREFIX + n for n in M.MEGATRON_LAYER_NAMES]
        missing = [n for n in needed if n not in self.meta]
        if missing:
            raise ConversionError(f"{iter_path}: dist checkpoint lacks {missing} (not a megatron_pack GPT checkpoint?)")
        self.num_layers = self.meta[self.LAYER_PREFIX + M.MEGATRON_LAYER_NAMES[0]].size[0]

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
        dcp.load(out, storage_reader=dcp.FileSystemReader(self.path),
                 planner=_slice_planner_cls()({k: off for k, (off, _) in boxes.items()}), no_dist=True)
        return out

    def tensor(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self._read({key: ((0,) * len(shape), shape)})[key]

    def layer(self, i: int) -> dict:
        """Canonical-name tensors of global layer ``i`` (unsharded: qkv interleaved, fc1 [gate; up])."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} of {self.num_layers}")
        boxes = {}
        for n in M.MEGATRON_LAYER_NAMES:
            shape = self.shape(self.LAYER_PREFIX + n)
            boxes[self.LAYER_PREFIX + n] = ((i,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
        got = self._read(boxes)
        return {n: got[self.LAYER_PREFIX + n][0] for n in M.MEGATRON_LAYER_NAMES}


def load_model_from_dist_checkpoint(path: str, model) -> str:
    """Model weights only (no optimizer, scheduler, RNG) from a training checkpoint, at any
    TP/PP: for evaluation, or fine-tuning again from a finished run. Returns the directory."""
    from megatron.core import dist_checkpointing

    d = resolve_iteration_dir(path)
    check_dist_metadata(d)
    bare = _unwrap(model)
    loaded = dist_checkpointing.load({"model": bare.sharded_state_dict()}, d)
    bare.load_state_dict(loaded["model"])
    return d
