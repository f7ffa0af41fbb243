"""On-disk cache of packing plans: built once (rank 0), memory-mapped by everyone else.

A plan is keyed by a sha256 over everything that determines it: the dataset fingerprint
(``.idx`` sizes and mtimes, a hash of the conversation lengths), the mode config, the
sequence length, the over-long policy and, for shuffling modes only, ``(seed, epoch)``.
Three files per plan under ``cache_dir`` (default ``PREFIX_plans/``)::

    bfd_L4096_<key16>.pieces.npy    int64 [P, 3]
    bfd_L4096_<key16>.offsets.npy   int64 [N + 1]
    bfd_L4096_<key16>.json          key inputs, shapes, sha256 of both arrays, stats

Files are written under temporary names and renamed, the JSON last, so a crash never
leaves a plan that looks complete. On load everything is checked (key, dataset
fingerprint, shapes, checksums, piece bounds); a mismatch warns and rebuilds, it is
never used silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

import numpy as np

from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.files.indexed import LOSS_MASK_SUFFIX, TURNS_SUFFIX, SFTIndexedDataset
from megatron_pack.packing.plan import PackingMode, PackingPlan, PlanStats, build_plan, dataset_supervised, get_mode

CACHE_VERSION = 1


class PlanCacheError(Exception):
    """A cached plan that must not be used (the message says why)."""


def dataset_fingerprint(prefix: str, lengths: np.ndarray) -> dict:
    """Cheap identity of a dataset: index file sizes/mtimes plus a hash of its lengths."""
    files = {}
    for suffix in ("", LOSS_MASK_SUFFIX, TURNS_SUFFIX):
        st = os.stat(prefix + suffix + ".idx")
        files[os.path.basename(prefix + suffix + ".idx")] = [st.st_size, st.st_mtime_ns]
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    return {"files": files, "num_docs": int(lengths.size), "lengths_sha256": _sha256(lengths)}


def plan_key_inputs(fingerprint: dict, mode: PackingMode, seq_length: int, seed: int, epoch: int, overlong: str,
                    pad_multiple: int = 1) -> dict:
    shuffles = mode.shuffles
    extra = {"pad_multiple": int(pad_multiple)} if pad_multiple > 1 else {}  # old keys stay valid
    return {
        **extra,
        "version": CACHE_VERSION,
        "dataset": fingerprint,
        "mode": mode.key(),
        "seq_length": int(seq_length),
        "overlong": overlong,
        "unsupervised": "left out",  # items without a trained target are not packed
        # deterministic modes give the same plan every epoch: share one file
        "seed": int(seed) if shuffles else None,
        "epoch": int(epoch) if shuffles else None,
    }


def plan_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _sha256(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    if arr.size == 0:  # memoryview cannot cast a zero-length view
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def _paths(cache_dir: str, stem: str) -> dict[str, str]:
    base = os.path.join(cache_dir, stem)
    return {"pieces": base + ".pieces.npy", "offsets": base + ".offsets.npy", "meta": base + ".json"}


def save_plan(plan: PackingPlan, cache_dir: str, stem: str, inputs: dict) -> str:
    """Write a plan atomically; returns the JSON path."""
    os.makedirs(cache_dir, exist_ok=True)
    paths = _paths(cache_dir, stem)
    meta = {
        "key": plan_key(inputs),
        "inputs": inputs,
        "mode": plan.mode,
        "max_seq_length": plan.max_seq_length,
        "num_pieces": int(len(plan.pieces)),
        "num_sequences": int(plan.num_sequences),
        "sha256": {"pieces": _sha256(plan.pieces), "offsets": _sha256(plan.seq_offsets)},
        "stats": dataclasses.asdict(plan.stats),
    }
    tmp = f".tmp-{os.getpid()}"
    for name, arr in (("pieces", plan.pieces), ("offsets", plan.seq_offsets)):
        with open(paths[name] + tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr, dtype=np.int64))
        os.replace(paths[name] + tmp, paths[name])
    return write_json_atomic(meta, paths["meta"])


def load_plan(cache_dir: str, stem: str, inputs: dict, lengths: np.ndarray) -> PackingPlan:
    """Memory-map a cached plan after checking it; raises :class:`PlanCacheError` if unusable."""
    paths = _paths(cache_dir, stem)
    try:
        with open(paths["meta"]) as f:
            meta = json.load(f)
        pieces = np.load(paths["pieces"], mmap_mode="r")
        offsets = np.load(paths["offsets"], mmap_mode="r")
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated npy, bad JSON, ...
        raise PlanCacheError(f"unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise PlanCacheError(f"meta is a JSON {type(meta).__name__}, not an object")
    try:
        return _checked_plan(meta, pieces, offsets, inputs, lengths)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # valid JSON, wrong shape
        raise PlanCacheError(f"malformed meta ({type(e).__name__}: {e})") from None


def _checked_plan(meta: dict, pieces, offsets, inputs: dict, lengths) -> PackingPlan:
    if meta.get("key") != plan_key(inputs):
        raise PlanCacheError("key does not match the requested plan")
    if meta.get("inputs", {}).get("dataset") != inputs["dataset"]:
        raise PlanCacheError("built for a different dataset (fingerprint mismatch)")
    if pieces.dtype != np.int64 or pieces.shape != (meta["num_pieces"], 3):
        raise PlanCacheError(
            f"pieces have shape {pieces.shape} {pieces.dtype}, expected ({meta['num_pieces']}, 3) int64")
    if offsets.dtype != np.int64 or offsets.shape != (meta["num_sequences"] + 1,):
        raise PlanCacheError(f"offsets have shape {offsets.shape}, expected ({meta['num_sequences'] + 1},)")
    if _sha256(pieces) != meta["sha256"]["pieces"] or _sha256(offsets) != meta["sha256"]["offsets"]:
        raise PlanCacheError("checksum mismatch (file corrupt)")
    doc, start, end = pieces[:, 0], pieces[:, 1], pieces[:, 2]
    if len(pieces) and (
        doc.min() < 0
        or doc.max() >= len(lengths)
        or start.min() < 0
        or np.any(start >= end)
        or np.any(end > lengths[doc])
    ):
        raise PlanCacheError("pieces fall outside the dataset's conversations")
    if offsets[0] != 0 or offsets[-1] != len(pieces) or np.any(np.diff(offsets) < 0):
        raise PlanCacheError("sequence offsets are not a partition of the pieces")
    if int(meta["max_seq_length"]) != inputs["seq_length"]:
        raise PlanCacheError(f"max_seq_length {meta['max_seq_length']}, requested {inputs['seq_length']}")
    plan = PackingPlan(pieces, offsets, int(meta["max_seq_length"]), str(meta["mode"]), PlanStats(**meta["stats"]))
    if plan.num_sequences and plan.sequence_lengths().max() > plan.max_seq_length:
        raise PlanCacheError("a sequence holds more tokens than max_seq_length")
    return plan


def _dist():
    """(rank, barrier) — rank 0 and a no-op without an initialised process group."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, lambda group=None: None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), lambda group=None: dist.barrier(group=group)
    return 0, lambda group=None: None


