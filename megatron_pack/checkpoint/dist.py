"""Checkpoints with ``megatron.core.dist_checkpointing``; exact resume; SIGTERM handling.

Layout (Megatron-LM's names, so its tooling recognises the directory)::

    SAVE/latest_checkpointed_iteration.txt      "120"
    SAVE/iter_0000120/                          dist_checkpointing: model + optimizer shards,
                                                common.pt (scheduler, data position, iteration)
    SAVE/iter_0000120/rng/rank_00003.pt         per-rank RNG states (python, numpy, torch,
                                                CUDA, Megatron's model-parallel tracker)
    SAVE/iter_0000120/run_config.json           the run's config, for the record

Every rank writes into ``iter_N.tmp``; rank 0 renames it to ``iter_N`` and then rewrites
the marker (temp file + rename), so a crash mid-save leaves the previous checkpoint as
the latest one. Re-saving an existing ``iter_N`` moves the old one to ``iter_N.old`` first and
deletes it only after the marker is written; a reader finding ``iter_N`` missing but
``iter_N.old`` present puts it back (:func:`megatron_pack.checkpoint.iterations.recover_iteration`),
so the marker never points at nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import torch

from megatron_pack.checkpoint.integrity import children_die_with_parent, has_manifest, verify_manifest, write_manifest
from megatron_pack.checkpoint.iterations import MARKER, CheckpointError, iter_dir, latest_iteration, recover_iteration
from megatron_pack.checkpoint.mcore_shim import fill_empty_optimizer_state, in_process_write_results
from megatron_pack.checkpoint.rng import rng_state, set_rng_state
from megatron_pack.checkpoint.safe_metadata import safe_load_strategies, safe_torch_load
from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.model.state_keys import unwrap


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.barrier
    return 0, lambda: None


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict:
    model_sd = unwrap(model).sharded_state_dict()
    # dp_reshardable: each rank writes its own optimizer shard, no gather (Megatron-LM's default).
    meta = {"distrib_optim_sharding_type": "dp_reshardable"}
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta),
    }


def _saved_steps(tree) -> list:
    """Every ``param_groups[*]["step"]`` in a loaded optimizer state (any nesting)."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "param_groups" and isinstance(v, list):
                out += [g["step"] for g in v if isinstance(g, dict) and g.get("step") is not None]
            else:
                out += _saved_steps(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            out += _saved_steps(v)
    return out


def _restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Megatron-Core 0.16's distributed optimizer on torch's Adam (no Apex/TE) keeps Adam's
    step count only in the saved param groups; loading into an optimizer whose state was
    filled with dummies leaves the dummy count (1), and where it does copy the count it
    shares one tensor between all parameters, which torch increments once per parameter.
    Set each parameter's own ``step`` from the saved count."""
    steps = {float(s) for s in _saved_steps(loaded_optimizer_state)}
    if len(steps) != 1:
        return
    step = steps.pop()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)


class CheckpointSaveError(RuntimeError):
    """A save that could not be completed (a full disk, an unwritable directory); the previous
    checkpoint stays the latest and the half-written iteration is removed."""


def _save_failure(root: str, iteration: int, exc: BaseException) -> str:
    """One line: where, why (the disk's free space when that is the likely cause), what is kept."""
    first = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) in (28, 122) or (free is not None and free < 64 << 20)
    why = f"the disk is full ({free:,} bytes free)" if full and free is not None else first
    kept = latest_iteration(root) if os.path.isfile(os.path.join(root, MARKER)) else None
    return (
        f"--save {root}: saving iteration {iteration} failed: {why}; the half-written {iter_dir(root, iteration)}"
        f".tmp was removed, "
        + (f"iteration {kept} stays the latest checkpoint" if kept is not None else "no checkpoint was written")
    )


