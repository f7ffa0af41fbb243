#!/usr/bin/env python
"""What validating an SFT dataset on open costs: a synthetic 1M-conversation indexed dataset,
opened with and without the checks of :mod:`megatron_pack.files.indexed_check`.

    python benchmarks/bench_open_validation.py                       # 1M conversations, ~128 tokens each
    python benchmarks/bench_open_validation.py --docs 1000000 --mean-length 1024 --dir /scratch

The dataset is written straight in Megatron-Core's ``.bin``/``.idx`` format with numpy (random
token ids below the vocabulary, random 0/1 loss mask, four turn starts per conversation) plus a
preprocessing summary naming its files (the loss mask hashed, its supervised count), so building
it takes seconds. Each timing is the best of
``--repeats`` runs with the files in the page cache (a cold first open pays the disk read of the
mask and token files once more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
import time

import numpy as np

from megatron_pack.files.indexed import PART_DTYPES, PART_SUFFIXES, SFTIndexedDataset, dataset_files
from megatron_pack.files.indexed_check import (
    SUMMARY_SUFFIX,
    _sha256,
    check_summary,
    check_token_ids,
    dataset_manifest,
    validate_dataset,
)

_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4}


def write_part(path_prefix: str, lengths: np.ndarray, data: np.ndarray) -> None:
    data.tofile(path_prefix + ".bin")
    n = lengths.size
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * data.itemsize, out=pointers[1:])
    with open(path_prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, _CODES[data.dtype], n, n + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def build(prefix: str, docs: int, mean_length: int, vocab: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(4, mean_length // 8), 2 * mean_length - max(4, mean_length // 8) + 1, docs,
                           dtype=np.int64)
    total = int(lengths.sum())
    write_part(prefix, lengths, rng.integers(0, vocab, total, dtype=np.int32))
    mask = rng.integers(0, 2, total, dtype=np.uint8)
    write_part(prefix + PART_SUFFIXES[1], lengths, mask)
    turns = np.stack([np.zeros_like(lengths), lengths // 4, lengths // 2, 3 * lengths // 4], axis=1)
    write_part(prefix + PART_SUFFIXES[2], np.full(docs, 4), turns.astype(np.int32).ravel())
    with open(prefix + SUMMARY_SUFFIX, "w") as f:
        json.dump({"supervised_tokens": int(np.count_nonzero(mask)),
                   "files": dataset_manifest(dataset_files(prefix), hash_also=(mask_bin(prefix),))}, f)
    return total


def mask_bin(prefix: str) -> str:
    return prefix + PART_SUFFIXES[1] + ".bin"


def best(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--mean-length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the dataset (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        prefix = os.path.join(d, "bench")
        t0 = time.perf_counter()
        tokens = build(prefix, args.docs, args.mean_length, args.vocab)
        built = time.perf_counter() - t0
        size = sum(os.path.getsize(p) for p in dataset_files(prefix))
        parts = tuple(zip(PART_SUFFIXES, PART_DTYPES))
        rows = {
            "open, no validation (Megatron IndexedDataset x3)": best(lambda: SFTIndexedDataset(prefix, validate=False),
                                                                      args.repeats),
            "open with validation (default)": best(lambda: SFTIndexedDataset(prefix), args.repeats),
            "  summary match (sizes, .idx and loss-mask SHA-256, supervised count)": best(
                lambda: check_summary(prefix, dataset_files(prefix), mask_bin=mask_bin(prefix)), args.repeats),
            "    of which loss-mask SHA-256": best(lambda: _sha256(mask_bin(prefix)), args.repeats),
            "    of which supervised count (np.count_nonzero)": best(
                lambda: np.count_nonzero(np.memmap(mask_bin(prefix), mode="r", dtype=np.uint8)), args.repeats),
            "  structure + mask + turns": best(lambda: validate_dataset(prefix, parts), args.repeats),
            "token ids < vocab (once per training run)": best(lambda: check_token_ids(prefix, args.vocab),
                                                               args.repeats),
            "supervised counts (plan building, once)": best(
                lambda: SFTIndexedDataset(prefix, validate=False).supervised_counts(), args.repeats),
        }
    result = {"docs": args.docs, "tokens": tokens, "bytes": size, "build_seconds": built,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "seconds": rows}
    print(f"{args.docs:,} conversations, {tokens:,} tokens, {size / 2**20:,.0f} MiB on disk "
          f"(built in {built:.1f} s); best of {args.repeats}, warm page cache")
    print("| what | seconds |\n|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
