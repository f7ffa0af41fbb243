"""Data blends: Megatron-LM's ``--data-path W1 P1 W2 P2 ...`` over packed SFT datasets.

Each source is packed **on its own plan** and the blend interleaves whole sequences, so every
sequence belongs to exactly one source. Why not one joint plan over all sources: joint packing
fills a little better (only the last sequence of each source is left part-empty here, and
``bfd`` is within 0.02 points of the bound per source), but then the weights would hold only
in expectation and a sequence could mix sources, so neither the mix nor the per-source loss
would be exact. Per-source plans also stay valid when only the weights change (the cache
keys on the source, not on the blend).

Blend epoch ``e`` has ``N_e = sum_d len_d(e)`` sequences (``len_d(e)``: source ``d``'s plan
for its epoch ``e``). With ``k`` sources and ``delta = 1 / (2k - 2)``, draw ``t`` (1-based) may go
to source ``d`` only while ``count_d + delta <= t * w_d`` (drawn, it is at most ``1 - delta``
ahead), and goes to the one of those whose next sequence is due first -- the smallest
``(count_d + 1 - delta) / w_d``, the time it would lag by more than ``1 - delta`` -- ties to the
lower id::

    weights 0.5 A, 0.3 B, 0.2 C, N = 10:   A B A C A B A C A B     (5 A, 3 B, 2 C)

This is earliest deadline first on the chairman assignment problem. A schedule within
``1 - 1/(2k-2)`` of every weight at every prefix exists for any weights (Tijdeman 1980), and
EDF finds one, so at every prefix ``n`` of an epoch every source has
``floor(n w_d) <= count_d <= ceil(n w_d)``: less than one sequence behind *and* less than one
ahead of its weight (within 1/2 for two sources, 3/4 for three, 0.95 for ten). Megatron-Core's
largest-deficit rule (``build_blending_indices``, used here before) bounds only the lead: with
4+ sources it let a source lag by a little over one sequence. With two sources the two rules
coincide, and the engine computes that case in the old arithmetic, so two-source blends keep
their order bit for bit. The loop runs in the C++ engine (``_packing``): milliseconds per 300k
sequences, where the Python loop took 0.1-1.5 s at every epoch switch.

Source ``d`` is read as an endless stream -- its epoch 0 order, then epoch 1's, ... -- and
blend epoch ``e`` takes the next ``count_d(e)`` sequences of it, so a small source is
repeated (new plan and order each pass) and a large one is sub-sampled, as in Megatron-LM.
Everything is a pure function of ``(weights, seed, epoch)``: resuming at ``(epoch, step)``
replays the same blend. With no weights (``--data-path A B``, ``--valid-data-path``), each
source counts with its own size: every sequence exactly once per epoch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


class BlendError(ValueError):
    """A malformed blend; the message names the flag."""


@dataclass(frozen=True)
class Blend:
    """Source prefixes and their normalised weights (``None``: by size, every sequence once)."""

    prefixes: tuple
    weights: Optional[tuple] = None

    @property
    def plain(self) -> bool:
        """One prefix without a weight: the plain dataset, not a blend."""
        return len(self.prefixes) == 1 and self.weights is None

    @property
    def names(self) -> tuple:
        """Short unique names for logs: the prefix's file name (with ``#k`` when repeated)."""
        base = [os.path.basename(p.rstrip("/")) or p for p in self.prefixes]
        return tuple(b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base))

    def describe(self) -> str:
        if self.weights is None:
            return " + ".join(self.names)
        return ", ".join(f"{w:.4g} {n}" for w, n in zip(self.weights, self.names))


