#!/usr/bin/env python
"""Does the separator keep packed samples apart without a document mask?

    python tools/analyze_leakage.py --model outputs/run/ckpt --data-prefix data/sft/chat \
        --seq-length 4096 --pack-mode greedy --max-sequences 16 --layers 0 15 31 --output-dir leakage/

For a model (HF directory, training checkpoint or HF import) and an SFT indexed dataset, packs
sequences as a no-mask run sees them and measures per layer (and head, in the JSON) the share
of attention on earlier documents by distance from the document's start (the attention sink
apart), and each document's loss packed after others minus alone, with the separator as-is,
removed and doubled. Writes leakage.md, leakage.json and leakage.png.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    for flag, ok, why in (("--model", os.path.exists(args.model), "not found"),
                          ("--data-prefix", os.path.isfile(args.data_prefix + ".idx"), "no PREFIX.idx"),
                          ("--max-sequences", args.max_sequences >= 1, "must be >= 1"),
                          ("--seq-length", args.seq_length >= 2, "must be >= 2")):
        if not ok:
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {why}")
    from megatron_pack.files.indexed import check_dataset
    from megatron_pack.files.indexed_check import DatasetError

    try:
        check_dataset(args.data_prefix)  # missing parts or an empty dataset, before the model loads
    except (FileNotFoundError, DatasetError) as e:
        print(f"error: --data-prefix {e}", file=sys.stderr)
        return 2
    from megatron_pack.experiment.leakage_report import run_leakage

    try:
        res = run_leakage(args.model, args.data_prefix, args.output_dir, seq_length=args.seq_length,
                          mode=args.pack_mode, max_sequences=args.max_sequences, layers=args.layers,
                          separator=args.separator_id, document_mask=args.document_mask, device=args.device,
                          seed=args.seed, model_preset=args.model_preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"])
    print(f"wrote {os.path.join(args.output_dir, 'leakage.json')}, leakage.md, {res['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
