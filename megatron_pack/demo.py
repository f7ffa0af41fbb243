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

import numpy as np

from megatron_pack.experiment.presets import QUICKSTART_FLAGS, quickstart
from megatron_pack.experiment.settings import PAPER_MODES
from megatron_pack.files.atomic import write_json_atomic

#: The quickstart compares the paper's modes (windowed_bfd packs like bfd on 480 chats).
DEMO_MODES = PAPER_MODES


def prepare_data(workdir: str) -> str:
    """Sample JSONL + tokenizer + indexed dataset under ``workdir``; returns the prefix."""
    from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_pack.preprocess.sample import prepare_sample

    jsonl, tok = prepare_sample(workdir)
    prefix = os.path.join(workdir, "sample")
    summary = prefix + "_summary.json"
    from megatron_pack.files.indexed_check import preprocessing_finished

    if not (preprocessing_finished(prefix)  # an interrupted run's "incomplete" summary is redone
            and os.path.getmtime(summary) >= os.path.getmtime(os.path.join(tok, "SAMPLE_SHA"))):
        preprocess(PreprocessConfig(inputs=[jsonl], tokenizer=tok, output_prefix=prefix, progress=False))
    return prefix


def demo_config(prefix: str, mode: str, args) -> "TrainConfig":  # noqa: F821
    from megatron_pack.config.spec import (
        CheckpointArgs,
        DataArgs,
        LoggingArgs,
        ModelArgs,
        OptimArgs,
        PackingArgs,
        TrainArgs,
        TrainConfig,
    )

    return TrainConfig(
        model=ModelArgs(model=QUICKSTART_FLAGS["--model"],
                        tokenizer_model=os.path.join(os.path.dirname(prefix), "tokenizer")),
        data=DataArgs(data_path=prefix, seq_length=args.seq_length, valid_fraction=args.valid_fraction,
                      packing=PackingArgs(pack_mode=mode, document_mask=not args.no_document_mask)),
        optim=OptimArgs(lr=args.lr, min_lr=args.lr / 10, lr_warmup_fraction=quickstart("--lr-warmup-fraction"),
                        clip_grad=quickstart("--clip-grad")),
        train=TrainArgs(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                        train_epochs=args.epochs, seed=args.seed),
        checkpoint=CheckpointArgs(),
        logging=LoggingArgs(log_interval=args.log_interval,
                            log_file=os.path.join(args.output_dir, "runs", f"{mode}.jsonl")),
    )


