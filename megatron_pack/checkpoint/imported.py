"""The import format: what ``hf-to-megatron`` writes and ``--load`` fine-tunes from.

**Import format** (what ``hf-to-megatron`` writes; ``--load`` starts fine-tuning from it). A
dist checkpoint (torch_dist) save needs the whole model's state dict in one place, so a
70B model could not be converted on one host; this format is written one layer at a time,
Megatron-LM's legacy per-rank layout with safetensors instead of pickles::

    OUT/latest_checkpointed_iteration.txt          "0"
    OUT/iter_0000000/megatron_pack_import.json     format, TP, PP, architecture, vocab sizes, dtype,
                                                   special token ids, generation_config.json
    OUT/iter_0000000/mp_rank_{tp:02d}_{pp:03d}/
        embedding.safetensors                      first stage: this rank's padded vocab rows
        layer_{local:03d}.safetensors              each of this stage's layers, this rank's shards
        head.safetensors                           last stage: final norm, output layer rows
    OUT/tokenizer/                                 tokenizer files, when given

Tensor names inside are canonical (see :mod:`megatron_pack.model.state_keys`), layer files
without the ``decoder.layers.{i}.`` prefix. It is valid for exactly the TP/PP it was
written for; each rank reads only its own directory.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_pack.checkpoint.iterations import CheckpointError, latest_iteration, resolve_iteration_dir
from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.model import state_keys as K
from megatron_pack.model.architecture import architecture_differences, architecture_from_dict
from megatron_pack.model.presets import LlamaPreset

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


def read_import_metadata(path: str) -> Optional[dict]:
    """The import metadata under ``path`` (root or iteration directory), None if it is no import."""
    if not os.path.isdir(path):
        return None
    try:
        d = resolve_iteration_dir(path)
    except CheckpointError:
        return None
    meta_path = os.path.join(d, META_NAME)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable import metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    if meta.get("format") != IMPORT_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {IMPORT_FORMAT!r}")
    if meta.get("version") != IMPORT_VERSION:
        raise CheckpointError(
            f"{meta_path}: version {meta.get('version')} is not supported (expected {IMPORT_VERSION})"
        )
    meta["_dir"] = d
    return meta


def is_imported_checkpoint(path: Optional[str]) -> bool:
    return bool(path) and read_import_metadata(path) is not None


def preset_from_metadata(meta: dict) -> LlamaPreset:
    """The architecture an import (or a training checkpoint's run_config.json) records; one that
    could not be built (a forged size, a wrong type) is a :class:`CheckpointError`."""
    from megatron_pack.model.architecture import ArchitectureError

    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{meta.get('_dir', 'checkpoint')}: metadata records no architecture object")
    try:
        return architecture_from_dict(arch)
    except (ArchitectureError, TypeError) as e:
        raise CheckpointError(f"{meta.get('_dir', 'checkpoint')}: recorded architecture refused: {e}") from None


# ---- writing the import format ------------------------------------------------------------------


def write_metadata(iter_path: str, meta: dict) -> None:
    write_json_atomic(meta, os.path.join(iter_path, META_NAME))


def save_tensors(path: str, tensors: dict) -> None:
    from megatron_pack.files.safetensors import write_safetensors

    write_safetensors(path, tensors, metadata={"format": IMPORT_FORMAT})


def read_tensors(path: str) -> dict:
    """One file of the import, its header checked first (a damaged one is a one-line
    :class:`CheckpointError` naming it, not the safetensors library's traceback)."""
    from safetensors.torch import load_file

    from megatron_pack.files.safetensors import SafetensorsHeaderError, read_safetensors_header

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the imported checkpoint")
    try:
        read_safetensors_header(path)
        return load_file(path)
    except SafetensorsHeaderError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # the library's own refusal of what the check above let through
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


# ---- loading the import format into a model (the --load hook) -----------------------------------


def check_architecture(meta: dict, preset: LlamaPreset, vocab_size: Optional[int] = None, where: str = "") -> None:
    """The run's preset/vocabulary must be the imported model's; say what differs."""
    diff = architecture_differences(preset_from_metadata(meta), preset)
    if diff:
        raise CheckpointError(
            f"{where}: the imported model's architecture differs from --model {preset.name} (imported, run): {diff}"
        )
    if vocab_size is not None and vocab_size != meta["vocab_size"]:
        raise CheckpointError(
            f"{where}: imported vocabulary has {meta['vocab_size']} tokens but the run uses "
            f"{vocab_size}; pass --vocab-size {meta['vocab_size']}"
        )


def load_imported_weights(
    path: str, model, *, preset: Optional[LlamaPreset] = None, vocab_size: Optional[int] = None
) -> dict:
    """Copy this rank's imported weights into ``model`` (any DDP/Float16Module wrapping).

    Every parameter must be covered and every shape must match; the run's TP/PP must be
    the import's. Returns the import metadata. Optimizer and scheduler are untouched (a
    fine-tune starts them fresh at iteration 0); with bf16 and fp32 main parameters call
    ``optimizer.reload_model_params()`` afterwards.
    """
    from megatron.core import parallel_state as ps

    meta = read_import_metadata(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a checkpoint written by `convert_checkpoint.py hf-to-megatron`")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    want_tp, want_pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    if (tp, pp) != (want_tp, want_pp):
        raise CheckpointError(
            f"{path} was converted for --tensor-model-parallel-size {want_tp} --pipeline-model-parallel-size "
            f"{want_pp}, but this run has TP {tp}, PP {pp}: pass those sizes, or convert again with "
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}"
        )
    if preset is not None:
        check_architecture(meta, preset, vocab_size, where=path)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    d = rank_dir(meta["_dir"], tp_rank, pp_rank)
    bare = K.unwrap(model)
    params = dict(bare.named_parameters())
    filled: set = set()
    arch = preset_from_metadata(meta)

    def put(canonical: str, tensor: torch.Tensor, optional: bool = False):
        key = K.model_key(canonical, params)
        if key not in params:
            if optional:
                return
            raise CheckpointError(f"{d}: tensor {canonical} has no parameter in this rank's model")
        p = params[key]
        if tuple(p.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{d}: {canonical} has shape {list(tensor.shape)}, the model's parameter {key} has {list(p.shape)}"
            )
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
            put(k, v, optional=(k == K.MEG_OUTPUT and arch.tie_word_embeddings))
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{d}: the import has no values for {len(missing)} parameters, e.g. {missing[:3]}")
    return meta


def resolve_finetune_load(load: Optional[str], save: Optional[str]) -> tuple:
    """``(directory to load, is it an import?)`` for ``--load``/``--save``.

    ``--load IMPORT --save DIR`` fine-tunes from the import the first time; once DIR holds a
    checkpoint of the run, the same command line resumes from DIR instead (a scheduler that
    restarts a job with identical flags must not start over from the HF weights)."""
    if not load or not is_imported_checkpoint(load):
        return load, False
    if save and os.path.abspath(save) != os.path.abspath(load) and latest_iteration(save) is not None:
        return save, False
    return load, True


def start_from_import(
    path: str, model, optimizer, preset: Optional[LlamaPreset] = None, vocab_size: Optional[int] = None
) -> dict:
    """The training loop's ``--load IMPORT`` path: imported weights, fresh optimizer and
    scheduler, iteration 0. The optimizer's fp32 main copies (bf16 runs) were taken from the
    random init when it was built, so they are refreshed from the loaded weights."""
    meta = load_imported_weights(path, model, preset=preset, vocab_size=vocab_size)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    return meta
