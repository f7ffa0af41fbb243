"""Packing plans: which token slices of which conversations fill each training sequence.

A plan is flat arrays, the same for every mode, so 10M+ conversations cost no Python
objects::

    pieces       int64 [P, 3]  (doc, start, end): tokens [start, end) of conversation doc
    seq_offsets  int64 [N + 1] sequence i is pieces[seq_offsets[i]:seq_offsets[i + 1]]

Example, capacity 8, lengths [5, 3, 6, 2], mode ``bfd``::

    sorted 6 5 3 2  ->  seq 0: doc 2 [0,6) + doc 3 [0,2)   (8/8)
                        seq 1: doc 0 [0,5) + doc 1 [0,3)   (8/8)
    pieces = [[2,0,6],[3,0,2],[0,0,5],[1,0,3]]   seq_offsets = [0, 2, 4]

Building a plan is two steps:

1. the over-long policy turns conversations into *items* of at most ``max_seq_length``
   tokens (``truncate``: keep the head; ``drop``: leave it out; ``cut-at-turns``: cut at
   message-turn starts, inside a turn only when one turn alone is too long);
2. a packing mode from :data:`~megatron_pack.packing.modes.PACKING_MODES` orders the items
   into sequences.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_pack.packing.modes import PACKING_MODES, Engine, PackingMode, _engine, get_mode  # noqa: F401
from megatron_pack.packing.seeds import derive_seed

OverlongPolicy = Literal["truncate", "drop", "cut-at-turns"]
#: Packing-time over-long policies. ``cut-at-turns`` cuts the *stored token stream* at turn
#: starts (compare preprocessing's ``split-chat``, which re-renders each piece as a full chat).
OVERLONG_POLICIES = ("truncate", "drop", "cut-at-turns")
#: Retired spelling -> policy, still accepted on every command line.
DEPRECATED_OVERLONG = {"split_turns": "cut-at-turns"}
#: What an --overlong flag of the packing tools accepts.
OVERLONG_CHOICES = OVERLONG_POLICIES + tuple(DEPRECATED_OVERLONG)


def overlong_policy(name: str) -> str:
    """The canonical packing-time policy for ``name``; the retired spelling ``split_turns``
    still works, with a one-line deprecation note on stderr."""
    if name in DEPRECATED_OVERLONG:
        new = DEPRECATED_OVERLONG[name]
        print(f"note: --overlong {name} is deprecated; use --overlong {new}", file=sys.stderr)
        return new
    if name not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy must be one of {', '.join(OVERLONG_POLICIES)}, got {name!r}")
    return name


@dataclass
class PlanStats:
    """Token accounting: ``placed_tokens + truncated_tokens + dropped_tokens + unsupervised_tokens
    == total_tokens``."""

    num_docs: int = 0
    total_tokens: int = 0
    placed_tokens: int = 0
    empty_docs: int = 0
    truncated_docs: int = 0
    truncated_tokens: int = 0
    dropped_docs: int = 0
    dropped_tokens: int = 0
    turn_split_docs: int = 0  # over-long conversations cut into several items at turn starts
    in_turn_cuts: int = 0  # cuts that had to fall inside a turn (one turn > max length)
    split_items: int = 0  # items split across sequences by the mode (``random``)
    unsupervised_items: int = 0  # items left with no supervised token (after truncation): not packed
    unsupervised_tokens: int = 0
    # Dropped by the mode itself (the paper-code variants ``greedy:chunk=N``/``random:chunk=N``:
    # over-long conversations, chunk remainders); already included in ``dropped_*``.
    mode_dropped_docs: int = 0  # conversations of which no token was placed
    mode_dropped_tokens: int = 0


@dataclass
class PackingPlan:
    """The output of :func:`build_plan`; see the module docstring for the layout."""

    pieces: np.ndarray
    seq_offsets: np.ndarray
    max_seq_length: int
    mode: str
    stats: PlanStats

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def doc(self) -> np.ndarray:
        return self.pieces[:, 0]

    @property
    def piece_lengths(self) -> np.ndarray:
        return self.pieces[:, 2] - self.pieces[:, 1]

    def sequence(self, i: int) -> np.ndarray:
        """The ``(doc, start, end)`` rows of sequence ``i``."""
        return self.pieces[self.seq_offsets[i] : self.seq_offsets[i + 1]]

    def pieces_per_sequence(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def sequence_lengths(self) -> np.ndarray:
        """Real tokens in each sequence."""
        csum = np.concatenate([[0], np.cumsum(self.piece_lengths)])
        return csum[self.seq_offsets[1:]] - csum[self.seq_offsets[:-1]]

    @property
    def efficiency(self) -> float:
        """Real tokens over capacity (num_sequences * max_seq_length)."""
        return self.stats.placed_tokens / max(1, self.num_sequences * self.max_seq_length)

    @property
    def lower_bound_sequences(self) -> int:
        return math.ceil(self.stats.placed_tokens / self.max_seq_length)


def apply_overlong(
    lengths: np.ndarray,
    max_seq_length: int,
    overlong: OverlongPolicy = "truncate",
    turn_starts=None,
    engine: Engine = "cpp",
) -> tuple[np.ndarray, PlanStats]:
    """Conversations -> items ``(doc, start, end)`` of 1..max_seq_length tokens, in doc order.

    ``turn_starts[i]`` (indexable, e.g. ``SFTIndexedDataset.turns``, or a callable) gives the
    token offsets where the turns of conversation ``i`` start; it is read only for
    over-long conversations under ``cut-at-turns``. Without it every cut is inside a turn.

    ``cut-at-turns`` cuts greedily: each item takes as many whole turns as fit; a turn
    longer than ``max_seq_length`` is cut every ``max_seq_length`` tokens (counted in
    ``in_turn_cuts``). Example, max 6, length 12, turns [0, 3, 6, 8]::

        turns   |u u u|a a a|u u|a a a a|
        items   [0,6)         [6,12)
    """
    overlong = overlong_policy(overlong)
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"negative length at conversation {int(np.argmin(lengths))}")
    stats = PlanStats(num_docs=int(lengths.size), total_tokens=int(lengths.sum()))
    stats.empty_docs = int((lengths == 0).sum())
    fits = (lengths > 0) & (lengths <= max_seq_length)
    over = np.flatnonzero(lengths > max_seq_length)
    if over.size == 0 or overlong == "drop":
        stats.dropped_docs = int(over.size)
        stats.dropped_tokens = int(lengths[over].sum())
        items = _whole_items(np.flatnonzero(fits), lengths)
    elif overlong == "truncate":
        stats.truncated_docs = int(over.size)
        stats.truncated_tokens = int((lengths[over] - max_seq_length).sum())
        items = _whole_items(np.flatnonzero(lengths > 0), np.minimum(lengths, max_seq_length))
    else:
        owner, start, end, inside = _engine(engine).cut_at_turns(
            lengths[over], *_gather_turns(over, turn_starts), max_seq_length)
        stats.turn_split_docs = int(over.size)
        stats.in_turn_cuts = int(inside)
        cut = np.stack([over[np.asarray(owner, dtype=np.int64)], np.asarray(start), np.asarray(end)], axis=1)
        items = np.concatenate([_whole_items(np.flatnonzero(fits), lengths), cut.astype(np.int64).reshape(-1, 3)])
        items = np.take(items, np.lexsort((items[:, 1], items[:, 0])), axis=0)  # back to doc order
    stats.placed_tokens = int((items[:, 2] - items[:, 1]).sum())
    return items, stats


def _drop_empty(pieces: np.ndarray, seq_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove pieces with no tokens, and sequences left without pieces."""
    keep = pieces[:, 2] > pieces[:, 1]
    if keep.all():
        return pieces, seq_offsets
    seq_of = np.repeat(np.arange(len(seq_offsets) - 1), np.diff(seq_offsets))
    counts = np.bincount(seq_of[keep], minlength=len(seq_offsets) - 1)
    counts = counts[counts > 0]
    return pieces[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def drop_unsupervised(items: np.ndarray, stats: PlanStats, supervised) -> np.ndarray:
    """``items`` without those whose ``supervised(items)`` count is 0; updates ``stats``."""
    counts = np.asarray(supervised(items), dtype=np.int64)
    if counts.shape != (len(items),):
        raise ValueError(f"supervised() returned shape {counts.shape} for {len(items)} items")
    empty = counts <= 0
    if empty.any():
        lost = int((items[empty, 2] - items[empty, 1]).sum())
        stats.unsupervised_items = int(empty.sum())
        stats.unsupervised_tokens = lost
        stats.placed_tokens -= lost
        items = items[~empty]
    return items


def dataset_supervised(dataset):
    """``supervised`` for :func:`build_plan` over an SFT dataset: targets of item ``[a, b)`` are
    ``loss_mask[a + 1 : b]`` (the first token of a piece predicts nothing across a boundary).
    Whole conversations use the per-conversation counts; cut items read their slice."""

    def count(items: np.ndarray) -> np.ndarray:
        per_doc = dataset.supervised_counts()
        lengths = dataset.lengths
        doc, start, end = items[:, 0], items[:, 1], items[:, 2]
        out = per_doc[doc].astype(np.int64)
        for j in np.flatnonzero((start != 0) | (end != lengths[doc])):
            _, mask = dataset.get_slice(int(doc[j]), int(start[j]), int(end[j]))
            out[j] = int(np.count_nonzero(mask[1:]))
        return out

    return count


def _gather_turns(docs: np.ndarray, turn_starts) -> tuple[np.ndarray, np.ndarray]:
    """Turn starts of ``docs`` as flat ``(offsets, values)`` for the engine."""
    if turn_starts is None:
        return np.zeros(docs.size + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    get = turn_starts if callable(turn_starts) else turn_starts.__getitem__
    parts = [np.asarray(get(int(d)), dtype=np.int64).ravel() for d in docs]
    offsets = np.zeros(docs.size + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    return offsets, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def _whole_items(docs: np.ndarray, ends: np.ndarray) -> np.ndarray:
    items = np.zeros((docs.size, 3), dtype=np.int64)
    items[:, 0] = docs
    items[:, 2] = ends[docs]
    return items


def build_plan(
    lengths,
    max_seq_length: int,
    mode: "str | PackingMode" = "bfd",
    *,
    seed: int = 1234,
    epoch: int = 0,
    turn_starts=None,
    overlong: OverlongPolicy = "truncate",
    engine: Engine = "cpp",
    pad_multiple: int = 1,
    supervised=None,
) -> PackingPlan:
    """Pack conversations of ``lengths`` tokens into sequences of ``max_seq_length``.

    ``mode`` is a registry name (see :data:`PACKING_MODES`) or config; shuffling modes
    draw their permutation from ``(seed, epoch)``, so each epoch gets a new one and the
    same arguments always give the same plan. ``engine="reference"`` runs the Python twin.

    ``pad_multiple`` > 1 (context parallelism: every document is padded to a multiple of
    2*CP) packs each item at its *padded* length, so the padded pieces of a sequence never
    exceed ``max_seq_length`` (which must then be a multiple of it); the pieces keep their
    real token ranges. Splitting modes cut at multiples of it, so a cut piece pads back to
    at most what it was given.

    ``supervised(items) -> counts``, when given, says how many trained targets each item
    ``(doc, start, end)`` holds; items with none (a prompt cut off before its answer, a
    ``--loss-on last`` record whose answer fell off) are left out and counted in
    ``stats.unsupervised_items``: packing them only costs compute, and a global batch made of
    them has no token to average over.
    """
    mode = get_mode(mode)
    if pad_multiple < 1 or (pad_multiple > 1 and max_seq_length % pad_multiple):
        raise ValueError(
            f"max_seq_length {max_seq_length} is not a multiple of the per-document padding {pad_multiple}"
        )
    if mode.keeps_overlong:  # the paper-code variants see every conversation whole
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        items, stats = apply_overlong(lengths, max(max_seq_length, int(lengths.max(initial=1))), "truncate")
    else:
        items, stats = apply_overlong(lengths, max_seq_length, overlong, turn_starts, engine)
    if supervised is not None and len(items):
        items = drop_unsupervised(items, stats, supervised)
    item_len = np.ascontiguousarray(items[:, 2] - items[:, 1])
    if pad_multiple > 1:
        item_len = -(-item_len // pad_multiple) * pad_multiple
    item, lo, hi, seq_offsets, split = mode.pack(item_len, max_seq_length, derive_seed(seed, epoch), engine)
    item = np.asarray(item, dtype=np.int64)
    pieces = np.take(items, item, axis=0)  # much faster than items[item] for [n, 3]
    if lo is not None:
        real_end = pieces[:, 2].copy()
        pieces[:, 2] = pieces[:, 1] + np.asarray(hi)
        pieces[:, 1] += np.asarray(lo)
        if pad_multiple > 1:  # a cut may fall in an item's padding: clip, drop padding-only pieces
            pieces[:, 2] = np.minimum(pieces[:, 2], real_end)
            pieces, seq_offsets = _drop_empty(pieces, np.asarray(seq_offsets, dtype=np.int64))
    stats.split_items = int(split)
    if mode.keeps_overlong:
        placed = int((pieces[:, 2] - pieces[:, 1]).sum())
        stats.mode_dropped_tokens = stats.placed_tokens - placed
        stats.mode_dropped_docs = int(items.shape[0] - np.unique(pieces[:, 0]).size)
        stats.dropped_tokens += stats.mode_dropped_tokens
        stats.dropped_docs += stats.mode_dropped_docs
        stats.placed_tokens = placed
    return PackingPlan(
        pieces=np.ascontiguousarray(pieces),
        seq_offsets=np.asarray(seq_offsets, dtype=np.int64),
        max_seq_length=int(max_seq_length),
        mode=str(mode),
        stats=stats,
    )
