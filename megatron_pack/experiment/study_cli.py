"""``python -m megatron_pack.experiment``: the paper's study on your model. Fine-tune a pretrained
HF model under each packing setting (the paper's modes, with and without the document mask),
then report training time, held-out loss, a generation score and the leakage without the mask.

    bash scripts/fetch_small_model.sh                    # SmolLM2-135M-Instruct + a chat corpus
    python -m megatron_pack.experiment --preset small    # the reduced CPU table (5-33 min on 2 cores)
    python -m megatron_pack.experiment --preset small --seeds 1234 2 3 4 5   # the published table
    python -m megatron_pack.experiment --model /models/my-hf-dir --data-path chats.jsonl \\
        --qa-path qa.jsonl --preset full --prepare-only  # once, one process; then:
    torchrun --nproc-per-node 8 -m megatron_pack.experiment --model /models/my-hf-dir \\
        --data-path chats.jsonl --qa-path qa.jsonl --preset full -- --tensor-model-parallel-size 2
    python -m megatron_pack.experiment --report-only --output-dir OUT   # rewrite the report

Outputs under ``--output-dir``: ``study_seed{S}.json`` per training seed (a rerun resumes it),
``study.json`` (every seed: mean / min / max / std per setting), ``study.md``, ``loss_vs_time.png``,
``study_quality.png``, ``study_leakage.png``. Flags after ``--`` are training flags for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_pack.experiment.presets import STUDY_PRESETS
from megatron_pack.experiment.rank_zero import DEFAULT_WAIT_MINUTES
from megatron_pack.experiment.settings import setting_names

PROG = "python -m megatron_pack.experiment"
CACHE = os.environ.get("MEGATRON_PACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_pack")
DEFAULT_MODEL = os.environ.get("MEGATRON_PACK_SMALL_MODEL") or os.path.join(CACHE, "smollm2-135m-instruct")
DEFAULT_DATA = os.path.join(CACHE, "chatterbot-corpus-en", "train.jsonl")
DEFAULT_QA = os.path.join(CACHE, "chatterbot-corpus-en", "qa_heldout.jsonl")


def build_parser() -> argparse.ArgumentParser:
    from megatron_pack.frontdoor import FrontDoorParser

    p = FrontDoorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model directory (Llama / Mistral / Qwen2)")
    p.add_argument("--data-path", default=DEFAULT_DATA, help="chat JSONL (train and held-out chats are drawn from it)")
    p.add_argument("--qa-path", default=DEFAULT_QA, help="chat JSONL of question/answer pairs for the generation score")
    p.add_argument("--output-dir", default=os.path.join("outputs", "real_model_study"))
    p.add_argument("--preset", choices=sorted(STUDY_PRESETS), default="small")
    p.add_argument("--settings", nargs="+", default=setting_names(), help="settings to train (MODE or MODE/nomask)")
    p.add_argument("--train-docs", type=int, default=None, help="training chats (default: the preset's)")
    p.add_argument("--heldout-docs", type=int, default=None, help="held-out chats (default: the preset's)")
    p.add_argument("--qa", type=int, default=None, help="QA prompts scored (default: the preset's)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training chats (default: the preset's)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers measured for leakage (default: the preset's; the full preset: all)")
    p.add_argument("--evals-per-run", type=int, default=0, help="trainer evaluations before the final one")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[1234],
                   help="training seed(s) (row order, random packing), run one after another")
    p.add_argument("--data-seed", type=int, default=1234,
                   help="train / held-out split and leakage rows; keep it fixed across --seed repeats")
    p.add_argument("--max-minutes", type=float, default=None, help="start no setting after this (rerun resumes)")
    p.add_argument("--keep-hf", action="store_true", help="keep each fine-tune's HF export")
    p.add_argument("--no-mask-check", dest="mask_check", action="store_false",
                   help="skip scoring the base model once with the mask (the leakage measurement's own check)")
    p.add_argument("--rank0-wait-minutes", type=float, default=DEFAULT_WAIT_MINUTES,
                   help="under torchrun, how long the other ranks wait while rank 0 scores")
    p.add_argument("--prepare-only", action="store_true", help="prepare data and the import, then stop")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from --output-dir's seed files")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then training flags for every run")
    return p


def parse(argv=None):
    """Flags with the preset's values filled in; a missing input fails here, in one line."""
    from megatron_pack.experiment.settings import Setting
    from megatron_pack.frontdoor import fail

    args = build_parser().parse_args(argv)
    for k, v in STUDY_PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    if args.report_only:
        return args
    for spec in args.settings:
        try:
            Setting.parse(spec)
        except (KeyError, ValueError) as e:
            fail(PROG, f"--settings: {str(e).strip(chr(39))}")
    for flag, path in (("--model", os.path.join(args.model, "config.json")), ("--data-path", args.data_path)):
        if not os.path.isfile(path):
            fail(PROG, f"{flag} {path}: not found (bash scripts/fetch_small_model.sh fetches the defaults)")
    if args.qa_path and not os.path.isfile(args.qa_path):
        fail(PROG, f"--qa-path {args.qa_path}: not found")
    return args


def report(out: str) -> int:
    from megatron_pack.experiment.study_report import report_dir
    from megatron_pack.experiment.study_seeds import load_seed_states
    from megatron_pack.frontdoor import fail

    if not load_seed_states(out):
        fail(PROG, f"--output-dir {out}: no study_seed*.json (run the study first)")
    print(report_dir(out))
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    out = os.path.abspath(args.output_dir)
    if args.report_only:
        return report(out)
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    import time

    from megatron_pack.experiment import study
    from megatron_pack.experiment.study_data import prepare

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not os.path.isfile(os.path.join(out, "data", "prepared.json")):
        from megatron_pack.frontdoor import fail

        fail(PROG, "under torchrun run once with --prepare-only first (one process)")
    t0 = time.perf_counter()
    info = prepare(args, out)
    if args.prepare_only:
        study.log(json.dumps({k: v for k, v in info.items() if k != "qa"}, indent=1))
        return 0
    if study.RANK == 0:
        study.migrate_legacy(out)
    study.run_study(args, args.train_flags, info, out, t0)
    if study.RANK == 0:
        report(out)
        done = ", ".join(os.path.basename(study.seed_state_path(out, seed)) for seed in args.seeds)
        print(f"\nwrote {done}; study.json (all seeds), study.md and the PNGs under {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
