#!/usr/bin/env python
"""Packing engine benchmark: seconds and efficiency per mode, C++ vs Python reference.

    python benchmarks/bench_packing.py                      # 1.2M samples, max length 4096 and 16384
    python benchmarks/bench_packing.py --samples 200000 --no-reference --json out.json

Lengths come from a synthetic SFT mix (seeded, no download) with the shape of real
instruction data: mostly short single-turn chats, multi-turn conversations of 2-8
exchanges, long-context samples (documents, code) and a Pareto tail past 16k tokens.
Every conversation also gets its turn starts, so ``cut-at-turns`` can be measured.

Reported per (max length, mode): sequences, efficiency, lower-bound efficiency and the
gap in points, best-of-N C++ seconds for the whole ``build_plan`` call, reference
seconds, and whether the two plans are identical. Targets from the design: ``bfd``
within 0.5 points of the bound and under 1 s on 1.2M samples; ``windowed_bfd`` within
2 points of ``bfd``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from megatron_pack.packing.plan import OVERLONG_CHOICES, build_plan

MODES = ("padding", "greedy", "random", "bfd", "windowed_bfd")


def sft_length_mix(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths, turn_offsets, turn_starts)``: conversation i's turns start at
    ``turn_starts[turn_offsets[i]:turn_offsets[i + 1]]``."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.55, 0.30, 0.12, 0.03])
    exchanges = np.where(kind == 1, rng.integers(2, 9, n), 1)
    num_turns = 2 * exchanges  # user + assistant per exchange
    turn_offsets = np.concatenate([[0], np.cumsum(num_turns)])
    t = int(turn_offsets[-1])
    owner = np.repeat(np.arange(n), num_turns)
    is_user = (np.arange(t) - turn_offsets[owner]) % 2 == 0
    k = kind[owner]
    # per-turn token counts (lognormal), scaled by the conversation's kind
    user = rng.lognormal(np.log(60), 0.9, t)
    assistant = rng.lognormal(np.log(220), 0.8, t)
    turn_len = np.where(is_user, user, assistant)
    turn_len = np.where((k == 2) & is_user, rng.lognormal(np.log(2500), 0.6, t), turn_len)  # long context
    tail = 3000 * (1 + rng.pareto(1.3, t))  # Pareto tail: 3k .. >16k
    turn_len = np.where((k == 3) & is_user, np.minimum(tail, 65536), turn_len)
    turn_len = np.maximum(turn_len.astype(np.int64), 1) + 4  # + role/template tokens
    lengths = np.add.reduceat(turn_len, turn_offsets[:-1])
    before = np.cumsum(turn_len) - turn_len  # tokens before each turn, over all conversations
    starts = before - np.repeat(before[turn_offsets[:-1]], num_turns)
    return lengths.astype(np.int64), turn_offsets, starts.astype(np.int64)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_200_000)
    p.add_argument("--max-lengths", default="4096,16384")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--overlong", default="truncate", choices=OVERLONG_CHOICES)
    p.add_argument("--repeats", type=int, default=3, help="C++ timing is the best of this many runs")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) Python reference runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    lengths, toff, tstarts = sft_length_mix(args.samples, args.seed)
    turns = lambda i: tstarts[toff[i] : toff[i + 1]]  # noqa: E731
    print(f"{lengths.size:,} samples, {int(lengths.sum()):,} tokens; length p50 {int(np.median(lengths))}, "
          f"p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())}; over-long policy {args.overlong}")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; C++ seconds = best of {args.repeats}\n"
    )
    rows = []
    head = ("| max len | mode | sequences | efficiency | bound eff. | gap (pts) | vs bfd (pts) | C++ s "
            "| reference s | same plan |")
    print(head)
    print("|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|")
    for cap in map(int, args.max_lengths.split(",")):
        bfd_eff = None
        for mode in args.modes.split(","):
            kw = dict(seed=args.seed, overlong=args.overlong, turn_starts=turns)
            plan, sec = timed(lambda: build_plan(lengths, cap, mode, **kw), args.repeats)
            ref_sec, same = None, None
            if not args.no_reference:
                ref, ref_sec = timed(lambda: build_plan(lengths, cap, mode, engine="reference", **kw), 1)
                same = bool(
                    np.array_equal(ref.pieces, plan.pieces) and np.array_equal(ref.seq_offsets, plan.seq_offsets)
                )
            lb_eff = plan.stats.placed_tokens / (plan.lower_bound_sequences * cap)
            if mode == "bfd":
                bfd_eff = plan.efficiency
            row = {
                "max_seq_length": cap,
                "mode": plan.mode,
                "num_sequences": plan.num_sequences,
                "efficiency": plan.efficiency,
                "lower_bound_efficiency": lb_eff,
                "gap_points": 100 * (lb_eff - plan.efficiency),
                "vs_bfd_points": None if bfd_eff is None else 100 * (bfd_eff - plan.efficiency),
                "cpp_seconds": sec,
                "reference_seconds": ref_sec,
                "same_plan": same,
                "split_samples": plan.stats.split_items,
                "truncated_samples": plan.stats.truncated_docs,
            }
            rows.append(row)
            vs = "" if row["vs_bfd_points"] is None else f"{row['vs_bfd_points']:.2f}"
            print(
                f"| {cap} | {plan.mode} | {plan.num_sequences:,} | {plan.efficiency:.2%} | {lb_eff:.2%} | "
                f"{row['gap_points']:.2f} | {vs} | {sec:.3f} | {'' if ref_sec is None else f'{ref_sec:.2f}'} | "
                f"{'' if same is None else ('yes' if same else 'NO')} |",
                flush=True,
            )
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
