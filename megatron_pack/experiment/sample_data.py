"""Data for a comparison without your own: the built-in sample or N synthetic conversations,
tokenized with the sample's tiny BPE tokenizer. Rebuilt only when missing."""

from __future__ import annotations

import os


def prepare_sample_data(workdir: str, synthetic: int | None = None, seed: int = 0) -> tuple[str, str]:
    """``(indexed dataset prefix, tokenizer dir)``: the built-in sample (480 chats), or
    ``synthetic`` generated conversations (seeded) when given."""
    from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_pack.preprocess.sample import generate_conversations, prepare_sample, write_jsonl

    jsonl, tok = prepare_sample(workdir)
    name = "sample"
    if synthetic:
        name = f"synthetic{synthetic}_s{seed}"
        jsonl = os.path.join(workdir, name + ".jsonl")
        if not os.path.isfile(jsonl):
            write_jsonl(jsonl, generate_conversations(synthetic, seed=seed))
    prefix = os.path.join(workdir, name)
    summary = prefix + "_summary.json"
    stamp = os.path.join(tok, "SAMPLE_SHA")
    from megatron_pack.files.indexed_check import preprocessing_finished

    if not (preprocessing_finished(prefix) and os.path.getmtime(summary) >= os.path.getmtime(stamp)):
        preprocess(PreprocessConfig(inputs=[jsonl], tokenizer=tok, output_prefix=prefix, progress=False, plot=False))
    return prefix, tok
