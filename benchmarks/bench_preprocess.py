#!/usr/bin/env python
"""Preprocessing throughput: megatron_pack's preprocess vs a plain per-conversation loop.

    python benchmarks/bench_preprocess.py                # 100k conversations, workers 1 and 2
    python benchmarks/bench_preprocess.py --num 20000 --workers 1 2 4

Data: synthetic conversations from ``megatron_pack.preprocess.sample`` (the three schemas,
1-6 exchanges, log-normal reply lengths, ~20-1500 tokens), a byte-level BPE with
Llama-3's pre-tokenizer trained on the first 5k of them, the llama3 template.

Rows:
- ``baseline``: a plain loop, per conversation: json.loads, schema normalisation, ONE
  tokenizer call (``encode_batch`` of that conversation's message texts), token/mask
  lists built in Python, written with ``SFTDatasetWriter`` -- same outputs as ours;
- ``tokenizer floor``: one ``Tokenizer.encode`` of the rendered string per conversation,
  nothing else (no parsing, no mask, no writing): what a single core spends on BPE alone;
- ``preprocess --workers N``: ``megatron_pack.preprocess.pipeline`` with N worker processes,
  its default tokenizer backend (tiktoken when installed and id-identical, see
  ``megatron_pack.tokenization.tokenizer.tiktoken_backend``), and again with ``tokenizers`` only.
Every row's token and supervised-token totals are checked against the baseline's.

Jinja rows (``--jinja-num`` conversations, default 10k, the tokenizer's own Llama-3 template):
- ``apply_chat_template loop``: transformers, per conversation, ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` with the template's assistant replies marked
  ``{% generation %}`` (how TRL gets SFT masks), written with the same writer;
- ``preprocess --chat-template jinja --workers N``: our Jinja path (same ids and masks, checked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from megatron_pack.files.indexed import SFTDatasetWriter
from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_pack.preprocess.sample import generate_conversations, write_jsonl
from megatron_pack.preprocess.schema import normalize_record
from megatron_pack.templates.builtin_templates import LLAMA3_CHAT_TEMPLATE
from megatron_pack.tokenization.tiny_tokenizers import build_bpe_tokenizer


def make_data(workdir: str, num: int, seed: int, vocab: int):
    jsonl = os.path.join(workdir, f"synthetic_{num}_{seed}.jsonl")
    if not os.path.exists(jsonl):
        t = time.perf_counter()
        write_jsonl(jsonl, generate_conversations(num, seed))
        print(f"generated {num} conversations in {time.perf_counter() - t:.1f}s -> {jsonl}", file=sys.stderr)
    tok_dir = os.path.join(workdir, f"bpe_{vocab}_{seed}_v2")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        texts = [m.content for r in generate_conversations(5000, seed) for m in normalize_record(r)[1]]
        build_bpe_tokenizer(tok_dir, texts + ["system", "user", "assistant", "ipython", "\n\n"], vocab_size=vocab,
                            chat_template=LLAMA3_CHAT_TEMPLATE)
    return jsonl, tok_dir


def baseline(jsonl: str, tok_dir: str, prefix: str):
    """The plain loop (see module docstring); returns (conversations, tokens, supervised)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    tok.encode_special_tokens = True
    sid = tok.token_to_id
    bos, sh, eh, eot = sid("<|begin_of_text|>"), sid("<|start_header_id|>"), sid("<|end_header_id|>"), sid("<|eot_id|>")
    nl2 = tok.encode("\n\n", add_special_tokens=False).ids
    roles = {"tool": "ipython"}
    header = {r: [sh] + tok.encode(roles.get(r, r), add_special_tokens=False).ids + [eh] + nl2
              for r in ("system", "user", "assistant", "tool")}
    n = total = supervised = 0
    with SFTDatasetWriter(prefix) as writer, open(jsonl, encoding="utf-8") as f:
        for line in f:
            _, msgs = normalize_record(json.loads(line))
            encoded = tok.encode_batch([m.content.strip() for m in msgs], add_special_tokens=False)
            ids, mask, turns = [bos], [0], []
            for m, e in zip(msgs, encoded):
                turns.append(0 if not turns else len(ids))
                trained = int(m.role == "assistant")
                ids += header[m.role]
                mask += [0] * len(header[m.role])
                ids += e.ids
                ids.append(eot)
                mask += [trained] * (len(e.ids) + 1)
            writer.add(ids, mask, turns)
            n += 1
            total += len(ids)
            supervised += sum(mask)
    return n, total, supervised


