"""Megatron-Core's blending rule (``build_blending_indices``: each draw to the source furthest
behind its weight), as the pure-Python loop :func:`megatron_pack.data.blend.blend_schedule`
replaced. Kept once, in the package, because two places need it: the blend tests compare the
C++ engine with it (two sources: the same rule) and ``benchmarks/bench_blend.py`` times it."""

from __future__ import annotations

import numpy as np


def largest_deficit(shares, n: int) -> np.ndarray:
    """The loop of megatron_pack/data/blend.py before, verbatim from 02c82b0: ``n`` source ids."""
    shares = list(shares)
    total = sum(shares)
    counts = [0] * len(shares)
    out = np.empty(n, dtype=np.int32)
    k = len(shares)
    for i in range(n):
        best, best_score = 0, None
        for d in range(k):
            score = shares[d] * (i + 1) - counts[d] * total
            if best_score is None or score > best_score:
                best, best_score = d, score
        out[i] = best
        counts[best] += 1
    return out
