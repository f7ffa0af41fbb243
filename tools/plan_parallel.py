#!/usr/bin/env python
"""Validate and cost a parallel layout before it is queued: parameters, memory, time.

    python tools/plan_parallel.py --model llama3-70b --nnodes 4 --gpus-per-node 8 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel \\
        --use-distributed-optimizer --gpu a800-80gb --seq-length 4096 --micro-batch-size 1 \\
        --global-batch-size 64 [--data-prefix PREFIX --pack-mode bfd --train-epochs 3] [--json plan.json]

Flag names are the training CLI's (Megatron-LM's), so a launch script can pass its whole
argument arrays; training flags the planner does not model are ignored and listed, any other
flag is an error naming the nearest valid one. Exit status 0 fits, 1 does not fit, 2 for an
illegal layout, bad input, or data too small for one global batch (it cannot run), with the reason.
"""

import argparse
import sys


PROG = "plan_parallel.py"


def build_parser() -> argparse.ArgumentParser:
    from megatron_pack.model.presets import PRESETS
    from megatron_pack.model.vocab import VOCAB_RULE
    from megatron_pack.packing.plan import OVERLONG_CHOICES
    from megatron_pack.frontdoor import FrontDoorParser

    # exact flag names only (FrontDoorParser): a training flag must never be taken as an abbreviation of ours
    p = FrontDoorParser(prog=PROG, description=__doc__)
    b = argparse.BooleanOptionalAction
    g = p.add_argument_group("cluster")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--gpus-per-node", "--nproc-per-node", "--nproc_per_node", dest="gpus_per_node", type=int, default=8)
    g.add_argument("--gpu", default="a800-80gb", help="A800-80GB, A100-80GB, H100-80GB, H200 (or a800, a100, h100, h200)")
    g.add_argument("--mfu", type=float, default=None, help="assumed model FLOP utilisation while computing (default 0.40)")
    g.add_argument("--overhead-gb", type=float, default=3.0, help="per-GPU allowance for CUDA context, NCCL, fragmentation")
    g = p.add_argument_group("model and parallelism (training CLI names)")
    g.add_argument("--model", default="llama3-70b", metavar="PRESET|PATH",
                   help=f"a preset ({', '.join(PRESETS)}) or the path of a Hugging Face config.json / model directory")
    g.add_argument("--vocab-size", type=int, default=None, help="without it, as training: " + VOCAB_RULE)
    g.add_argument("--tokenizer-model", default=None, help="read the vocabulary size from this tokenizer")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", default="p2p", choices=("p2p", "a2a", "allgather", "a2a+p2p"),
                   help="costed as TE's ring (p2p); accepted so launch scripts can pass it")
    g.add_argument("--sequence-parallel", action=b, default=False)
    g.add_argument("--use-distributed-optimizer", action=b, default=False)
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-activations", action="store_true", help="Megatron's alias of --recompute-granularity selective")
    g.add_argument("--bf16", action=b, default=True)
    g.add_argument("--flash-attention", action=b, default=True,
                   help="attention kernels keep no s x s scores (TE / flash-attn; the THD path)")
    g = p.add_argument_group("batch and data")
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=64)
    g.add_argument("--data-prefix", "--data-path", dest="data_path", default=None, nargs="+", metavar="PREFIX",
                   help="SFT indexed dataset prefix, or a blend as training takes it ('0.7 A 0.3 B'): "
                        "cost every packing mode on the training stream")
    g.add_argument("--pack-mode", default="bfd")
    g.add_argument("--modes", default="padding,greedy,random,bfd,windowed_bfd", help="modes to compare")
    g.add_argument("--document-mask", action=b, default=True)
    g.add_argument("--pad-attention", action="store_true", help="cost attention as S^2 per sequence (BSHD kernels)")
    g.add_argument("--overlong", choices=OVERLONG_CHOICES, default="truncate",
                   help="cut-at-turns cuts the stored tokens at turn starts (split_turns: deprecated spelling)")
    g.add_argument("--valid-fraction", type=float, default=0.05, help="held out of training, as the training CLI does")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--train-epochs", type=float, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--balance-batches", action=b, default=None,
                   help="as training: which DP placement the step pays for (default on when DP > 1 or PP > 1)")
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_out", default=None, help="write the plan as JSON here")
    g.add_argument("--progress", action=b, default=True)
    return p


def split_unknown(parser, unknown: list) -> list:
    """The training flags among ``unknown`` (with their values), to be listed as not modelled;
    a flag that is neither ours nor the training CLI's is a usage error naming the nearest one."""
    from megatron_pack.frontdoor import unknown_message
    from megatron_pack.training.cli import build_parser as training_parser

    training = training_parser().known_flags()
    typos = [w for w in unknown if w.startswith("--") and w.split("=", 1)[0] not in training]
    if typos:
        parser.error(unknown_message(typos, sorted(set(parser.known_flags()) | set(training))))
    return unknown


def main(argv=None) -> int:
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    unknown = split_unknown(parser, unknown)

    from megatron_pack.planning.plan import CannotRunError, LayoutError, PlanConfig, make_plan, validate_layout
    from megatron_pack.planning.timing import DEFAULT_MFU

    try:
        # cheap checks first: the layout rules, modes and files answer before any tokenizer,
        # model build or Megatron-Core import
        from megatron_pack.data.blend import parse_blend
        from megatron_pack.files.indexed import check_dataset
        from megatron_pack.model.presets import get_preset
        from megatron_pack.packing.modes import get_mode

        data_path = args.data_path[0] if args.data_path and len(args.data_path) == 1 else args.data_path
        cfg = PlanConfig(
            model=args.model, nnodes=args.nnodes, gpus_per_node=args.gpus_per_node,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
            use_distributed_optimizer=args.use_distributed_optimizer,
            recompute_granularity=args.recompute_granularity or ("selective" if args.recompute_activations else None),
            bf16=args.bf16, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size, vocab_size=args.vocab_size, gpu=args.gpu,
            mfu=DEFAULT_MFU if args.mfu is None else args.mfu, overhead_gb=args.overhead_gb,
            flash_attention=args.flash_attention, data_path=data_path, pack_mode=args.pack_mode,
            modes=tuple(m for m in args.modes.split(",") if m), document_mask=args.document_mask,
            pad_attention=args.pad_attention, overlong=args.overlong, valid_fraction=args.valid_fraction, seed=args.seed,
            train_epochs=args.train_epochs, train_iters=args.train_iters, balance_batches=args.balance_batches,
            unmodelled_flags=list(unknown),
        )
        for spec in [args.pack_mode, *args.modes.split(",")]:
            if spec:
                get_mode(spec)
        prefixes = [] if data_path is None else [data_path] if isinstance(data_path, str) else \
            list(parse_blend(data_path, "--data-path").prefixes)
        for prefix in prefixes:
            check_dataset(prefix)
        validate_layout(cfg)  # the rules first, then (only for a legal layout) the torch-side multiples
        if args.vocab_size is None and args.tokenizer_model:
            from megatron_pack.model.vocab import resolve_vocab_size

            cfg.vocab_size = resolve_vocab_size(None, args.tokenizer_model, get_preset(args.model))
        plan = make_plan(cfg, progress=args.progress)
    except LayoutError as e:
        print(f"{PROG}: error: illegal layout: {e}", file=sys.stderr)
        return 2
    except (CannotRunError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"{PROG}: error: {str(e).strip(chr(39) + chr(34))}", file=sys.stderr)
        return 2
    from megatron_pack.planning.render import render, write_json

    print(render(plan))
    if args.json_out:
        write_json(plan, args.json_out)
        print(f"plan written to {args.json_out}")
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
