"""Fast numpy versions of the paper-code packing rules (twins in :mod:`.reference`).

The released code of "Packing Analysis" packs inside chunks of 1,000 samples, so Python
loops over a chunk stay short; these avoid the quadratic scan of the literal rule.
``pack_greedy_chunked`` places items by first-fit decreasing, which gives exactly the
sequences of the code's "open one, scan the rest" loop: an item lands in the first
sequence that has room for it in both, and sequences open in the same order (the tests
compare the two on random inputs). No C++: 1M items take seconds (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np


def _check(lengths) -> np.ndarray:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"item {i} has length {int(lengths[i])} < 1")
    return lengths


def pack_greedy_chunked(lengths, capacity: int, chunk: int):
    """First-fit decreasing per chunk; items over ``capacity`` are left out (dropped)."""
    lengths = _check(lengths)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    order_parts, sizes = [], []
    for c0 in range(0, lengths.size, chunk):
        idx = c0 + np.argsort(-lengths[c0:c0 + chunk], kind="stable")
        idx = idx[lengths[idx] <= capacity]  # over-long: fits nowhere, never placed
        room = np.empty(idx.size, dtype=np.int64)
        bin_of = np.empty(idx.size, dtype=np.int64)
        nb = 0
        for k, length in enumerate(lengths[idx].tolist()):
            b = int(np.argmax(room[:nb] >= length)) if nb else 0
            if nb == 0 or room[b] < length:
                b, nb = nb, nb + 1
                room[b] = capacity
            room[b] -= length
            bin_of[k] = b
        by_bin = np.argsort(bin_of, kind="stable")  # bins in opening order, items sorted within
        order_parts.append(idx[by_bin])
        sizes.append(np.bincount(bin_of, minlength=nb))
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
    counts = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    return order.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def pack_random_chunked(lengths, capacity: int, chunk: int):
    """Concatenate each chunk in dataset order, keep whole blocks of ``capacity``, cut."""
    lengths = _check(lengths)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    items, los, his, counts = [], [], [], []
    num_split = 0
    for c0 in range(0, lengths.size, chunk):
        ln = lengths[c0:c0 + chunk]
        ends = np.cumsum(ln)
        keep = int(ends[-1]) // capacity * capacity
        if keep == 0:
            continue
        starts = ends - ln
        blocks = np.arange(capacity, keep + 1, capacity)
        cuts = np.union1d(np.concatenate([[0], ends[ends < keep]]), blocks)  # piece boundaries in [0, keep]
        a, b = cuts[:-1], cuts[1:]
        doc = np.searchsorted(ends, a, side="right")  # the item holding token a
        items.append(c0 + doc)
        los.append(a - starts[doc])
        his.append(b - starts[doc])
        counts.append(np.bincount(np.searchsorted(blocks, b, side="left"), minlength=blocks.size))
        num_split += int((np.bincount(doc) > 1).sum())
    cat = lambda x: np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64)  # noqa: E731
    counts = cat(counts)
    return cat(items), cat(los), cat(his), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), num_split
