"""Compute-balanced placement of a global batch's sequences on data-parallel ranks and micro-batches.

Token-balanced packing makes sequences equally *long*; with the document mask their cost is
``linear * S + attention * sum_i s_i^2`` (:mod:`megatron_pack.model.cost`), so a 32k sequence
holding one 32k document costs much more than one holding sixty-four 512-token documents, and
every DP rank waits at the gradient reduction for the slowest. Placement changes nothing
the model learns: the step still consumes the same set of sequences and the loss is
normalised over the global batch's supervised tokens (:mod:`megatron_pack.training.loss`);
only *which rank and micro-batch* gets each sequence changes::

    a step of 8 sequences, DP 2 (costs)   9 8 1 1 2 1 1 1
    contiguous (Megatron)    rank 0: 9 8 1 1 = 19    rank 1: 2 1 1 1 = 5     max/mean 1.58
    balanced                 rank 0: 9 1 1 1 = 12    rank 1: 8 2 1 1 = 12    max/mean 1.00

:func:`place` splits the step's ``G`` sequences into ``D`` ranks of ``G/D`` (the same count
per rank, as the schedule needs) minimising the most expensive rank, then each rank's share
into micro-batches of ``--micro-batch-size`` with the most expensive micro-batch minimised
(pipeline stages run micro-batches in lock-step; an uneven one stalls the 1F1B schedule).
The partition is the better of balanced Karmarkar-Karp (largest differencing, k-way, equal
cardinality) and LPT with a cardinality cap, then improved by pairwise swaps out of the
most expensive part. It is a pure function of the costs (ties broken by position): every
rank computes the same placement from the plan without communication, and a resumed run
places step k exactly as the uninterrupted one did.
"""

from __future__ import annotations

import heapq

import numpy as np

# ------------------------------------------------------------------------------------------
# Per-sequence cost inputs from a packing plan
# ------------------------------------------------------------------------------------------


def sequence_sum_sq(plan, document_mask: bool = True, padded_length: int | None = None) -> np.ndarray:
    """``sum_i s_i^2`` over each sequence's attention segments, in plan order.

    With the document mask the segments are the plan's pieces; without it, the real tokens
    of the sequence form one segment. ``padded_length`` adds the padding tail
    (``padded_length - real tokens``) as a segment of its own, as the THD collate hands it to
    the attention kernel (it is computed, though never scored).
    """
    seq_len = np.asarray(plan.sequence_lengths(), dtype=np.float64)
    if document_mask:
        sq = np.asarray(plan.piece_lengths, dtype=np.float64) ** 2
        csum = np.concatenate([[0.0], np.cumsum(sq)])
        off = np.asarray(plan.seq_offsets)
        out = csum[off[1:]] - csum[off[:-1]]
    else:
        out = seq_len ** 2
    if padded_length is not None:
        out = out + (padded_length - seq_len) ** 2
    return out


def sequence_costs(plan, cost_model, *, padded_length: int, document_mask: bool = True) -> np.ndarray:
    """FLOPs of every sequence of ``plan`` (plan order) under ``cost_model``."""
    n = plan.num_sequences
    return cost_model.sequence_flops(np.full(n, float(padded_length)),
                                     sequence_sum_sq(plan, document_mask, padded_length))


# ------------------------------------------------------------------------------------------
# Equal-cardinality k-way partition
# ------------------------------------------------------------------------------------------