#: Result columns: (heading, key, format). The timing columns all come from one robust figure,
#: the median step time, so the speedup always agrees with the time column beside it.
RESULT_COLUMNS = [
    ("mode", "mode", "{}"),
    ("sequences", "sequences", "{:,}"),
    ("steps", "steps", "{}"),
    ("median ms/step", "step_ms", "{:.0f}"),
    ("epoch time (s)", "epoch_time", "{:.1f}"),
    ("real tokens/s", "tokens_per_s", "{:,.0f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("ideal", "ideal_speedup", "{:.2f}x"),
    ("final train loss", "final_train_loss", "{:.4f}"),
    ("held-out loss", "valid_loss", "{:.4f}"),
]

#: Printed under the results table: what each column is and which ones to trust to the digit.
RESULT_NOTES = (
    "Deterministic (a re-run prints the same): sequences, steps, final train loss, held-out loss.\n"
    "Timings (vary run to run, more on a shared machine): median ms/step = the best of the epoch run's median "
    "step (the first left out) and the medians of the timing rounds, which train every mode a few steps in "
    "turn so load on the cores hits all modes alike; epoch time = steps x median ms/step, so one stalled step "
    "cannot decide it; real tokens/s = the epoch's real tokens / epoch time; speedup = padding's epoch time / "
    "the mode's. The summed wall time of every step and each round's median are in results.json.\n"
    "Ideal = padding's sequences / the mode's: a speedup above it means a padded row cost more than a packed "
    "one (its padding tail still runs through the layers), below it is mostly timing noise; one above "
    "1.3x its ideal is marked 'disturbed' with the reason, not a result.\n"
    "Held-out loss: the same held-out conversations, scored the same way, for every mode. Packed runs take "
    "fewer optimizer steps over the same epoch (steps column), so after one epoch their loss is higher; "
    "that is fewer updates, not worse updates (the paper's trade-off).")


def format_results(rows: list[dict]) -> str:
    """The results table; a disturbed speedup (:func:`~megatron_pack.experiment.timing_rounds.mark_disturbed`)
    is printed with the word beside it, so it cannot be read as a result."""
    from megatron_pack.experiment.tables import rows_table

    def cell(key, fmt):
        return lambda r: fmt.format(r[key]) + (" (disturbed)" if key == "speedup" and r.get("disturbed") else "")

    return rows_table(rows, [(h, cell(key, fmt)) for h, key, fmt in RESULT_COLUMNS])


def summarize_run(row: dict, round_step_s: list | None = None) -> dict:
    """One results row from a comparison-runner row (:func:`megatron_pack.experiment.compare.run_setting`):
    the timings all come from one step time, the best of the run's median step (the first, which pays
    for warm-up, left out) and the timing rounds' medians (``round_step_s``), since a shared machine
    stalls single steps for seconds and load only ever slows a step down."""
    rounds = [float(x) for x in (round_step_s or [])]
    step_s = min([row["step_s"], *rounds])
    epoch_time = step_s * row["steps"]
    real_tokens = float(row["real_tokens_seen"])
    return {"mode": row["mode"], "sequences": row["sequences"], "steps": row["steps"],
            "wall_time": row["wall_time"], "step_s": step_s, "step_ms": step_s * 1000.0,
            "run_step_s": row["step_s"], "round_step_s": rounds,
            "epoch_time": epoch_time, "real_tokens": real_tokens,
            "tokens_per_s": real_tokens / epoch_time if epoch_time else float("nan"),
            "final_train_loss": row["final_train_loss"], "valid_loss": row["valid_loss"],
            "padding_fraction": row["padding_fraction"]}


def add_speedups(rows: list[dict]) -> None:
    """Speedup and ideal against the padding row (else the first): both are ratios to it."""
    from megatron_pack.experiment.speedup import add_speedups as add

    add(rows, next((r for r in rows if r["mode"] == "padding"), rows[0]),
        {"speedup": "epoch_time", "ideal_speedup": "sequences"})


def run_demo(args) -> list[dict]:
    from megatron_pack.data.split import split_indices
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.report import format_table, plot_report, report

    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    prefix = prepare_data(os.path.join(args.output_dir, "data"))
    print(f"> data ready in {time.perf_counter() - t0:.1f}s: {prefix}", flush=True)

    ds = SFTIndexedDataset(prefix)
    train_idx, _ = split_indices(len(ds), args.valid_fraction, args.seed)
    lengths = ds.lengths[train_idx]
    over = int((lengths > args.seq_length).sum())
    kept = int(np.minimum(lengths, args.seq_length).sum())
    print(f"\nPacking the {lengths.size} training conversations into sequences of {args.seq_length}: "
          f"{kept:,} tokens after truncating the {over} longer than {args.seq_length} "
          f"({int(lengths.sum()):,} before; the 'truncated' column):")
    plans = {}
    print(format_table(report(lengths, args.seq_length, args.modes, seed=args.seed, plans=plans)), flush=True)
    print(f"> preprocessing kept every conversation whole (no --max-seq-length; {prefix}_summary.json says "
          f"over_max_seq_length: null); packing truncates the {over} over {args.seq_length} tokens", flush=True)
    png = plot_report(plans, lengths, args.seq_length, os.path.join(args.output_dir, "packing.png"))
    print(f"> fill-ratio and length histograms: {png} (conversation lengths: {prefix}_lengths.png)", flush=True)

    from megatron_pack.experiment.compare import run_comparison
    from megatron_pack.experiment.settings import expand_settings

    # The comparison runner (tools/compare_modes.py) trains every mode from the same initial
    # weights and scores the same held-out split; its tables and curves go to comparison/.
    settings = expand_settings(args.modes, [not args.no_document_mask])
    base = demo_config(prefix, args.modes[0], args)
    comparison = run_comparison(base, settings, os.path.join(args.output_dir, "comparison"), evals_per_run=2)
    rounds = {}
    if args.timing_rounds:
        from megatron_pack.experiment.timing_rounds import interleaved_step_seconds

        print(f"\n> timing: {args.timing_rounds} rounds of {args.timing_steps} steps per mode, the modes in turn "
              "(load on the cores hits every mode alike; each mode's best median counts)", flush=True)
        rounds = interleaved_step_seconds(base, settings, args.timing_rounds, args.timing_steps)
    rows = [summarize_run(r, rounds.get(r["setting"])) for r in comparison["rows"]]
    add_speedups(rows)
    from megatron_pack.experiment.timing_rounds import mark_disturbed

    reasons = mark_disturbed(rows, spread={r["mode"]: [r["run_step_s"], *r["round_step_s"]] for r in rows})
    table = format_results(rows)
    epochs = "One epoch" if args.epochs == 1 else f"{args.epochs:g} epochs"
    print(f"\n{epochs} of the tiny model per mode (seq {args.seq_length}, global batch {args.global_batch_size}):")
    print(table)
    for why in reasons:
        print(f"DISTURBED, not a result: {why}")
    print(RESULT_NOTES, flush=True)
    write_json_atomic(rows, os.path.join(args.output_dir, "results.json"))
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "".join(f"DISTURBED, not a result: {w}\n" for w in reasons) + RESULT_NOTES + "\n")
    print(f"\nwrote {os.path.join(args.output_dir, 'results.json')} (the comparison's tables, held-out curves and "
          f"step logs under {os.path.join(args.output_dir, 'comparison')}); total {time.perf_counter() - t0:.0f}s")
    return rows