def tokenizer_floor(jsonl: str, tok_dir: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    strings = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            _, msgs = normalize_record(json.loads(line))
            s = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>" for m in msgs)
            strings.append(s)
    t = time.perf_counter()
    total = sum(len(tok.encode(s, add_special_tokens=False).ids) for s in strings)
    return len(strings), total, time.perf_counter() - t


MARKED_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + "
    "'<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def apply_chat_template_loop(jsonl: str, tok_dir: str, prefix: str):
    """transformers per conversation (see module docstring); (conversations, tokens, supervised)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    n = total = supervised = 0
    with SFTDatasetWriter(prefix) as writer, open(jsonl, encoding="utf-8") as f:
        for line in f:
            _, msgs = normalize_record(json.loads(line))
            out = hf.apply_chat_template([m.as_dict() for m in msgs], chat_template=MARKED_LLAMA3,
                                         return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = out["input_ids"], out["assistant_masks"]
            writer.add(ids, mask, [0])
            n += 1
            total += len(ids)
            supervised += sum(mask)
    return n, total, supervised


def jinja_rows(args, jsonl: str, tok_dir: str) -> list:
    sub = os.path.join(args.workdir, f"jinja_{args.jinja_num}.jsonl")
    with open(jsonl, encoding="utf-8") as src, open(sub, "w", encoding="utf-8") as dst:
        for i, line in zip(range(args.jinja_num), src):
            dst.write(line)
    import transformers  # noqa: F401  (import cost kept out of the timings)

    t = time.perf_counter()
    n, tokens, supervised = apply_chat_template_loop(sub, tok_dir, os.path.join(args.workdir, "hf_loop"))
    base = time.perf_counter() - t
    rows = [("apply_chat_template loop (transformers)", base, n, tokens, "ok")]
    for fast in (True, False):
        for w in args.workers:
            prefix = os.path.join(args.workdir, f"jinja_w{w}_{'fast' if fast else 'hf'}")
            t = time.perf_counter()
            s = preprocess(PreprocessConfig([sub], tok_dir, prefix, chat_template="jinja", workers=w,
                                            fast_tokenizer=fast, progress=False, plot=False))
            secs = time.perf_counter() - t
            same = s["tokens"] == tokens and s["supervised_tokens"] == supervised
            rows.append((f"preprocess jinja --workers {w} [{s['tokenizer']['kind']}]", secs,
                         s["conversations"]["read"], s["tokens"], "ok" if same else "MISMATCH"))
    return rows, base


def print_rows(rows, base):
    print(f"| {'method':48s} | {'seconds':>8s} | {'conv/s':>8s} | {'tokens/s':>10s} | {'vs baseline':>11s} | check |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 13}|-------|")
    for name, secs, nconv, ntok, check in rows:
        print(f"| {name:48s} | {secs:8.2f} | {nconv / secs:8.0f} | {ntok / secs:10.0f} | "
              f"{base / secs:10.2f}x | {check:5s} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=100_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megatron_pack_bench_preprocess"))
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--jinja-num", type=int, default=10_000, help="conversations for the Jinja rows (0: skip)")
    p.add_argument("--only-jinja", action="store_true", help="skip the built-in (llama3) rows")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    jsonl, tok_dir = make_data(args.workdir, args.num, args.seed, args.vocab)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost kept out of the timings)

    if args.jinja_num:
        jrows, jbase = jinja_rows(args, jsonl, tok_dir)
        print(f"\nJinja path, {args.jinja_num} conversations, {os.cpu_count()} CPUs visible\n")
        print_rows(jrows, jbase)
    if args.only_jinja:
        return
    rows = []
    t = time.perf_counter()
    n, tokens, supervised = baseline(jsonl, tok_dir, os.path.join(args.workdir, "baseline"))
    base = time.perf_counter() - t
    rows.append(("baseline (1 tokenizer call/conversation)", base, n, tokens, "ok"))
    if not args.skip_floor:
        fn, ftokens, fsecs = tokenizer_floor(jsonl, tok_dir)
        rows.append(("tokenizer floor (encode only, no mask/IO)", fsecs, fn, ftokens, "-"))
    outputs = []
    for fast in (True, False):
        for w in args.workers:
            prefix = os.path.join(args.workdir, f"w{w}_{'fast' if fast else 'hf'}")
            t = time.perf_counter()
            s = preprocess(
                PreprocessConfig(
                    [jsonl],
                    tok_dir,
                    prefix,
                    chat_template="llama3",
                    workers=w,
                    fast_tokenizer=fast,
                    progress=False,
                    plot=False,
                )
            )
            secs = time.perf_counter() - t
            same = s["tokens"] == tokens and s["supervised_tokens"] == supervised
            backend = s["tokenizer"]["kind"]
            rows.append(
                (
                    f"preprocess --workers {w} [{backend}]",
                    secs,
                    s["conversations"]["read"],
                    s["tokens"],
                    "ok" if same else "MISMATCH",
                )
            )
            with open(prefix + ".bin", "rb") as f:
                outputs.append(hash(f.read()))
    identical = len(set(outputs)) == 1

    print(f"\ntoken files identical across all preprocess runs: {identical}")
    print(f"{args.num} conversations, {tokens} tokens ({tokens / n:.0f}/conversation), {os.cpu_count()} CPUs visible\n")
    print_rows(rows, base)


if __name__ == "__main__":
    main()
