#!/usr/bin/env python
"""What laying out a blend epoch costs: :func:`megatron_pack.data.blend.blend_schedule` (the C++
engine, earliest deadline first) against the pure-Python largest-deficit loop it replaced, on
random weights for 2, 4 and 10 sources, per 300k sequences (one epoch switch of a 300k-sequence
blend).

    python benchmarks/bench_blend.py                 # 300k sequences, 2/4/10 sources
    python benchmarks/bench_blend.py --n 1000000 --sources 2 4 10 32

Each figure is the best of ``--repeats`` runs (the old loop: one run, it takes seconds). The
table also prints the worst lag of each rule (``max n*w - count``; < 1 means no source is ever a
whole sequence behind its weight).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from megatron_pack.data.blend import blend_schedule
from megatron_pack.data.largest_deficit import largest_deficit


def worst_lag(sched, w):
    w = np.asarray(w)
    worst = -np.inf
    counts = np.zeros(len(w))
    # chunked so 10 sources x 1M draws stay small in memory
    for lo in range(0, sched.size, 100_000):
        part = sched[lo:lo + 100_000]
        c = counts + np.cumsum(np.eye(len(w))[part], axis=0)
        worst = max(worst, float((np.outer(np.arange(lo + 1, lo + part.size + 1), w) - c).max()))
        counts = c[-1]
    return worst


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000, help="sequences per blend epoch")
    ap.add_argument("--sources", type=int, nargs="+", default=[2, 4, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, n = {args.n:,}")
    print(f"{'sources':>7} | {'old (Python) s':>14} | {'new (C++) s':>11} | {'speedup':>8} | "
          f"{'old worst lag':>13} | {'new worst lag':>13}")
    rng = np.random.default_rng(args.seed)
    for k in args.sources:
        w = rng.dirichlet(np.ones(k))
        t_old, old = best_of(lambda: largest_deficit(list(w), args.n), 1)
        t_new, new = best_of(lambda: blend_schedule(w, args.n), args.repeats)
        print(f"{k:>7} | {t_old:>14.3f} | {t_new:>11.4f} | {t_old / t_new:>7.0f}x | "
              f"{worst_lag(old, w):>13.4f} | {worst_lag(new, w):>13.4f}")


if __name__ == "__main__":
    main()