def _as_float(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def parse_blend(value, flag: str = "--data-path") -> Blend:
    """``PREFIX`` | ``W1 P1 W2 P2 ...`` | ``P1 P2 ...`` (a string or the list argparse gives).

    Like Megatron-LM: an even-length list whose odd entries are numbers is ``weight prefix``
    pairs (weights normalised to sum 1); a list of prefixes without numbers weighs each source
    by its size. A one-entry weighted list (``1 PREFIX``) still goes through the blend.
    """
    tokens = [value] if isinstance(value, str) else [str(v) for v in value]
    if not tokens or any(not t for t in tokens):
        raise BlendError(f"{flag}: empty")
    numbers = [_as_float(t) for t in tokens[0::2]]
    if len(tokens) % 2 == 0 and all(n is not None for n in numbers):
        prefixes = tokens[1::2]
        bad = [p for p in prefixes if _as_float(p) is not None]
        if bad:
            raise BlendError(f"{flag}: expected 'WEIGHT PREFIX' pairs, got a number {bad[0]!r} where a prefix goes")
        for w in numbers:
            if not (math.isfinite(w) and w > 0):
                raise BlendError(f"{flag}: weights must be finite and > 0, got {w}")
        total = sum(numbers)
        return Blend(tuple(prefixes), tuple(w / total for w in numbers))
    if any(n is not None for n in numbers) or any(_as_float(t) is not None for t in tokens):
        raise BlendError(
            f"{flag}: give one PREFIX, 'W1 P1 W2 P2 ...' pairs, or prefixes only; got {' '.join(tokens)!r}"
        )
    return Blend(tuple(tokens), None)


def blend_schedule(shares: Sequence[float], n: int) -> np.ndarray:
    """Source id (int32) of each of ``n`` draws (the rule of the module docstring); ``shares``
    need not sum to 1. Integer shares (source sizes) are exact (128-bit products); float
    weights are compared in IEEE double, cross-multiplied."""
    from megatron_pack import _packing  # compiled engine, imported where used

    if not hasattr(_packing, "blend_schedule_weights"):
        raise ImportError(
            "megatron_pack._packing predates the blend schedule: rebuild it with `python setup.py build_ext --inplace`"
        )
    arr = np.asarray(shares)
    if arr.dtype.kind in "iu":
        return _packing.blend_schedule_sizes(arr.astype(np.int64), int(n))
    return _packing.blend_schedule_weights(arr.astype(np.float64), int(n))


class _BlendPlan:
    """The per-sequence figures the stream and the batch balancer read from a plan
    (``pieces_per_sequence``, ``sequence_lengths``, ``piece_lengths``/``seq_offsets``), over the
    blend's sequences in blend order."""

    def __init__(self, pieces: np.ndarray, lengths: np.ndarray, piece_lengths: np.ndarray, capacity: int):
        self._pieces, self._lengths, self.max_seq_length = pieces, lengths, capacity
        self.piece_lengths = piece_lengths
        self.seq_offsets = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int64)

    @property
    def num_sequences(self) -> int:
        return int(self._lengths.size)

    def pieces_per_sequence(self) -> np.ndarray:
        return self._pieces

    def sequence_lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def efficiency(self) -> float:
        n = self.num_sequences
        return float(self._lengths.sum()) / (n * self.max_seq_length) if n else 0.0


def _summed_stats(stats: list):
    """One ``PlanStats`` adding up the counters of the source plans an epoch reads."""
    import dataclasses

    if not stats:
        return None
    return dataclasses.replace(
        stats[0],
        **{
            f.name: sum(getattr(x, f.name) for x in stats)
            for f in dataclasses.fields(stats[0])
            if isinstance(getattr(stats[0], f.name), (int, float))
        },
    )


