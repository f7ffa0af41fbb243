"""Context parallelism: tiny model at 32k tokens on CPU, CP 1 vs CP 2; the planner's CP table.

    python benchmarks/bench_context_parallel.py                  # both parts, about a minute
    python benchmarks/bench_context_parallel.py --skip-planner --seq-length 65536 --steps 4 --json out.json

Part 1 trains the tiny model (fp32, gloo, local layers) on one packed 32k-token row of
documents of 257..4095 tokens (odd lengths, the document mask on) for ``--steps`` optimizer
steps after one warm-up step, once as a single process and once as 2 CP ranks (each
holding chunks r and 3-r of every document, K/V all-gathered). Per rank: the median step
time and the peak resident memory during the timed steps above what the process held
before them (VmHWM reset through /proc/self/clear_refs), i.e. activations and their
gradients. Both runs compute the same loss (printed, to check).

Part 2 is the planner: Llama-3-70B on 4 x 8 A800 (TP 8, PP 2, sequence parallel,
distributed optimizer, full recompute) at 32k and 128k, peak GiB per GPU at every legal CP
and the CP it proposes (the smallest that fits), with the K/V ring exchange it would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_data(prefix: str, seq_length: int, seed: int = 0) -> str:
    """Documents of odd lengths 257..4095 filling about one row of ``seq_length``."""
    import numpy as np

    from megatron_pack.files.indexed import SFTDatasetWriter

    rng = np.random.default_rng(seed)
    total = 0
    with SFTDatasetWriter(prefix) as w:
        while True:
            n = int(rng.integers(128, 2048)) * 2 + 1
            if total + n + 8 > seq_length:
                break
            total += n + 8  # room for padding to 2*CP
            w.add(rng.integers(1, 256, n).tolist(), [0] * (n // 4) + [1] * (n - n // 4), [0, n // 4])
    return prefix


def worker(args) -> None:
    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pack.data.collate import collate_thd
    from megatron_pack.data.context_parallel import document_multiple
    from megatron_pack.data.packed_dataset import PackedSFTDataset
    from megatron_pack.model import build_model, get_preset, transformer_config
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed
    from megatron_pack.training.step import StepContext, train_step

    cp = args.cp
    st = initialize_distributed(1, 1, cp)
    set_seed(1234)
    preset = get_preset("tiny")
    cfg = transformer_config(preset, context_parallel_size=cp, use_cpu_initialization=True,
                             calculate_per_token_loss=True)
    model = build_model(preset, cfg, vocab_size=256, backend="local", max_sequence_length=args.seq_length)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0), [ddp])
    cfg.no_sync_func, cfg.finalize_model_grads_func = ddp.no_sync, finalize_model_grads

    class _NoSched:
        def step(self, increment):
            pass

    ds = PackedSFTDataset(args.data, args.seq_length, "greedy", document_multiple=document_multiple(2),
                          shuffle_sequences=False, use_cache=False)  # one plan for both runs: same rows
    batch = collate_thd([ds[0]])
    ctx = StepContext(model=ddp, optimizer=opt, scheduler=_NoSched(), forward_backward=get_forward_backward_func(),
                      device=torch.device("cpu"), seq_length=args.seq_length, loss_owner=True, use_cuda=False,
                      cp_group=ps.get_context_parallel_group() if cp > 1 else None)
    train_step(ctx, [batch], "token", 0)  # warm-up
    base = _rss_mib("VmRSS")
    _reset_peak()
    times, losses = [], []
    for i in range(args.steps):
        rec = train_step(ctx, [batch], "token", i + 1)
        times.append(rec["seconds"])
        losses.append(rec["lm loss"])
    peak = _rss_mib("VmHWM")
    mine = {"rank": st.rank, "cp_rank": st.cp_rank, "step_seconds": float(np.median(times)),
            "peak_growth_mib": peak - base, "rss_before_mib": base, "losses": losses,
            "tokens_per_rank": batch["tokens"].numel() // cp, "documents": int(ds[0]["num_cu_seqlens"]) - 1}
    out = [None] * st.world_size
    torch.distributed.all_gather_object(out, mine)
    if st.rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    destroy_distributed()


def launch(cp: int, args, data: str, out: str) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(cp):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(cp), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="",
                   PYTHONWARNINGS="ignore", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--cp", str(cp), "--data", data,
                                       "--out", out, "--seq-length", str(args.seq_length), "--steps",
                                       str(args.steps)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"CP {cp} run failed: exit codes {codes}")
    return json.load(open(out))


def cpu_part(args) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(os.path.join(tmp, "sft"), args.seq_length)
        for cp in (1, 2):
            t0 = time.perf_counter()
            ranks = launch(cp, args, data, os.path.join(tmp, f"cp{cp}.json"))
            rows.append({"cp": cp, "wall_seconds": time.perf_counter() - t0, "ranks": ranks})
    print(f"\nTiny model, one packed row of {args.seq_length} tokens ({rows[0]['ranks'][0]['documents']} documents), "
          f"fp32 on CPU, {args.steps} timed steps:\n")
    print("| CP | rank | tokens on the rank | step (median) | peak memory growth | loss (last step) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for r in row["ranks"]:
            print(f"| {row['cp']} | {r['cp_rank']} | {r['tokens_per_rank']:,} | {r['step_seconds']:.2f} s | "
                  f"{r['peak_growth_mib']:.0f} MiB | {r['losses'][-1]:.6f} |")
    return rows


def planner_part() -> list:
    import warnings

    warnings.filterwarnings("ignore")
    import megatron_pack.planning.params as params_mod
    from megatron_pack.planning.cluster_plan import make_plan, plan_config

    built, count = {}, params_mod.count_parameters

    def count_once(preset, **kw):  # shards do not depend on CP or the sequence length: build them once
        key = (preset.name, kw.get("tensor_model_parallel_size"), kw.get("pipeline_model_parallel_size"))
        if key not in built:
            built[key] = count(preset, **kw)
        return built[key]

    params_mod.count_parameters = count_once

    rows = []
    for seq in (32768, 131072):
        for cp in (1, 2):
            plan = make_plan(plan_config(model="llama3-70b", nnodes=4, gpus_per_node=8, tensor_model_parallel_size=8,
                                        pipeline_model_parallel_size=2, context_parallel_size=cp,
                                        sequence_parallel=True, use_distributed_optimizer=True,
                                        recompute_granularity="full", seq_length=seq, global_batch_size=64,
                                        gpu="a800")).to_json()
            x = plan["timing"]["cp_kv_exchange"]
            rows.append({"seq_length": seq, "cp": cp, "dp": plan["layout"]["dp"],
                         "peak_gb": plan["memory_per_gpu_gb"]["total"],
                         "activations_gb": max(s["activations"] for s in plan["memory_per_stage_gb"]),
                         "fits": plan["fits"], "proposed_cp": plan["proposed_cp"],
                         "step_seconds": plan["timing"]["step_seconds"], "kv_gb_per_step": x["bytes_per_step"] / 1e9,
                         "kv_seconds": x["seconds_per_step"], "kv_link": x["link"]})
    print("\nPlanner: Llama-3-70B, 4 x 8 A800, TP 8 x PP 2, SP, distributed optimizer, full recompute, "
          "global batch 64 (full-length documents):\n")
    print("| seq | CP | DP | activations GiB | peak GiB | fits | proposed CP | step | K/V ring per step |")
    print("|---:|---:|---:|---:|---:|:-:|---:|---:|---:|")
    for r in rows:
        kv = f"{r['kv_gb_per_step']:.0f} GB over {r['kv_link']}, {r['kv_seconds']:.1f} s" if r["cp"] > 1 else "-"
        print(f"| {r['seq_length'] // 1024}k | {r['cp']} | {r['dp']} | {r['activations_gb']:.1f} | "
              f"{r['peak_gb']:.1f} | {'yes' if r['fits'] else 'no'} | {r['proposed_cp']} | "
              f"{r['step_seconds']:.0f} s | {kv} |")
    # Without full recompute the activations of a long micro-batch do not fit at CP 1:
    # on 16 x 8 A800 (CP up to 8 beside TP 8 x PP 2) the planner proposes the smallest CP that does.
    print("\nPlanner, selective recompute instead, 16 x 8 A800, TP 8 x PP 2: peak GiB per GPU at each CP\n")
    print("| seq | CP 1 | CP 2 | CP 4 | CP 8 | proposed CP |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq in (32768, 131072):
        plan = make_plan(plan_config(model="llama3-70b", nnodes=16, gpus_per_node=8, tensor_model_parallel_size=8,
                                    pipeline_model_parallel_size=2, sequence_parallel=True,
                                    use_distributed_optimizer=True, recompute_granularity="selective",
                                    seq_length=seq, global_batch_size=64, gpu="a800")).to_json()
        opts = {o["cp"]: o["peak_gb"] for o in plan["cp_options_gb"]}
        cells = " | ".join(f"{opts[c]:.1f}" if c in opts else "-" for c in (1, 2, 4, 8))
        print(f"| {seq // 1024}k | {cells} | {plan['proposed_cp']} |")
        rows.append({"seq_length": seq, "nnodes": 16, "recompute": "selective", "cp_options_gb": opts,
                     "proposed_cp": plan["proposed_cp"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--skip-planner", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seq_length % 4:
        ap.error(f"--seq-length {args.seq_length} must be a multiple of 4 (2 x CP for CP 2)")
    if args.worker:
        return worker(args)
    result = {}
    if not args.skip_cpu:
        result["cpu"] = cpu_part(args)
    if not args.skip_planner:
        result["planner"] = planner_part()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