def build_parser() -> argparse.ArgumentParser:
    from megatron_pack.frontdoor import FrontDoorParser

    p = FrontDoorParser(prog="python -m megatron_pack.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default=os.path.join("outputs", "demo"), help="data, plots, logs, results")
    p.add_argument("--modes", nargs="+", default=list(DEMO_MODES), help="packing modes to compare")
    p.add_argument("--seq-length", type=int, default=int(quickstart("--seq-length")), help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=int(quickstart("--micro-batch-size")),
                   help="sequences per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=int(quickstart("--global-batch-size")),
                   help="sequences per optimizer step")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training conversations per mode")
    p.add_argument("--lr", type=float, default=quickstart("--lr"), help="peak learning rate (cosine, 10%% warmup)")
    p.add_argument("--valid-fraction", type=float, default=quickstart("--valid-fraction"),
                   help="conversations held out for the loss")
    p.add_argument("--no-document-mask", action="store_true", help="the paper's setting")
    p.add_argument("--seed", type=int, default=1234, help="split, packing and initialisation seed")
    p.add_argument("--log-interval", type=int, default=int(quickstart("--log-interval")),
                   help="steps between training log lines")
    p.add_argument("--timing-rounds", type=int, default=3,
                   help="rounds that time every mode a few steps in turn (0: only the epoch runs' medians)")
    p.add_argument("--timing-steps", type=int, default=4, help="timed steps per mode and round")
    return p


def main(argv=None) -> int:
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    args = build_parser().parse_args(argv)
    from megatron_pack.packing.modes import get_mode

    try:  # before preprocessing and Megatron's import
        for m in args.modes:
            get_mode(m)
        if args.timing_rounds < 0 or args.timing_steps < 1:
            raise ValueError(f"--timing-rounds must be >= 0 and --timing-steps >= 1, got {args.timing_rounds} "
                             f"and {args.timing_steps}")
    except (KeyError, ValueError) as e:
        from megatron_pack.frontdoor import fail

        fail("python -m megatron_pack.demo", str(e).strip("'\""))
    run_demo(args)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