def save_checkpoint(
    root: str,
    iteration: int,
    model,
    optimizer,
    scheduler,
    data_state: dict,
    extra: dict | None = None,
    run_config: dict | None = None,
    checksums: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the final directory. ``checksums``: write a
    SHA-256 manifest of the iteration's files (checked by :func:`load_checkpoint`)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's writer failures

    children_die_with_parent()  # Megatron's writer forks; a SIGKILLed run must not leave them behind
    in_process_write_results()  # ... nor a spawned Manager (and its resource tracker) for the write results
    rank, barrier = _dist()
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous save that died half-way
        os.makedirs(tmp)  # empty: Megatron-Core warns "Overwriting old incomplete" into a non-empty one
    barrier()
    state = _sharded_state_dict(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["data"] = dict(data_state)
    state["iteration"] = int(iteration)
    state["extra"] = dict(extra or {})
    # Megatron's writer logs a worker's failure itself; the one line below says it all
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    try:
        writer_log.setLevel(logging.CRITICAL)
        dist_checkpointing.save(state, tmp)
        writer_log.setLevel(level)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        barrier()
        if rank == 0:
            if run_config is not None:
                write_json_atomic(run_config, os.path.join(tmp, "run_config.json"), default=str)
            if checksums:
                write_manifest(tmp)  # last: it vouches for everything above
    except (OSError, RuntimeError, CheckpointException) as e:  # a full disk: torch's "unexpected pos 704 vs 598"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(root, iteration, e)) from None
    finally:
        writer_log.setLevel(level)
    if rank == 0:
        old = final + ".old"
        if os.path.isdir(final):  # re-saving the same step (resumed run): set the old one aside
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        marker_tmp = os.path.join(root, MARKER + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(marker_tmp, os.path.join(root, MARKER))
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def is_dist_checkpoint(path: str) -> bool:
    """``path`` holds a dist checkpoint (its ``.metadata``), not an empty ``--load``/``--save`` root."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def saved_run_config(path: str, required: bool = False) -> dict | None:
    """The ``run_config.json`` of an iteration directory (None when absent). ``required``: a
    missing file is a :class:`CheckpointError` -- every iteration a training run saves has one, and
    the architecture and packing-plan checks of ``--load`` read nothing else, so without it they
    would pass silently (a resume on another plan)."""
    f = os.path.join(path, "run_config.json")
    if not os.path.isfile(f):
        if required:
            raise CheckpointError(
                f"{f}: missing (every checkpoint a training run saves has it; the architecture "
                "and packing-plan checks read it): the checkpoint is incomplete or was edited. "
                "Restore the file from a copy of the checkpoint"
            )
        return None
    try:
        with open(f) as fh:
            rc = json.load(fh)
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(rc, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return rc


def load_checkpoint(
    root: str,
    model,
    optimizer,
    scheduler,
    *,
    check_run_config=None,
    check_scheduler=None,
    verify_checksums: bool = False,
) -> dict | None:
    """Restore the latest checkpoint under ``root`` into model, optimizer, scheduler and the
    RNGs; returns ``{"iteration", "data", "extra"}``, or None when ``root`` holds none.

    Order: ``.metadata`` through the allow-list, then the checksum manifest (``verify_checksums``),
    then ``check_run_config(saved run_config, path)`` (a missing ``run_config.json`` is refused)
    -- all before any weight is read --
    and ``check_scheduler(saved scheduler state)`` before the scheduler takes it. The hooks raise
    to refuse."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = recover_iteration(root, iteration)
    sharded, common = safe_load_strategies(path)  # reads .metadata through the allow-list first
    if verify_checksums:
        if has_manifest(path):
            verify_manifest(path)
        else:
            warnings.warn(f"{path}: no checksum manifest (saved without --checkpoint-checksums); not verified")
    if check_run_config is not None:
        check_run_config(saved_run_config(path, required=True), path)
    rank, _ = _dist()
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    # read before any weight: a damaged file is refused while the model is still untouched
    rng = safe_torch_load(rng_file) if os.path.isfile(rng_file) else None
    fill_empty_optimizer_state(optimizer)
    state = _sharded_state_dict(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, path, sharded_strategy=sharded, common_strategy=common)
    unwrap(model).load_state_dict(loaded["model"])
    with torch.no_grad():  # the dp_reshardable loader copies into fp32 views of leaf params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    if check_scheduler is not None:
        check_scheduler(loaded["scheduler"])
    scheduler.load_state_dict(loaded["scheduler"])
    if rng is not None:
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"{rng_file}: not an RNG state this run can restore ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    else:
        warnings.warn(f"{rng_file}: no RNG state for rank {rank} (different world size?); keeping fresh seeds")
    return {
        "iteration": int(loaded["iteration"]),
        "data": dict(loaded["data"]),
        "extra": dict(loaded["extra"]),
        "path": path,
    }