class BlendedPackedDataset:
    """Sequences of several packed sources, interleaved by weight (see the module docstring).

    ``sources[d](k)`` returns source ``d``'s :class:`PackedSFTDataset` for its epoch ``k``
    (building it may be collective: every rank calls :meth:`set_epoch` in the same order).
    Items carry ``"source"`` (the source id), which the loss uses to report per source.
    """

    def __init__(
        self,
        sources: Sequence[Callable],
        names: Sequence[str],
        weights: Optional[Sequence[float]] = None,
        epoch: int = 0,
    ):
        if not sources:
            raise ValueError("a blend needs at least one source")
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        self._make, self.names = list(sources), tuple(names)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self._views: dict = {}  # (source, source epoch) -> dataset, only those the epoch uses
        self._sizes: dict = {}  # (source, source epoch) -> sequences
        self._counts: dict = {}  # blend epoch -> sequences per source
        first = self._view(0, 0)
        self.padded_length, self.seq_length = first.padded_length, first.seq_length
        self.document_mask, self.mode, self.pad_multiple = first.document_mask, first.mode, first.pad_multiple
        self.document_multiple = first.document_multiple
        self.set_epoch(epoch)

    @property
    def num_sources(self) -> int:
        return len(self._make)

    def _view(self, d: int, k: int):
        if (d, k) not in self._views:
            ds = self._make[d](k)
            self._views[(d, k)] = ds
            self._sizes[(d, k)] = len(ds)
        return self._views[(d, k)]

    def _size(self, d: int, k: int) -> int:
        if (d, k) not in self._sizes:
            self._view(d, k)  # kept until set_epoch drops the views its epoch does not read
        return self._sizes[(d, k)]

    def _epoch_counts(self, e: int) -> np.ndarray:
        if e not in self._counts:
            sizes = [self._size(d, e) for d in range(self.num_sources)]
            n = sum(sizes)
            shares = sizes if self.weights is None else self.weights
            self._counts[e] = np.bincount(blend_schedule(shares, n), minlength=self.num_sources)
        return self._counts[e]

    def set_epoch(self, epoch: int) -> None:
        """Lay out blend epoch ``epoch``: which source sequence each index serves."""
        self.epoch = int(epoch)
        sizes = [self._size(d, self.epoch) for d in range(self.num_sources)]
        n = sum(sizes)
        shares = sizes if self.weights is None else self.weights
        self.source = blend_schedule(shares, n)
        counts = np.bincount(self.source, minlength=self.num_sources)
        self._counts[self.epoch] = counts
        offsets = [sum(int(self._epoch_counts(e)[d]) for e in range(self.epoch)) for d in range(self.num_sources)]
        self._where = np.empty((n, 2), dtype=np.int64)  # (source epoch, index in it) per blend index
        keep = set()
        for d in range(self.num_sources):
            at = np.flatnonzero(self.source == d)
            draws = offsets[d] + np.arange(at.size)  # positions in source d's endless stream
            bounds, k = [0], 0
            while bounds[-1] <= (draws[-1] if draws.size else -1):
                size = self._size(d, k)
                if size == 0:
                    raise ValueError(f"blend source {self.names[d]} has no sequences in its epoch {k}")
                bounds.append(bounds[-1] + size)
                k += 1
            ep = np.searchsorted(np.asarray(bounds), draws, side="right") - 1
            self._where[at, 0] = ep
            self._where[at, 1] = draws - np.asarray(bounds)[ep]
            keep.update((d, int(k)) for k in np.unique(ep))
        self._views = {key: v for key, v in self._views.items() if key in keep}
        pieces = np.zeros(n, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        groups = []
        for d, k in sorted(keep):
            v = self._view(d, k)
            sel = np.flatnonzero((self.source == d) & (self._where[:, 0] == k))
            seqs = v.order[self._where[sel, 1]]
            pieces[sel] = v.plan.pieces_per_sequence()[seqs]
            lengths[sel] = v.plan.sequence_lengths()[seqs]
            groups.append((v, sel, seqs))
        offsets = np.concatenate([[0], np.cumsum(pieces)])
        piece_lengths = np.zeros(int(offsets[-1]), dtype=np.int64)
        for v, sel, seqs in groups:  # each blend sequence's pieces, copied from its source plan
            cnt = pieces[sel]
            within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            src = np.repeat(np.asarray(v.plan.seq_offsets)[seqs], cnt) + within
            piece_lengths[np.repeat(offsets[sel], cnt) + within] = np.asarray(v.plan.piece_lengths)[src]
        self.cu_seqlens_len = max([self._views[key].cu_seqlens_len for key in keep] or [2])
        self.plan = _BlendPlan(pieces, lengths, piece_lengths, self.seq_length)
        self.plan.stats = _summed_stats([self._views[key].plan.stats for key in sorted(keep)])
        self.order = np.arange(n)

    def __len__(self) -> int:
        return int(self.source.size)

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range [0, {len(self)})")
        d = int(self.source[idx])
        k, j = (int(x) for x in self._where[idx])
        return self._tag(self._view(d, k)[j], d)

    def _tag(self, item: dict, d: int) -> dict:
        """Source id, and ``cu_seqlens`` padded to the blend's common length so items stack."""
        import torch

        out = {**item, "source": d}
        for key in ("cu_seqlens", "cu_seqlens_padded"):  # the latter under context parallelism
            cu = item.get(key)
            if cu is not None and cu.numel() < self.cu_seqlens_len:
                out[key] = torch.cat([cu, torch.full((self.cu_seqlens_len - cu.numel(),), -1, dtype=cu.dtype)])
        return out

    def first_view(self):
        """The loaded per-source dataset with the lowest (source, epoch): its plan and layout
        (what :mod:`megatron_pack.training.isolation_rows` reads rows from)."""
        return self._views[min(self._views)]

    def assemble(self, tok, mask, seg_lens) -> dict:
        """An item from raw tokens (the all-padding filler of :func:`eval_batches`)."""
        key = min(self._views)
        return self._tag(self._views[key].assemble(tok, mask, seg_lens), key[0])

    def source_counts(self) -> np.ndarray:
        return np.bincount(self.source, minlength=self.num_sources)
