"""Compute-balanced global batches: predicted imbalance at scale, and a measured step time on CPU.

    python benchmarks/bench_balance.py                      # both parts, about a minute or two
    python benchmarks/bench_balance.py --skip-measured --json out.json

**Predicted.** A long-tailed SFT length mixture (short chats log-normal around 600 tokens,
plus long documents log-uniform in [8k, S] holding ``--long-share`` = 30% of the tokens)
packed with ``bfd`` at S = 32k and 128k, for DP 8 and 64 with ``--seq-per-rank``
sequences per rank and step. Each step's sequences (in the training stream's seeded order)
are placed contiguously (Megatron's default) and by ``data.balance.place``; the table gives
the mean and worst max/mean rank cost (Llama-3-8B FLOPs: linear + attention per document)
and the predicted step-time gain = sum of slowest-rank costs contiguous / balanced.

**Measured.** Two gloo ranks on this CPU train the tiny model (2 layers, hidden 64, where
attention outweighs the linear layers beyond ~900-token documents) at ``--measure-seq-length``
on a mixture of near-full-length documents and short chats, ``--no-balance-batches`` vs
``--balance-batches``, same data, same steps; the median step time of steps 2.. is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def long_tailed_lengths(seq_length: int, total_tokens: int, long_share: float, seed: int) -> np.ndarray:
    """Short chats (log-normal, median ~600) + long documents (log-uniform in [8k, S]) holding
    ``long_share`` of the tokens; shuffled."""
    rng = np.random.default_rng(seed)
    short_tokens, long_tokens = total_tokens * (1 - long_share), total_tokens * long_share
    short = np.clip(rng.lognormal(np.log(600), 0.9, int(short_tokens / 800) + 1), 16, 8191).astype(np.int64)
    hi = max(seq_length, 8193)
    long_ = np.exp(rng.uniform(np.log(8192), np.log(hi), int(long_tokens / np.sqrt(8192 * hi)) + 1)).astype(np.int64)
    out = np.concatenate([short, long_])
    return out[rng.permutation(out.size)]


def predicted(args) -> list[dict]:
    from megatron_pack.data.balance_forecast import forecast
    from megatron_pack.model.cost import CostModel
    from megatron_pack.model.presets import get_preset
    from megatron_pack.packing.plan import build_plan

    cost = CostModel.from_architecture(get_preset(args.model))
    rows = []
    for S in args.seq_lengths:
        for dp in args.dp_sizes:
            for r in args.seq_per_rank:
                gbs = dp * r
                lengths = long_tailed_lengths(S, gbs * args.steps * S, args.long_share, args.seed)
                plan = build_plan(lengths, S, "bfd", seed=args.seed)
                long_tok = lengths[lengths > 8192].sum() / lengths.sum()
                t0 = time.perf_counter()
                f = forecast(plan, cost, global_batch_size=gbs, dp_size=dp, micro_batch_size=1, seed=args.seed,
                             max_steps=args.steps)
                per_step_ms = (time.perf_counter() - t0) / max(f.steps, 1) * 1000 / 2  # two placements per step
                attn = cost.attention_share(np.full(plan.num_sequences, S), _sum_sq(plan))
                rows.append({"seq_length": S, "dp": dp, "seq_per_rank": r, "global_batch_size": gbs,
                             "long_token_share": float(long_tok), "attention_share": attn,
                             "efficiency": float(plan.efficiency), **f.to_json(), "placement_ms": per_step_ms})
                print(_row_text(rows[-1]), flush=True)
    return rows


def _sum_sq(plan):
    from megatron_pack.data.balance import sequence_sum_sq

    return sequence_sum_sq(plan, True, plan.max_seq_length)


def _row_text(r):
    return (f"| {r['seq_length'] // 1024}k | {r['dp']} | {r['seq_per_rank']} | {r['long_token_share']:.0%} | "
            f"{r['attention_share']:.0%} | {r['imbalance_contiguous']:.3f} / {r['worst_contiguous']:.3f} | "
            f"{r['imbalance_balanced']:.3f} / {r['worst_balanced']:.3f} | {r['bound']:.3f} | {r['gain']:.3f}x | "
            f"{r['placement_ms']:.1f} |")


TABLE_HEAD = ("| S | DP | seq/rank | tokens in docs > 8k | attention FLOPs | max/mean contiguous (mean / worst) | "
              "max/mean balanced (mean / worst) | lower bound | predicted step-time gain | placement ms/step |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


# ---------------------------------------------------------------- measured on CPU


def make_measure_dataset(prefix: str, seq_length: int, n: int, seed: int) -> str:
    """Every 25th conversation near ``seq_length`` (a sequence of its own), the rest 40..300 tokens
    (about 24 per sequence): roughly as many one-document sequences as many-document ones."""
    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    with SFTDatasetWriter(prefix) as w:
        for i in range(n):
            length = (
                int(rng.integers(int(0.85 * seq_length), seq_length)) if i % 25 == 0 else int(rng.integers(40, 300))
            )
            toks = rng.integers(1, 250, length).tolist()
            prompt = max(1, length // 4)
            w.add(toks, [0] * prompt + [1] * (length - prompt), [0, prompt])
    return prefix


def _launch(nprocs: int, args: list, workdir: str, name: str, timeout: float) -> list:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(workdir, f"{name}.jsonl")
    procs = []
    for rank in range(nprocs):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.environ.get("PYTHONPATH", ""),
        )
        out = open(os.path.join(workdir, f"{name}.rank{rank}.log"), "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "megatron_pack.train", *args, "--log-file", log],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                ),
                out,
            )
        )
    deadline = time.monotonic() + timeout
    for p, out in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out.close()
    if any(p.returncode for p, _ in procs):
        tail = open(os.path.join(workdir, f"{name}.rank{nprocs - 1}.log")).read()[-2000:]
        raise RuntimeError(f"{name}: ranks exited {[p.returncode for p, _ in procs]}:\n{tail}")
    return [json.loads(x) for x in open(log) if '"lm loss"' in x]


def measured(args) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="bench_balance_")
    prefix = make_measure_dataset(os.path.join(work, "sft"), args.measure_seq_length, 400, args.seed)
    common = [
        "--model",
        "tiny",
        "--vocab-size",
        "256",
        "--seq-length",
        str(args.measure_seq_length),
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        str(2 * args.measure_seq_per_rank),
        "--train-iters",
        str(args.measure_steps),
        "--valid-fraction",
        "0",
        "--lr",
        "1e-3",
        "--data-path",
        prefix,
        "--log-interval",
        "1",
        "--seed",
        str(args.seed),
    ]
    out = {
        "seq_length": args.measure_seq_length,
        "seq_per_rank": args.measure_seq_per_rank,
        "steps": args.measure_steps,
    }
    for name, flag in (("contiguous", "--no-balance-batches"), ("balanced", "--balance-batches")):
        recs = _launch(2, common + [flag], work, name, timeout=args.measure_timeout)
        timed = recs[1:] or recs
        out[name] = {
            "median_step_s": float(np.median([r["elapsed ms"] for r in timed]) / 1000),
            "mean_step_s": float(np.mean([r["elapsed ms"] for r in timed]) / 1000),
            "imbalance": float(np.mean([r["compute imbalance"] for r in timed])),
            "loss": [r["lm loss"] for r in recs],
        }
        print(
            f"measured {name}: median step {out[name]['median_step_s']:.2f} s, predicted imbalance "
            f"{out[name]['imbalance']:.3f}",
            flush=True,
        )
    out["speedup"] = out["contiguous"]["median_step_s"] / out["balanced"]["median_step_s"]
    out["predicted_speedup"] = out["contiguous"]["imbalance"] / out["balanced"]["imbalance"]
    print(
        f"measured speedup {out['speedup']:.3f}x (predicted from the logged imbalance {out['predicted_speedup']:.3f}x)"
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "llama3-70b"))
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--dp-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--seq-per-rank", type=int, nargs="+", default=[2, 8])
    p.add_argument("--steps", type=int, default=16, help="steps placed per configuration")
    p.add_argument("--long-share", type=float, default=0.3, help="share of tokens in documents over 8k")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip-measured", action="store_true")
    p.add_argument("--skip-predicted", action="store_true")
    p.add_argument("--measure-seq-length", type=int, default=4096)
    p.add_argument("--measure-seq-per-rank", type=int, default=4)
    p.add_argument("--measure-steps", type=int, default=6)
    p.add_argument("--measure-timeout", type=float, default=600.0)
    p.add_argument("--workdir")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    if not 0.0 <= args.long_share < 1.0:
        p.error(f"--long-share must be in [0, 1), got {args.long_share}")
    result = {"model": args.model}
    if not args.skip_predicted:
        print(TABLE_HEAD)
        result["predicted"] = predicted(args)
    if not args.skip_measured:
        result["measured"] = measured(args)
    if args.json_out:
        from megatron_pack.files.atomic import write_json_atomic

        write_json_atomic(result, args.json_out, indent=2)
    return result


if __name__ == "__main__":
    main()
