#!/usr/bin/env python
"""Chat JSONL -> Megatron-Core indexed SFT dataset (tokens, loss mask, turn starts).

    python tools/preprocess_sft.py --input data/*.jsonl.gz --tokenizer /models/llama3/ \\
        --output-prefix /data/sft/chat --chat-template llama3 --max-seq-length 8192 \\
        --overlong split-chat --workers 8

Writes PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, PREFIX_turns.bin/.idx, PREFIX_summary.json,
PREFIX_rejects.jsonl and PREFIX_lengths.png. Exit status 2 on bad input or setup (one line:
file, line, reason), including a file whose every record is rejected and, with --strict, the first
bad record; Megatron-Core is imported only once there is a conversation to write.
"""

import os
import sys
import time

from megatron_pack.frontdoor import FrontDoorParser
from megatron_pack.preprocess.encode import LOSS_POLICIES  # (numpy only: light)
from megatron_pack.preprocess.overlong import DEPRECATED_OVERLONG, OVERLONG_POLICIES
from megatron_pack.templates.registry import TEMPLATES

PROG = "preprocess_sft.py"


def parse_args(argv=None):
    p = FrontDoorParser(prog=PROG, description=__doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl or .jsonl.gz files, in order")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer.json, a HF tokenizer directory, or a SentencePiece .model")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--chat-template", default="auto", choices=["auto", *TEMPLATES],
                   help="auto: the tokenizer directory's chat_template if any, else from its special tokens")
    p.add_argument("--hf-special-tokens-in-text", action="store_true",
                   help="message text that spells a control token (e.g. '<|eot_id|>') becomes that token, as "
                        "apply_chat_template does by default; without it the text stays text")
    p.add_argument("--template-date", default=None, metavar="YYYY-MM-DD",
                   help="Jinja templates: the date strftime_now returns (default: the day the run starts)")
    p.add_argument("--template-time-limit", type=float, default=5.0, metavar="SECONDS",
                   help="Jinja templates: a record whose render takes longer is rejected (template_limit)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="N")
    p.add_argument("--overlong", default="truncate", choices=[*OVERLONG_POLICIES, *DEPRECATED_OVERLONG],
                   help="what to do with conversations over --max-seq-length; split-chat re-renders each "
                        "piece as a complete chat (split-turns: deprecated spelling)")
    p.add_argument("--loss-on", default="assistant", choices=list(LOSS_POLICIES),
                   help="trained tokens: every assistant turn, only the last one, or all tokens")
    p.add_argument("--workers", type=int, default=1, metavar="N")
    p.add_argument("--chunk-size", type=int, default=512, help="conversations per worker task")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (exit 2)")
    p.add_argument("--no-fast-tokenizer", action="store_true",
                   help="always encode with HF tokenizers, even where tiktoken would give the same ids faster")
    p.add_argument("--no-plot", action="store_true", help="skip the length histogram PNG")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    args = parse_args(argv)
    from megatron_pack.preprocess.pipeline import PreprocessConfig, PreprocessError, check_paths, preprocess
    from megatron_pack.tokenization.tokenizer import TokenizerError

    try:  # settings and paths first: a wrong invocation answers before the heavy imports
        cfg = PreprocessConfig(
            inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
            chat_template=args.chat_template, special_as_text=not args.hf_special_tokens_in_text,
            template_date=args.template_date, template_time_limit_s=args.template_time_limit,
            max_seq_length=args.max_seq_length, overlong=args.overlong,
            loss_on=args.loss_on, workers=args.workers, strict=args.strict, chunk_size=args.chunk_size,
            fast_tokenizer=not args.no_fast_tokenizer, progress=False if args.no_progress else None,
            plot=not args.no_plot,
        )
        check_paths(cfg)
        if not os.path.exists(cfg.tokenizer):
            raise PreprocessError(f"{cfg.tokenizer}: tokenizer path does not exist")
    except PreprocessError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    try:
        s = preprocess(cfg)
    except (PreprocessError, TokenizerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only output directory, a full disk: temporaries already removed
        from megatron_pack.files.atomic import os_error_line

        print(f"{PROG}: error: {os_error_line(exc, cfg.output_prefix)}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - start
    c = s["conversations"]
    print(f"conversations: read {c['read']}, written {c['written']}, rejected {c['rejected']} "
          f"{c['rejected_by_reason'] or ''}".rstrip())
    print(f"documents {s['documents']}, tokens {s['tokens']}, supervised {s['supervised_tokens']} "
          f"({100 * s['supervised_fraction']:.1f}%), length p50/p99/max "
          f"{s['length'].get('p50', 0):.0f}/{s['length'].get('p99', 0):.0f}/{s['length'].get('max', 0)}")
    print(f"{secs:.1f}s, {c['read'] / secs:.0f} conversations/s, {s['tokens'] / secs:.0f} tokens/s "
          f"(workers {args.workers}); summary: {s['outputs']['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
