#!/usr/bin/env python
"""Per-step packing (``--pack-scope step``): planning speed and real tokens/s against padding.

    python benchmarks/bench_step_packing.py                   # both parts
    python benchmarks/bench_step_packing.py --skip-train      # planning only (1.2M conversations)
    python benchmarks/bench_step_packing.py --steps 12 --rounds 3 --json out.json

Planning: the per-step plan of 1.2M synthetic conversations (``bench_packing.sft_length_mix``)
from the padding plan (the padded run's epoch order cut into steps, each packed by the C++
grouped best-fit), best of ``--repeats``; target under 1 s. The padding plan itself (cached in
training) is timed beside it.

Training: the tiny model on CPU on the quickstart data (``examples/quickstart.sh``: the
built-in sample, seq 512, global batch 8, micro-batch 4) for ``--steps`` steps under padding,
per-step bfd (the same conversations in the same steps) and epoch bfd, the settings in turn
for ``--rounds`` rounds, at ``--threads`` torch threads (default 1). Each step's time, wall and
process CPU (of ``train_step``: forward, backward, optimizer), is its best over the rounds (the
same work every round; load only slows a step down); the first step is warm-up and left out. Speedup = padding's
time / per-step's over the same steps; ideal = padding's rows / per-step's rows (the same
tokens in fewer rows); target: speedup >= 0.9 x ideal. Epoch bfd trains other conversations
per step, so only its real tokens/s compares.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import numpy as np


def bench_plan(n: int, seq_lengths, batch_sizes, repeats: int) -> list[dict]:
    from bench_packing import sft_length_mix

    from megatron_pack.packing.plan import build_plan
    from megatron_pack.packing.step_scope import build_step_plan, padded_epoch_order

    lengths = sft_length_mix(n)[0]
    rows = []
    for seq in seq_lengths:
        t0 = time.perf_counter()
        padding = build_plan(lengths, seq, "padding")
        pad_s = time.perf_counter() - t0
        order = padded_epoch_order(padding.num_sequences, 1234, 0)
        for gbs in batch_sizes:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                steps = build_step_plan(padding, order, gbs)
                best = min(best, time.perf_counter() - t0)
            r = steps.rows_per_step()
            rows.append({"conversations": n, "seq_length": seq, "global_batch_size": gbs, "steps": steps.num_steps,
                         "rows": int(r.sum()), "padding_rows": steps.num_steps * gbs, "rows_min": int(r.min()),
                         "rows_mean": float(r.mean()), "rows_max": int(r.max()), "step_plan_s": best,
                         "padding_plan_s": pad_s, "efficiency": steps.plan.efficiency})
            print(f"  seq {seq:6d} GBS {gbs:5d}: {steps.num_steps:,} steps, rows per step {r.min()}/"
                  f"{r.mean():.1f}/{r.max()} (padding {gbs}), per-step plan {best:.3f} s "
                  f"(+ padding plan {pad_s:.3f} s), efficiency {steps.plan.efficiency:.1%}", flush=True)
    return rows


SETTINGS = {"padding": ("padding", "epoch"), "per-step bfd": ("bfd", "step"), "epoch bfd": ("bfd", "epoch")}


def _config(prefix: str, mode: str, scope: str, args):
    from megatron_pack.demo import build_parser, demo_config

    demo = build_parser().parse_args(["--output-dir", args.workdir])
    cfg = demo_config(prefix, mode, demo)
    packing = dataclasses.replace(cfg.data.packing, pack_scope=scope)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, packing=packing),
        train=dataclasses.replace(cfg.train, train_epochs=None, train_iters=args.steps, eval_iters=1),
        logging=dataclasses.replace(cfg.logging, log_interval=10**9, log_file=None))


def _cpu_timed_steps(loop, sink: list):
    """Wrap the loop's ``train_step`` to record each step's process CPU seconds (forward, backward,
    optimizer; a loaded machine stretches wall time far more than CPU time at one thread)."""
    orig = loop.train_step

    def timed(*a, **k):
        t0 = time.process_time()
        rec = orig(*a, **k)
        sink.append(time.process_time() - t0)
        return rec

    loop.train_step = timed
    return orig


def bench_train(args) -> dict:
    import megatron_pack.training.loop as loop
    from megatron_pack.demo import prepare_data

    prefix = prepare_data(os.path.join(args.workdir, "data"))
    runs = {name: [] for name in SETTINGS}
    cpu = {name: [] for name in SETTINGS}
    for rnd in range(args.rounds):
        for name, (mode, scope) in SETTINGS.items():
            sink = []
            orig = _cpu_timed_steps(loop, sink)
            try:
                res = loop.train(_config(prefix, mode, scope, args))
            finally:
                loop.train_step = orig
            runs[name].append(res["history"])
            cpu[name].append(sink)
            print(f"  round {rnd + 1} {name}: {sum(h['seconds'] for h in res['history']):.1f} s wall, "
                  f"{sum(sink):.1f} s CPU", flush=True)
    out = {}
    for name, hists in runs.items():
        secs = np.min([[h["seconds"] for h in hist] for hist in hists], axis=0)[1:]  # best per step, no warm-up
        cpu_secs = np.min(cpu[name], axis=0)[1:]
        first = hists[0][1:]
        seq = _config(prefix, *SETTINGS[name], args).data.seq_length
        # the step's packed rows; capacity / seq counts them only for full-length rows (per-step
        # micro-batches are trimmed to their longest row, so their capacity undercounts rows)
        rows = [h["rows"] if h.get("rows") is not None else h["capacity"] // seq for h in first]
        out[name] = {"seconds": float(secs.sum()), "cpu_seconds": float(cpu_secs.sum()),
                     "real_tokens": int(sum(h["real tokens"] for h in first)),
                     "rows": int(sum(rows)), "rows_per_step": rows,
                     "conversations": int(sum(h["samples"] for h in first)), "loss": [h["lm loss"] for h in hists[0]],
                     "wall_per_round": [[h["seconds"] for h in x] for x in hists],
                     "cpu_per_round": cpu[name]}
        out[name]["tokens_per_s"] = out[name]["real_tokens"] / out[name]["seconds"]
        out[name]["tokens_per_cpu_s"] = out[name]["real_tokens"] / out[name]["cpu_seconds"]
    pad, step = out["padding"], out["per-step bfd"]
    out["speedup"] = pad["seconds"] / step["seconds"]
    out["speedup_cpu"] = pad["cpu_seconds"] / step["cpu_seconds"]
    out["ideal"] = pad["rows"] / step["rows"]
    out["fraction_of_ideal"] = out["speedup"] / out["ideal"]
    out["fraction_of_ideal_cpu"] = out["speedup_cpu"] / out["ideal"]
    out["same_losses"] = bool(np.allclose(pad["loss"], step["loss"], rtol=1e-5))
    return out


def main(argv=None) -> int:
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=1_200_000)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--global-batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--steps", type=int, default=12, help="training steps per setting and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join("outputs", "bench_step_packing"))
    p.add_argument("--json", dest="json_out")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds measure the work)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n\nper-step plan of {args.conversations:,} conversations:")
    result = {"machine": {"cpus": os.cpu_count(), "loadavg_start": load},
              "plan": bench_plan(args.conversations, args.seq_lengths, args.global_batch_sizes, args.repeats)}
    if not args.skip_train:
        print(f"\ntraining, tiny model on CPU, quickstart data, {args.steps} steps x {args.rounds} rounds:")
        t = bench_train(args)
        result["train"] = t
        print("\n| setting | rows (steps 2..) | conversations | wall s | real tokens/s | CPU s | real tokens/CPU-s |")
        print("|---|---|---|---|---|---|---|")
        for name in SETTINGS:
            r = t[name]
            print(f"| {name} | {r['rows']} | {r['conversations']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['cpu_seconds']:.2f} | {r['tokens_per_cpu_s']:,.0f} |")
        print(f"\nper-step over padding: speedup {t['speedup']:.2f}x wall, {t['speedup_cpu']:.2f}x CPU; ideal "
              f"{t['ideal']:.2f}x ({t['fraction_of_ideal']:.2f} / {t['fraction_of_ideal_cpu']:.2f} of ideal; target "
              f">= 0.90); same losses per step: {t['same_losses']}")
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {result['machine']['loadavg_end'][0]:.2f}")
    if args.json_out:
        from megatron_pack.files.atomic import write_json_atomic

        write_json_atomic(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
