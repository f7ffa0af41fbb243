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
    """The cluster flags (:class:`ClusterArgs`) and the run spec's modelled fields, generated from
    the same field objects as the training CLI's flags (:func:`megatron_pack.config.cli.add_spec_flags`)."""
    from megatron_pack.config.cli import add_dataclass_flags, add_spec_flags
    from megatron_pack.frontdoor import FrontDoorParser
    from megatron_pack.planning.cluster_plan import ACCEPTED, MODELLED, PLANNER_DEFAULTS, ClusterArgs

    # exact flag names only (FrontDoorParser): a training flag must never be taken as an abbreviation of ours
    p = FrontDoorParser(prog=PROG, description=__doc__)
    add_dataclass_flags(p, ClusterArgs, "cluster", aliases={"gpus_per_node": ("--nproc-per-node", "--nproc_per_node")})
    add_spec_flags(p, MODELLED + ACCEPTED, PLANNER_DEFAULTS, aliases={"data_path": ("--data-prefix",)})
    p.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's alias of --recompute-granularity selective")
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_out", default=None, help="write the plan as JSON here")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def split_unknown(parser, unknown: list) -> list:
    """The training flags among ``unknown`` (with their values), to be listed as not modelled;
    a flag that is neither ours nor the training CLI's is a usage error naming the nearest one."""
    from megatron_pack.config.cli import build_parser as training_parser
    from megatron_pack.frontdoor import unknown_message

    training = training_parser().known_flags()
    typos = [w for w in unknown if w.startswith("--") and w.split("=", 1)[0] not in training]
    if typos:
        parser.error(unknown_message(typos, sorted(set(parser.known_flags()) | set(training))))
    return unknown


def plan_config(args, unknown: list):
    """The parsed command line as a :class:`PlanConfig` (the spec's checks run here)."""
    import dataclasses

    from megatron_pack.config.cli import build_spec
    from megatron_pack.planning.cluster_plan import ClusterArgs, PlanConfig

    values = vars(args)
    cluster = ClusterArgs(**{f.name: values[f.name] for f in dataclasses.fields(ClusterArgs)})
    if values["recompute_activations"] and values["model__recompute_granularity"] is None:
        values["model__recompute_granularity"] = "selective"
    spec = build_spec(values)
    m = spec.model
    if m.vocab_size is None and m.tokenizer_model:  # recorded in the plan as the vocabulary it costs
        from megatron_pack.model.presets import get_preset
        from megatron_pack.model.vocab import resolve_vocab_size

        vocab = resolve_vocab_size(None, m.tokenizer_model, get_preset(m.model))
        spec = dataclasses.replace(spec, model=dataclasses.replace(m, vocab_size=vocab))
    return PlanConfig(spec, cluster, list(unknown))


def main(argv=None) -> int:
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    unknown = split_unknown(parser, unknown)

    from megatron_pack.config.spec import ConfigError, LayoutError
    from megatron_pack.planning.cluster_plan import CannotRunError, make_plan, validate_layout

    try:
        # cheap checks first: the spec's values, the layout rules and the files answer before any
        # tokenizer, model build or Megatron-Core import
        from megatron_pack.files.indexed import check_dataset

        cfg = plan_config(args, unknown)
        for prefix in cfg.spec.data.prefixes:
            check_dataset(prefix)
        validate_layout(cfg)  # the rules first, then (only for a legal layout) the torch-side multiples
        plan = make_plan(cfg, progress=args.progress)
    except LayoutError as e:
        print(f"{PROG}: error: illegal layout: {e}", file=sys.stderr)
        return 2
    except (CannotRunError, ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"{PROG}: error: {str(e).strip(chr(39) + chr(34))}", file=sys.stderr)
        return 2
    from megatron_pack.planning.render import render, write_json

    out = plan.to_json()
    print(render(out))
    if args.json_out:
        write_json(out, args.json_out)
        print(f"plan written to {args.json_out}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
