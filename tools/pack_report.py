#!/usr/bin/env python
"""Compare packing modes on a dataset's sample lengths.

    python tools/pack_report.py --data-prefix data/sft --max-seq-length 4096
    python tools/pack_report.py --lengths lengths.npy --max-seq-length 16384 \\
        --modes padding,greedy,random,bfd,windowed_bfd:window=4096 --json report.json --plot report.png

Prints one row per mode: sequences, packing efficiency, the lower bound
ceil(tokens / max length) and the gap to it, samples per sequence, split/truncated
samples, samples left out for having no supervised token after truncation (as training does),
attention cost relative to padding, planning seconds.

With ``--data-parallel-size`` (and ``--global-batch-size``), also the expected per-step
compute imbalance over DP ranks (max/mean of linear + attention FLOPs, ``--model``'s
architecture) with contiguous and balanced placement, and the predicted step-time gain::

    python tools/pack_report.py --lengths lengths.npy --max-seq-length 32768 \
        --data-parallel-size 8 --global-batch-size 64 --model llama3-8b

With ``--pack-scope step --global-batch-size G``, also the row of per-step packing (the padded
run's steps of G conversations, each packed with bfd) and a table of steps and rows per step.
"""

import os

PROG = "pack_report.py"


def main(argv=None):
    from megatron_pack.frontdoor import FrontDoorParser, fail
    from megatron_pack.packing.modes import get_mode
    from megatron_pack.packing.plan import OVERLONG_CHOICES  # numpy only: light
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    p = FrontDoorParser(prog=PROG, description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-prefix", help="SFT indexed dataset prefix (PREFIX.bin/.idx, written by preprocess_sft.py)")
    src.add_argument("--lengths", help="1-D integer .npy of sample lengths")
    p.add_argument("--max-seq-length", type=int, required=True, help="sequence capacity in tokens")
    p.add_argument(
        "--modes",
        default="padding,greedy,random,bfd,windowed_bfd",
        help="comma-separated packing modes; options as name:key=value (windowed_bfd:window=4096)",
    )
    p.add_argument("--seed", type=int, default=1234, help="shuffle seed of the random and windowed modes")
    p.add_argument(
        "--overlong",
        choices=OVERLONG_CHOICES,
        default="truncate",
        help="what happens to samples longer than --max-seq-length; cut-at-turns cuts the stored "
        "tokens at turn starts (split_turns: deprecated spelling)",
    )
    p.add_argument(
        "--pack-scope",
        choices=("epoch", "step"),
        default="epoch",
        help="step: add the row of training's --pack-scope step (the padded run's steps of "
        "--global-batch-size conversations, each packed with bfd) with rows per step min/mean/max",
    )
    p.add_argument("--json", dest="json_out", help="write the rows as JSON here")
    p.add_argument("--plot", dest="plot_out", help="write fill-ratio and length histograms (PNG) here")
    b = p.add_argument_group("balance forecast (per-step compute imbalance over data-parallel ranks)")
    b.add_argument("--data-parallel-size", type=int, help="DP ranks; turns the forecast on")
    b.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per step (required with --data-parallel-size); conversations per step for --pack-scope step",
    )
    b.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    b.add_argument(
        "--model",
        default="llama3-8b",
        metavar="PRESET|PATH",
        help="architecture the cost model reads: a preset or a HF config.json / model directory (default llama3-8b)",
    )
    b.add_argument(
        "--vocab-size", type=int, help="vocabulary for the output layer (default the preset's; required for tiny)"
    )
    args = p.parse_args(argv)
    if args.data_parallel_size is not None:
        if args.data_parallel_size < 1:
            p.error(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
        if args.global_batch_size is None:
            p.error("--data-parallel-size needs --global-batch-size")
        if args.global_batch_size % (args.data_parallel_size * max(args.micro_batch_size, 1)):
            p.error(
                f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size "
                f"{args.micro_batch_size} x --data-parallel-size {args.data_parallel_size}"
            )
        if args.model == "tiny" and args.vocab_size is None:
            p.error("--model tiny needs --vocab-size")
    if args.pack_scope == "step" and args.global_batch_size is None:
        p.error("--pack-scope step needs --global-batch-size (conversations per step)")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        p.error(f"--global-batch-size must be >= 1, got {args.global_batch_size}")
    modes = [m for m in args.modes.split(",") if m]
    try:  # everything checkable before the dataset is read
        for m in modes:
            get_mode(m)
        if args.max_seq_length < 1:
            raise ValueError(f"--max-seq-length must be >= 1, got {args.max_seq_length}")
        if args.data_prefix is not None:
            from megatron_pack.files.indexed import check_dataset

            check_dataset(args.data_prefix)
        elif not os.path.isfile(args.lengths):
            raise FileNotFoundError(f"{args.lengths}: no such lengths file")
        for out in (args.json_out, args.plot_out):
            if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
                raise FileNotFoundError(f"{out}: output directory does not exist")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        fail(PROG, str(e).strip("'\""))

    from megatron_pack.packing.report import run

    forecast = args.data_parallel_size is not None
    plans = {} if forecast else None
    try:
        rows = run(
            args.max_seq_length,
            data_prefix=args.data_prefix,
            lengths_file=args.lengths,
            modes=modes,
            seed=args.seed,
            overlong=args.overlong,
            json_out=None if forecast else args.json_out,
            plot_out=args.plot_out,
            plans=plans,
            step_global_batch_size=args.global_batch_size if args.pack_scope == "step" else None,
        )
        if forecast:
            _forecast(args, rows, plans)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e))


def _forecast(args, rows, plans):
    from megatron_pack.data.balance_forecast import forecast, format_forecasts
    from megatron_pack.files.atomic import write_json_atomic
    from megatron_pack.model.cost import CostModel
    from megatron_pack.model.presets import get_preset, padded_vocab_size

    preset = get_preset(args.model)
    cost = CostModel.from_architecture(preset, vocab_size=padded_vocab_size(args.vocab_size or preset.vocab_size, 1))
    out = {
        mode: forecast(
            plan,
            cost,
            global_batch_size=args.global_batch_size,
            dp_size=args.data_parallel_size,
            micro_batch_size=args.micro_batch_size,
            seed=args.seed,
        )
        for mode, plan in plans.items()
    }
    print()
    print(format_forecasts(out, args.data_parallel_size, args.global_batch_size))
    if args.json_out:
        for row, f in zip(rows, out.values()):
            row["balance"] = f.to_json()
        write_json_atomic(rows, args.json_out)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
