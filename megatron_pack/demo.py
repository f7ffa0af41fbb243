"""The quickstart: preprocess the built-in sample, train the tiny model under each packing
mode for one epoch, print what each mode bought.

    python -m megatron_pack.demo                  # outputs under ./outputs/demo
    python -m megatron_pack.demo --modes padding bfd --seq-length 512

Every mode sees the same training conversations once (one epoch) and is scored on the same
held-out conversations in the same way (see ``--eval-pack-mode``), so the columns compare:
packing cuts the number of steps and raises real tokens/s; fewer optimizer steps over the
same data is also why a packed run's loss can end higher (the "Packing Analysis" paper's
trade-off).
"""

from __future__ import annotations

import argparse
import os
import time

from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.reporting import markdown_table

#: The quickstart compares these (windowed_bfd packs like bfd on 480 chats).
DEMO_MODES = ("padding", "greedy", "random", "bfd")


def prepare_data(workdir: str) -> str:
    """Sample JSONL + tokenizer + indexed dataset under ``workdir``; returns the prefix."""
    from megatron_pack.chat.preprocess import PreprocessConfig, preprocess
    from megatron_pack.chat.sample import prepare_sample

    jsonl, tok = prepare_sample(workdir)
    prefix = os.path.join(workdir, "sample")
    summary = prefix + "_summary.json"
    if not (os.path.isfile(summary) and os.path.getmtime(summary) >= os.path.getmtime(os.path.join(tok, "SAMPLE_SHA"))):
        preprocess(PreprocessConfig(inputs=[jsonl], tokenizer=tok, output_prefix=prefix, progress=False))
    return prefix


def demo_config(prefix: str, mode: str, args) -> "TrainConfig":  # noqa: F821
    from megatron_pack.training.config import (CheckpointArgs, DataArgs, LoggingArgs, ModelArgs, OptimArgs,
                                               PackingArgs, TrainArgs, TrainConfig)

    return TrainConfig(
        model=ModelArgs(model="tiny", tokenizer_model=os.path.join(os.path.dirname(prefix), "tokenizer")),
        data=DataArgs(data_path=prefix, seq_length=args.seq_length, valid_fraction=args.valid_fraction,
                      packing=PackingArgs(pack_mode=mode, document_mask=not args.no_document_mask)),
        optim=OptimArgs(lr=args.lr, min_lr=args.lr / 10, lr_warmup_fraction=0.1, clip_grad=1.0),
        train=TrainArgs(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                        train_epochs=args.epochs, seed=args.seed),
        checkpoint=CheckpointArgs(),
        logging=LoggingArgs(log_interval=args.log_interval,
                            log_file=os.path.join(args.output_dir, "runs", f"{mode}.jsonl")),
    )


def format_results(rows: list[dict]) -> str:
    heads = ["mode", "sequences", "steps", "wall time (s)", "ms/step", "real tokens/s", "speedup", "ideal", "final train loss",
             "held-out loss"]
    cells = [[r["mode"], f"{r['sequences']:,}", str(r["steps"]), f"{r['wall_time']:.1f}", f"{r['step_s'] * 1000:.0f}",
              f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
              f"{r['final_train_loss']:.4f}", f"{r['valid_loss']:.4f}"] for r in rows]
    return markdown_table(heads, cells)


def run_demo(args) -> list[dict]:
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.report import format_table, plot_report, report
    from megatron_pack.data.sampling import split_indices

    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    prefix = prepare_data(os.path.join(args.output_dir, "data"))
    print(f"> data ready in {time.perf_counter() - t0:.1f}s: {prefix}", flush=True)

    ds = SFTIndexedDataset(prefix)
    train_idx, _ = split_indices(len(ds), args.valid_fraction, args.seed)
    lengths = ds.lengths[train_idx]
    print(f"\nPacking the {lengths.size} training conversations ({int(lengths.sum()):,} tokens) "
          f"into sequences of {args.seq_length}:")
    plans = {}
    print(format_table(report(lengths, args.seq_length, args.modes, seed=args.seed, plans=plans)), flush=True)
    png = plot_report(plans, lengths, args.seq_length, os.path.join(args.output_dir, "packing.png"))
    print(f"> fill-ratio and length histograms: {png} (conversation lengths: {prefix}_lengths.png)", flush=True)

    from megatron_pack.experiment.compare import run_comparison
    from megatron_pack.experiment.settings import expand_settings

    # The comparison runner (tools/compare_modes.py) trains every mode from the same initial
    # weights and scores the same held-out split; its tables and curves go to comparison/.
    settings = expand_settings(args.modes, [not args.no_document_mask])
    comparison = run_comparison(demo_config(prefix, args.modes[0], args), settings,
                                os.path.join(args.output_dir, "comparison"), evals_per_run=2)
    rows = comparison["rows"]
    table = format_results(rows)
    print(f"\nOne epoch of the tiny model per mode (seq {args.seq_length}, global batch {args.global_batch_size}). "
          f"Real tokens/s: mean real tokens per step / median step time; speedup over padding beside the ideal "
          f"(padding's sequences / the mode's); held-out loss over the same conversations for every mode:")
    print(table, flush=True)
    write_json_atomic(rows, os.path.join(args.output_dir, "results.json"))
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {os.path.join(args.output_dir, 'results.json')} (the comparison's tables, held-out curves and "
          f"step logs under {os.path.join(args.output_dir, 'comparison')}); total {time.perf_counter() - t0:.0f}s")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_pack.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("outputs", "demo"))
    p.add_argument("--modes", nargs="+", default=list(DEMO_MODES))
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--no-document-mask", action="store_true", help="the paper's setting")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-interval", type=int, default=5)
    return p


def main(argv=None) -> int:
    run_demo(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
