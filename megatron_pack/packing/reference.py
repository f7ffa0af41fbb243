"""Readable Python twins of the C++ packing loops in ``csrc/packing.cpp``.

They exist to pin down the algorithms: tests require the C++ engine to return exactly
what these return (same tie-breaks, same shuffle), and ``build_plan(..., engine="reference")``
runs them end to end. Inputs are item lengths already cut to ``1 <= length <= capacity``.

Every function returns ``(order, seq_offsets)``: item indices in sequence order and
int64 offsets into them, ``len(seq_offsets) == num_sequences + 1`` — except
:func:`pack_random`, which also returns the token range of every piece.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

from megatron_pack.packing.seeds import _MASK64, SplitMix64, derive_seed  # noqa: F401 (the twins' generator)


def shuffle(n: int, seed: int) -> np.ndarray:
    """Fisher-Yates permutation of ``range(n)``: for i = n-1..1 swap i with next() % (i+1)."""
    perm = list(range(n))
    rng = SplitMix64(seed)
    for i in range(n - 1, 0, -1):
        j = rng.next() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


def _check(lengths, capacity: int) -> list[int]:
    lengths = [int(x) for x in lengths]
    bad = [i for i, x in enumerate(lengths) if not 1 <= x <= capacity]
    if bad:
        raise ValueError(f"item {bad[0]} has length {lengths[bad[0]]}, outside [1, {capacity}]")
    return lengths


def _sort_desc(lengths: list[int], idx: list[int]) -> list[int]:
    """``idx`` ordered longest first; Python's sort is stable, so ties keep their order."""
    return sorted(idx, key=lambda i: -lengths[i])


