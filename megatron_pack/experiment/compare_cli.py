"""``python tools/compare_modes.py``: the paper's comparison, on your data and model.

    python tools/compare_modes.py                          # built-in sample, tiny model, CPU
    python tools/compare_modes.py --synthetic 4000 --modes padding greedy:chunk=1000 random:chunk=1000 bfd
    torchrun --nproc-per-node 8 tools/compare_modes.py --masks on off -- \\
        --data-path /data/sft/chat --model llama3-8b --pretrained-checkpoint /ckpt/llama3-8b-import \\
        --tokenizer-model /models/Meta-Llama-3-8B-Instruct --seq-length 4096 \\
        --micro-batch-size 1 --global-batch-size 64 --lr 1e-5 --tensor-model-parallel-size 8

Flags after ``--`` are ``python -m megatron_pack.train`` flags shared by every run; without
``--data-path`` there the built-in sample (or ``--synthetic N`` conversations) and the tiny
model are used, with the quickstart's settings.
"""

from __future__ import annotations

import argparse
import os

from megatron_pack.experiment.presets import sample_train_flags
from megatron_pack.experiment.settings import PAPER_MODES

PROG = "compare_modes.py"


def build_parser() -> argparse.ArgumentParser:
    from megatron_pack.frontdoor import FrontDoorParser

    p = FrontDoorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(PAPER_MODES),
                   help="packing modes (e.g. padding:pad_to=longest greedy:chunk=1000 random:chunk=1000 bfd); "
                        "MODE/nomask for one setting without the document mask")
    p.add_argument("--masks", nargs="+", choices=("on", "off"), default=["on"],
                   help="document mask choices crossed with --modes (padding runs once)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (every run)")
    p.add_argument("--evals-per-run", type=int, default=4, help="held-out evaluations per run (for the curves)")
    p.add_argument("--output-dir", default=os.path.join("outputs", "compare"))
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="without --data-path: N synthetic conversations instead of the built-in sample")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then training flags for every run")
    return p


def main(argv=None) -> int:
    from megatron_pack.frontdoor import fail
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    args = build_parser().parse_args(argv)
    flags = list(args.train_flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    from megatron_pack.experiment.settings import expand_settings

    try:
        settings = expand_settings(args.modes, [m == "on" for m in args.masks])
    except ValueError as e:
        fail(PROG, f"--modes: {e}")
    if args.evals_per_run < 0:
        fail(PROG, "--evals-per-run: must be >= 0")
    if "--data-path" not in flags:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            fail(PROG, "under torchrun pass --data-path after -- (prepare the data once, before launching)")
        from megatron_pack.experiment.sample_data import prepare_sample_data

        prefix, tok = prepare_sample_data(os.path.join(args.output_dir, "data"), args.synthetic)
        flags = sample_train_flags(prefix, tok) + flags
    if "--train-iters" not in flags and "--train-epochs" not in flags:
        flags += ["--train-epochs", str(args.epochs)]
    from megatron_pack.config.cli import parse_args

    base = parse_args(flags)  # exits 2 naming the flag on a bad one
    from megatron_pack.files.indexed import check_dataset
    from megatron_pack.files.indexed_check import DatasetError

    try:
        for prefix in base.data.prefixes:  # missing or empty datasets, before any model is built
            check_dataset(prefix)
        from megatron_pack.experiment.compare import run_comparison

        out = run_comparison(base, settings, args.output_dir, args.evals_per_run)
    except (FileNotFoundError, DatasetError) as e:  # e.g. nothing to train on at --seq-length
        fail(PROG, str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nTraining time per setting ({base.train.train_epochs or base.train.train_iters} "
              f"{'epochs' if base.train.train_epochs else 'steps'}; speedup over {out['baseline']}):")
        print(out["time_table"])
        print("\nHeld-out loss (same conversations, document mask, same evaluation for every run):")
        print(out["loss_table"])
        print(f"\nwrote {os.path.join(args.output_dir, 'results.json')}, time.md, loss.md, {out.get('plot')}")
    return 0
