#!/usr/bin/env python
"""Does the separator keep packed samples apart without a document mask?

    python tools/analyze_leakage.py --model outputs/run/ckpt --data-prefix data/sft/chat \\
        --seq-length 4096 --pack-mode greedy --max-sequences 16 --layers 0 15 31 --output-dir leakage/

For a model (HF directory, training checkpoint or HF import) and an SFT indexed dataset, packs
sequences as a no-mask run sees them and measures per layer (and head, in the JSON) the share
of attention on earlier documents by distance from the document's start (the attention sink
apart), and each document's loss packed after others minus alone, with the separator as-is,
removed and doubled. Writes leakage.md, leakage.json and leakage.png.

Every flag is checked (``--layers`` against the layer count the model's JSON records) before
the model is loaded: a wrong invocation answers on one line, exit status 2.
"""

import os
import re
import sys

PROG = "analyze_leakage.py"


def build_parser():
    from megatron_pack.frontdoor import FrontDoorParser

    p = FrontDoorParser(prog=PROG, description=__doc__)
    p.add_argument("--model", required=True, help="HF directory, training checkpoint or import")
    p.add_argument("--data-prefix", required=True, help="indexed SFT dataset (tools/preprocess_sft.py output)")
    p.add_argument("--output-dir", default="leakage")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--pack-mode", default="greedy", help="how sequences are packed (any packing mode)")
    p.add_argument("--max-sequences", type=int, default=8, help="sequences analysed (bounds time and memory)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to analyse (default: all)")
    p.add_argument("--separator-id", type=int, default=None,
                   help="separator token (default: the most common last token of the conversations)")
    p.add_argument("--document-mask", action="store_true",
                   help="score with the mask (every figure must be 0: a check of the measurement)")
    p.add_argument("--model-preset", default=None, help="architecture of a training checkpoint without run_config")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=1234)
    return p


def check_args(args) -> None:
    """Every check that needs no model: raises ValueError / FileNotFoundError naming the flag."""
    from megatron_pack.experiment.leakage_report import recorded_num_layers
    from megatron_pack.files.indexed import check_dataset
    from megatron_pack.model.presets import get_preset
    from megatron_pack.packing.modes import get_mode

    if not os.path.exists(args.model):
        raise FileNotFoundError(f"--model {args.model}: not found")
    check_dataset(args.data_prefix)
    for flag, value, low in (("--seq-length", args.seq_length, 2), ("--max-sequences", args.max_sequences, 1)):
        if value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}")
    if args.separator_id is not None and args.separator_id < 0:
        raise ValueError(f"--separator-id {args.separator_id}: must be >= 0")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    try:
        get_mode(args.pack_mode)
    except (KeyError, ValueError) as e:
        raise ValueError(f"--pack-mode: {str(e).strip(chr(39) + chr(34))}") from None
    if args.model_preset:
        get_preset(args.model_preset)
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output-dir {args.output_dir}: parent directory {parent} does not exist")
    if args.layers is not None:
        if len(set(args.layers)) != len(args.layers):
            raise ValueError(f"--layers {' '.join(map(str, args.layers))}: a layer is given twice")
        n = recorded_num_layers(args.model, args.model_preset)
        bad = [x for x in args.layers if x < 0 or (n is not None and x >= n)]
        if bad:
            where = f"[0, {n}) (the model's {n} layers)" if n is not None else "layers are numbered from 0"
            raise ValueError(f"--layers {' '.join(map(str, bad))}: outside {where}")


def main(argv=None) -> int:
    from megatron_pack.frontdoor import fail
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e))
    from megatron_pack.experiment.leakage_report import run_leakage

    try:
        res = run_leakage(args.model, args.data_prefix, args.output_dir, seq_length=args.seq_length,
                          mode=args.pack_mode, max_sequences=args.max_sequences, layers=args.layers,
                          separator=args.separator_id, document_mask=args.document_mask, device=args.device,
                          seed=args.seed, model_preset=args.model_preset)
    except ValueError as e:
        fail(PROG, str(e))
    print(res["markdown"])
    print(f"wrote {os.path.join(args.output_dir, 'leakage.json')}, leakage.md, {res['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