def default_cache_dir(prefix: str) -> str:
    return prefix + "_plans"


def get_plan(
    dataset: SFTIndexedDataset,
    seq_length: int,
    mode="bfd",
    *,
    seed: int = 1234,
    epoch: int = 0,
    overlong: str = "truncate",
    cache_dir: str | None = None,
    group=None,
    pad_multiple: int = 1,
) -> PackingPlan:
    """The plan for ``dataset``, from the cache when valid; rank 0 builds, others mmap.

    Collective when ``torch.distributed`` is initialised: every rank of ``group`` must call it.
    """
    mode = get_mode(mode)
    lengths = dataset.lengths
    inputs = plan_key_inputs(
        dataset_fingerprint(dataset.prefix, lengths), mode, seq_length, seed, epoch, overlong, pad_multiple
    )
    key = plan_key(inputs)
    cache_dir = cache_dir or default_cache_dir(dataset.prefix)
    stem = f"{mode.name}_L{seq_length}{f'_P{pad_multiple}' if pad_multiple > 1 else ''}_{key[:16]}"
    rank, barrier = _dist()

    def build() -> PackingPlan:
        return build_plan(
            lengths,
            seq_length,
            mode,
            seed=seed,
            epoch=epoch,
            overlong=overlong,
            turn_starts=dataset.turns,
            pad_multiple=pad_multiple,
            supervised=dataset_supervised(dataset),
        )

    def try_load() -> PackingPlan | None:
        try:
            return load_plan(cache_dir, stem, inputs, lengths)
        except FileNotFoundError:
            return None
        except PlanCacheError as e:
            warnings.warn(f"{_paths(cache_dir, stem)['meta']}: cached packing plan rejected: {e}; rebuilding")
            return None

    plan = None
    if rank == 0:
        plan = try_load()
        if plan is None:
            plan = build()
            try:
                save_plan(plan, cache_dir, stem, inputs)
                plan = load_plan(cache_dir, stem, inputs, lengths)  # everyone uses the mmap'd copy
            except OSError as e:  # read-only dataset directory: plan in memory, say so
                warnings.warn(
                    f"{cache_dir}: cannot write the packing plan cache ({e}); pass cache_dir= "
                    "to a writable directory to share plans between ranks"
                )
    barrier(group)
    if rank != 0:
        plan = try_load()
        if plan is None:  # rank 0 wrote it just now; a miss means a non-shared filesystem or corruption
            warnings.warn(f"{cache_dir}/{stem}: plan not readable on rank {rank}; building it in memory")
            plan = build()
    return plan