def _result(order: list[int], offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(order, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def pack_padding(lengths, capacity: int):
    n = len(_check(lengths, capacity))
    return _result(list(range(n)), list(range(n + 1)))


def pack_greedy(lengths, capacity: int):
    """The paper's greedy rule: longest first; append while it fits, else start a new sequence."""
    lengths = _check(lengths, capacity)
    order = _sort_desc(lengths, list(range(len(lengths))))
    offsets, fill = [0], 0
    for k, i in enumerate(order):
        if fill + lengths[i] > capacity:
            offsets.append(k)
            fill = 0
        fill += lengths[i]
    if order:
        offsets.append(len(order))
    return _result(order, offsets)


def _best_fit(lengths: list[int], idx: list[int], capacity: int) -> list[list[int]]:
    """Place ``idx`` in order, each into the open bin with the least room that still fits it.

    ``caps`` is the sorted list of remaining capacities that have open bins, ``bins_at[c]``
    a min-heap of those bins' ids (ties go to the lowest id). Full bins are forgotten.
    """
    bins: list[list[int]] = []
    caps: list[int] = []
    bins_at: dict[int, list[int]] = {}
    for i in idx:
        length = lengths[i]
        k = bisect.bisect_left(caps, length)
        if k == len(caps):
            b, cap = len(bins), capacity
            bins.append([])
        else:
            cap = caps[k]
            b = heapq.heappop(bins_at[cap])
            if not bins_at[cap]:
                del caps[k], bins_at[cap]
        bins[b].append(i)
        left = cap - length
        if left > 0:
            if left not in bins_at:
                bisect.insort(caps, left)
                bins_at[left] = []
            heapq.heappush(bins_at[left], b)
    return bins


def _flatten(bins: list[list[int]], order: list[int], offsets: list[int]) -> None:
    for b in bins:
        order.extend(b)
        offsets.append(len(order))


def pack_bfd(lengths, capacity: int):
    """Best-fit decreasing: longest first, each into the fullest sequence it fits in."""
    lengths = _check(lengths, capacity)
    order, offsets = [], [0]
    _flatten(_best_fit(lengths, _sort_desc(lengths, list(range(len(lengths)))), capacity), order, offsets)
    return _result(order, offsets)


def pack_windowed_bfd(lengths, capacity: int, window: int, seed: int):
    """Shuffle, then best-fit decreasing inside each window of ``window`` consecutive items."""
    lengths = _check(lengths, capacity)
    if window < 1:
        raise ValueError("window must be >= 1")
    perm = shuffle(len(lengths), seed).tolist()
    order, offsets = [], [0]
    for w0 in range(0, len(perm), window):
        chunk = perm[w0 : w0 + window]
        _flatten(_best_fit(lengths, sorted(chunk, key=lambda i: -lengths[i]), capacity), order, offsets)
    return _result(order, offsets)


def pack_bfd_groups(lengths, group_offsets, capacity: int):
    """Best-fit decreasing inside each group of consecutive items (per-step packing: a group is
    one optimizer step's conversations). Returns ``(order, seq_offsets, group_seq_offsets)``."""
    lengths = _check(lengths, capacity)
    bounds = [int(x) for x in np.asarray(group_offsets).ravel()]
    if not bounds or bounds[0] != 0 or bounds[-1] != len(lengths) or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError("group_offsets must run from 0 to len(lengths), non-decreasing")
    order, offsets, group_seq = [], [0], [0]
    for g0, g1 in zip(bounds, bounds[1:]):
        chunk = list(range(g0, g1))
        _flatten(_best_fit(lengths, sorted(chunk, key=lambda i: -lengths[i]), capacity), order, offsets)
        group_seq.append(len(offsets) - 1)
    return (*_result(order, offsets), np.asarray(group_seq, dtype=np.int64))


def pack_random(lengths, capacity: int, seed: int):
    """The paper's random packing: shuffle, lay items end to end, cut every ``capacity`` tokens.

    Returns ``(item, lo, hi, seq_offsets, num_split_items)``: piece p is tokens
    ``[lo[p], hi[p])`` of item ``item[p]``.
    """
    lengths = _check(lengths, capacity)
    out = ([], [], [], [0])
    num_split, fill = _lay_end_to_end(shuffle(len(lengths), seed).tolist(), lengths, capacity, out)
    if fill:
        out[3].append(len(out[0]))
    return _pieces_result(out, num_split)


def _lay_end_to_end(order, lengths, capacity: int, out: tuple, keep=None) -> tuple:
    """Lay the items of ``order`` end to end and cut every ``capacity`` tokens, stopping after
    ``keep`` tokens (all when None). Appends pieces to ``out = (item, lo, hi, offsets)`` and
    closes each full sequence; returns ``(items split, tokens in the open last sequence)``."""
    item, lo, hi, offsets = out
    fill = pos = num_split = 0
    for i in order:
        off = pieces = 0
        while off < lengths[i] and (keep is None or pos < keep):
            take = min(lengths[i] - off, capacity - fill)
            item.append(i)
            lo.append(off)
            hi.append(off + take)
            off += take
            fill += take
            pos += take
            pieces += 1
            if fill == capacity:
                offsets.append(len(item))
                fill = 0
        num_split += pieces > 1
    return num_split, fill


def _pieces_result(out: tuple, num_split: int):
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return (*(as64(x) for x in out), num_split)


def cut_at_turns(lengths, turn_offsets, turn_values, capacity: int):
    """The ``cut-at-turns`` over-long policy: per conversation, items of whole turns.

    Conversation k (``lengths[k]`` tokens) has turn starts
    ``turn_values[turn_offsets[k]:turn_offsets[k + 1]]``. Each item takes as many whole
    turns as fit in ``capacity``; a turn longer than that is cut every ``capacity`` tokens
    (an in-turn cut). Returns ``(owner, start, end, num_in_turn_cuts)``.
    """
    owner, start, end, inside = [], [], [], 0
    for k, length in enumerate(int(x) for x in lengths):
        turns = [int(t) for t in turn_values[turn_offsets[k] : turn_offsets[k + 1]]]
        bounds = sorted({t for t in turns if 0 < t < length} | {length})
        pos = 0
        while pos < length:
            reach = [b for b in bounds if pos < b <= pos + capacity]  # turn boundaries within reach
            nxt = reach[-1] if reach else pos + capacity
            inside += not reach
            owner.append(k)
            start.append(pos)
            end.append(nxt)
            pos = nxt
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return as64(owner), as64(start), as64(end), inside


# --- The released code of "Packing Analysis" (a LLaMA-Factory fork), as it behaves --------------
# Both rules work inside chunks of ``chunk`` consecutive items in dataset order (the
# ``datasets.map`` batch, 1,000 by default) and take items of any length: the code's own
# handling of over-long samples replaces the over-long policy.


def _chunks(n: int, chunk: int):
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [list(range(c0, min(n, c0 + chunk))) for c0 in range(0, n, chunk)]


def _check_positive(lengths) -> list[int]:
    lengths = [int(x) for x in lengths]
    bad = [i for i, x in enumerate(lengths) if x < 1]
    if bad:
        raise ValueError(f"item {bad[0]} has length {lengths[bad[0]]} < 1")
    return lengths


def pack_greedy_chunked(lengths, capacity: int, chunk: int):
    """``packing_style full-no-cut``, literally: per chunk, sort longest first; for each
    unused item open a sequence and scan it and every later unused item, taking each that
    still fits. An item longer than ``capacity`` never fits, so the sequence opened at it
    fills with later items and it is never placed: silently dropped (absent from ``order``).

    Example, capacity 8, chunk 3, lengths [5, 9, 2, 6, 3]::

        chunk 0: sorted 9 5 2 -> open at 9: 9 does not fit, takes 5 and 2 -> [0, 2]; 9 never placed
        chunk 1: sorted 6 3   -> [3] then [4]          (6 + 3 > 8)
        order = [0, 2, 3, 4], seq_offsets = [0, 2, 3, 4]; item 1 dropped
    """
    lengths = _check_positive(lengths)
    order, offsets = [], [0]
    for idx in _chunks(len(lengths), chunk):
        idx = _sort_desc(lengths, idx)
        used = [False] * len(idx)
        for a in range(len(idx)):
            if used[a]:
                continue
            seq, fill = [], 0
            for b in range(a, len(idx)):
                if not used[b] and fill + lengths[idx[b]] <= capacity:
                    used[b] = True
                    seq.append(idx[b])
                    fill += lengths[idx[b]]
            if seq:
                order.extend(seq)
                offsets.append(len(order))
    return _result(order, offsets)


def pack_random_chunked(lengths, capacity: int, chunk: int):
    """``packing_style full``: per chunk, concatenate in dataset order, keep
    ``total // capacity * capacity`` tokens, cut every ``capacity``; the remainder of every
    chunk is dropped (a chunk shorter than ``capacity`` entirely). Returns
    ``(item, lo, hi, seq_offsets, num_split_items)`` like :func:`pack_random`.

    Example, capacity 4, chunk 2, lengths [3, 3, 5]::

        chunk 0: a a a b b b -> keep 4: [a a a b]; b's last 2 tokens dropped
        chunk 1: c c c c c   -> keep 4: [c c c c]; c's last token dropped
    """
    lengths = _check_positive(lengths)
    out = ([], [], [], [0])
    num_split = 0
    for idx in _chunks(len(lengths), chunk):
        keep = sum(lengths[i] for i in idx) // capacity * capacity  # a whole number of sequences
        num_split += _lay_end_to_end(idx, lengths, capacity, out, keep)[0]
    return _pieces_result(out, num_split)
