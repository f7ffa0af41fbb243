#!/usr/bin/env python
"""Convert Llama checkpoints between Hugging Face and megatron_pack (Megatron-Core).

    # HF -> a checkpoint that `python -m megatron_pack.train --load OUT` fine-tunes from (this TP/PP)
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Meta-Llama-3-8B --output ckpt/llama3-8b-tp4 \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --tokenizer Meta-Llama-3-8B

    # a training checkpoint (any TP/PP) or an import -> HF config.json + safetensors
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/sft --output llama3-8b-sft \\
        --tokenizer Meta-Llama-3-8B --max-shard-size 5GB

Both stream one layer at a time and validate everything before writing; on an error
nothing is left at --output. Only safetensors are read from HF directories.
"""

import os

PROG = "convert_checkpoint.py"


def check_inputs(args) -> None:
    """Paths and sizes, before torch and Megatron-Core are imported (a wrong invocation fails fast)."""
    if args.command == "hf-to-megatron":
        if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
            raise FileNotFoundError(f"--hf-dir {args.hf_dir}: no config.json there")
        for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "make_vocab_size_divisible_by"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    elif not os.path.isdir(args.load):
        raise FileNotFoundError(f"--load {args.load}: no such checkpoint directory")
    if args.tokenizer and not os.path.exists(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.dtype not in ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype {args.dtype}: choose auto, bf16 or fp32")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output {args.output}: parent directory {parent} does not exist")


def main(argv=None):
    from megatron_pack.frontdoor import FrontDoorParser, fail
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    p = FrontDoorParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF Llama / Mistral / Qwen2 directory -> megatron_pack import checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--output", required=True, help="new checkpoint directory (pass it to --load)")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1)
    a.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    a.add_argument("--dtype", default="auto", help="auto (keep), bf16 or fp32")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocabulary padding multiple (times TP), Megatron's rule")
    a.add_argument("--tokenizer", help="tokenizer directory or file to copy into OUTPUT/tokenizer")
    b = sub.add_parser("megatron-to-hf", help="training checkpoint (any TP/PP) or import -> HF directory "
                           "(Llama, Mistral or Qwen2)")
    b.add_argument("--load", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) or iter_*")
    b.add_argument("--output", required=True, help="new HF model directory")
    b.add_argument("--dtype", default="auto", help="auto (keep), bf16 or fp32")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    b.add_argument("--tokenizer", help="tokenizer directory or file to copy (default: the import's copy)")
    b.add_argument("--vocab-size", type=int, help="true vocabulary size when the run did not record it")
    b.add_argument("--model", help="preset or HF config.json / model directory, when the checkpoint records no "
                   "architecture (runs before architectures were recorded)")
    b.add_argument("--special-tokens-from", choices=("checkpoint", "tokenizer"), default="checkpoint",
                   help="which wins for bos/eos/pad ids and generation_config.json when both say: what the "
                   "checkpoint recorded (default) or the tokenizer's; the other fills what it leaves unset, "
                   "and OUTPUT/megatron_pack_export.json records where each came from")
    for q in (a, b):
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        check_inputs(args)
    except (FileNotFoundError, ValueError) as e:
        fail(PROG, str(e))

    from megatron_pack.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf

    try:
        if args.command == "hf-to-megatron":
            meta = convert_hf_to_megatron(
                args.hf_dir, args.output, tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size, dtype=args.dtype,
                tokenizer=args.tokenizer, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                progress=not args.no_progress)
            print(f"wrote {args.output}: TP {meta['tensor_model_parallel_size']} PP "
                  f"{meta['pipeline_model_parallel_size']}, {meta['architecture']['num_layers']} layers, vocab "
                  f"{meta['vocab_size']} (padded {meta['padded_vocab_size']}), {meta['dtype']}")
        else:
            res = convert_megatron_to_hf(args.load, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                         tokenizer=args.tokenizer, vocab_size=args.vocab_size, model=args.model,
                                         progress=not args.no_progress, special_tokens_from=args.special_tokens_from)
            print(res["specials"].describe())
            print(f"wrote {args.output} from a {res['source']}: {len(res['files'])} files "
                  f"({', '.join(res['files'][:4])}{', ...' if len(res['files']) > 4 else ''})")
    except (ConversionError, ValueError, FileNotFoundError) as e:
        fail(PROG, str(e))


if __name__ == "__main__":
    main()