def _karmarkar_karp(costs: np.ndarray, k: int) -> list[list[int]]:
    """Balanced largest differencing: take the items k at a time in descending order (one per
    part, so every part ends with the same count), then repeatedly merge the two partial
    solutions with the largest spread, pairing the heaviest part of one with the lightest
    of the other."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = []
    for c, start in enumerate(range(0, len(order), k)):
        chunk = order[start:start + k]
        parts = [[i] for i in chunk]
        sums = [float(costs[i]) for i in chunk]
        heapq.heappush(heap, (-(max(sums) - min(sums)), c, sums, parts))
    counter = len(heap)
    while len(heap) > 1:
        _, _, s1, p1 = heapq.heappop(heap)
        _, _, s2, p2 = heapq.heappop(heap)
        a = sorted(range(k), key=lambda j: (-s1[j], j))  # heaviest first
        b = sorted(range(k), key=lambda j: (s2[j], j))  # lightest first
        sums = [s1[a[j]] + s2[b[j]] for j in range(k)]
        parts = [p1[a[j]] + p2[b[j]] for j in range(k)]
        heapq.heappush(heap, (-(max(sums) - min(sums)), counter, sums, parts))
        counter += 1
    return heap[0][3]


def _lpt(costs: np.ndarray, k: int, cap: int) -> list[list[int]]:
    """Longest processing time first: each item, heaviest first, to the lightest part with room."""
    parts = [[] for _ in range(k)]
    sums = [0.0] * k
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        j = min((j for j in range(k) if len(parts[j]) < cap), key=lambda j: (sums[j], j))
        parts[j].append(i)
        sums[j] += float(costs[i])
    return parts


def _improve_by_swaps(costs: np.ndarray, parts: list[list[int]], max_rounds: int = 500) -> list[list[int]]:
    """Swap one item of the most expensive part with one of another part while that lowers
    the larger of the two below the current maximum (the count per part is unchanged)."""
    idx = np.array(parts, dtype=np.int64)  # [k, n/k]: every part has the same count
    k = idx.shape[0]
    sums = costs[idx].sum(axis=1)
    bound = lower_bound(costs, k)
    for _ in range(max_rounds):
        hi = int(np.argmax(sums))
        if sums[hi] <= bound * (1 + 1e-9):
            break
        a = costs[idx[hi]]  # [p]
        delta = a[:, None, None] - costs[idx][None, :, :]  # [p, k, p]: a goes to lo, b comes to hi
        pair_max = np.maximum(sums[hi] - delta, sums[None, :, None] + delta)
        pair_max[:, hi, :] = np.inf
        i, lo, j = np.unravel_index(int(np.argmin(pair_max)), pair_max.shape)
        if not pair_max[i, lo, j] < sums[hi] * (1 - 1e-12):
            break
        x, y = idx[hi, i], idx[lo, j]
        idx[hi, i], idx[lo, j] = y, x
        sums[hi] += costs[y] - costs[x]
        sums[lo] += costs[x] - costs[y]
    return idx.tolist()


def lower_bound(costs: np.ndarray, k: int) -> float:
    """No split into k parts of equal count beats the mean part or the part holding the heaviest item
    together with the lightest others."""
    per = costs.size // k
    asc = np.sort(costs)
    return float(max(costs.sum() / k, asc[-1] + asc[:per - 1].sum()))


def partition(costs, k: int) -> list[list[int]]:
    """Split ``len(costs)`` items (a multiple of ``k``) into ``k`` parts of equal count,
    minimising the largest part's cost; parts and their items in a deterministic order."""
    costs = np.asarray(costs, dtype=np.float64)
    n = costs.size
    if k < 1 or n % k:
        raise ValueError(f"cannot split {n} sequences into {k} parts of equal count")
    if k == 1:
        return [list(range(n))]
    if n == k:
        return [[i] for i in range(n)]
    best, best_max = None, None
    bound = lower_bound(costs, k)
    for build in (_karmarkar_karp, lambda c, k: _lpt(c, k, n // k)):
        parts = _improve_by_swaps(costs, build(costs, k))
        m = max(costs[p].sum() for p in parts)
        if best is None or m < best_max * (1 - 1e-12):
            best, best_max = parts, m
        if best_max <= bound * (1 + 1e-9):  # provably optimal already
            break
    # canonical order: parts by their smallest position, items ascending
    return sorted((sorted(p) for p in best), key=lambda p: p[0])


def place(costs, dp_size: int, micro_batch_size: int) -> list[list[list[int]]]:
    """Positions (into ``costs``, the step's sequences in stream order) per DP rank and
    micro-batch: ``out[rank][micro] = [positions]``."""
    costs = np.asarray(costs, dtype=np.float64)
    ranks = partition(costs, dp_size)
    out = []
    for r in ranks:
        per = r  # this rank's positions
        m = len(per) // micro_batch_size
        micro = partition(costs[per], m) if micro_batch_size > 1 else [[i] for i in range(len(per))]
        out.append([[per[i] for i in mb] for mb in micro])
    return out


def balance_on(balance_batches: bool | None, dp_size: int, pp_size: int) -> bool:
    """``--balance-batches`` as training resolves it (and the planner forecasts it): on by
    default when DP > 1 or PP > 1; ``--balance-batches``/``--no-balance-batches`` override."""
    if balance_batches is not None:
        return bool(balance_batches)
    return dp_size > 1 or pp_size > 1


def contiguous(n: int, dp_size: int, micro_batch_size: int) -> list[list[list[int]]]:
    """The unbalanced placement (stream order): rank r takes the r-th block of ``n / D``."""
    per = n // dp_size
    return [[list(range(r * per + m, r * per + m + micro_batch_size)) for m in range(0, per, micro_batch_size)]
            for r in range(dp_size)]


def imbalance(costs, placement) -> float:
    """max / mean of the per-rank cost of a placement (1.0 = every rank equally busy)."""
    costs = np.asarray(costs, dtype=np.float64)
    per_rank = np.array([sum(costs[i].sum() for i in (np.asarray(mb) for mb in r)) for r in placement])
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def micro_imbalance(costs, placement) -> float:
    """max / mean micro-batch cost over the whole step (what stalls a pipeline)."""
    costs = np.asarray(costs, dtype=np.float64)
    mb = np.array([costs[np.asarray(m)].sum() for r in placement for m in r])
    return float(mb.max() / mb.mean()) if mb.mean() > 0 else 1.0


class BatchBalancer:
    """What :class:`~megatron_pack.data.sampling.TrainStream` calls once per step.

    ``enabled=False`` keeps the stream's contiguous placement but still reports its
    imbalance, so logs of both settings are comparable.
    """

    def __init__(self, cost_model, dp_size: int, micro_batch_size: int, enabled: bool = True):
        self.cost_model, self.dp_size, self.mbs, self.enabled = cost_model, dp_size, micro_batch_size, enabled
        self._plan, self._costs = None, None

    def costs(self, dataset) -> np.ndarray:
        """Per-sequence FLOPs in plan order, recomputed when the dataset's plan changes (epoch)."""
        if self._plan is not dataset.plan:
            self._plan = dataset.plan
            self._costs = sequence_costs(dataset.plan, self.cost_model, padded_length=dataset.padded_length,
                                         document_mask=dataset.document_mask)
        return self._costs

    def placement(self, dataset, plan_sequences, fillers: int = 0) -> tuple[list, dict]:
        """``(out[rank][micro] -> positions in the step, stats)`` for the step's plan sequences,
        followed by ``fillers`` free (all-padding) slots: evaluation's last, partial step."""
        c = self.costs(dataset)[np.asarray(plan_sequences, dtype=np.int64)]
        if fillers:
            c = np.concatenate([c, np.zeros(int(fillers))])
        base = contiguous(c.size, self.dp_size, self.mbs)
        chosen = place(c, self.dp_size, self.mbs) if self.enabled else base
        stats = {"imbalance": imbalance(c, chosen), "imbalance unbalanced": imbalance(c, base),
                 "micro-batch imbalance": micro_imbalance(c, chosen)}
        return chosen, stats
