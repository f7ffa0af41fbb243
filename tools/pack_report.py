#!/usr/bin/env python
"""Compare packing modes on a dataset's sample lengths.

    python tools/pack_report.py --data-prefix data/sft --max-seq-length 4096
    python tools/pack_report.py --lengths lengths.npy --max-seq-length 16384 \\
        --modes padding,greedy,random,bfd,windowed_bfd:window=4096 --json report.json --plot report.png

Prints one row per mode: sequences, packing efficiency, the lower bound
ceil(tokens / max length) and the gap to it, samples per sequence, split/truncated
samples, attention cost relative to padding, planning seconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    p.add_argument("--modes", default="padding,greedy,random,bfd,windowed_bfd",
                   help="comma-separated packing modes; options as name:key=value (windowed_bfd:window=4096)")
    p.add_argument("--seed", type=int, default=1234, help="shuffle seed of the random and windowed modes")
    p.add_argument("--overlong", choices=OVERLONG_CHOICES, default="truncate",
                   help="what happens to samples longer than --max-seq-length; cut-at-turns cuts the stored "
                        "tokens at turn starts (split_turns: deprecated spelling)")
    p.add_argument("--json", dest="json_out", help="write the rows as JSON here")
    p.add_argument("--plot", dest="plot_out", help="write fill-ratio and length histograms (PNG) here")
    args = p.parse_args(argv)
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
        fail(PROG, str(e).strip("'\""), status=1)

    from megatron_pack.packing.report import run

    try:
        run(args.max_seq_length, data_prefix=args.data_prefix, lengths_file=args.lengths, modes=modes,
            seed=args.seed, overlong=args.overlong, json_out=args.json_out, plot_out=args.plot_out)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e), status=1)


if __name__ == "__main__":
    main()
