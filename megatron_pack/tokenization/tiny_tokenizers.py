"""Small tokenizers built locally (no downloads) for tests, the demo and benchmarks.

- :func:`build_wordlevel_tokenizer`: a word-level ``tokenizer.json`` with a fixed vocab, so
  tests can write expected token sequences by hand;
- :func:`build_bpe_tokenizer`: a byte-level BPE trained on given texts (Llama-3 style),
  saved as a HF tokenizer directory with ``tokenizer_config.json`` (and the ``chat_template`` given,
  e.g. ``templates.builtin_templates.LLAMA3_CHAT_TEMPLATE``);
- :func:`build_sentencepiece_model`: a SentencePiece ``.model`` (Llama-2 / Mistral style,
  ``<unk>``=0, ``<s>``=1, ``</s>``=2) trained on a few lines.

All three carry Llama-3 and ChatML special tokens where the format allows.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable, Optional, Sequence

from megatron_pack.tokenization.tiktoken_model import LLAMA3_PATTERN

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
SPECIALS = LLAMA3_SPECIALS + CHATML_SPECIALS

# Llama-3's pre-tokenizer split: "\n\n" before a word is its own piece, so encoding template text
# and message text separately gives the same ids as encoding the whole rendered string.
LLAMA3_SPLIT = LLAMA3_PATTERN

# Whitespace is kept as tokens (runs of newlines, single spaces) so text round-trips.
WORD_SPLIT = r"\n+| |\w+|[^\w\s]"


def _write_config(out_dir: str, chat_template: Optional[str], extra: Optional[dict] = None):
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    config.update(extra or {})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def build_wordlevel_tokenizer(out_dir: str, words: Iterable[str], chat_template: Optional[str] = None) -> str:
    """Word-level tokenizer directory. Ids: specials 0..7, ``<unk>`` 8, " " 9, "\\n" 10,
    "\\n\\n" 11, then ``words`` in the order given (duplicates ignored)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {}
    for tok in SPECIALS + ["<unk>", " ", "\n", "\n\n"] + list(words):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_config(out_dir, chat_template)
    return out_dir


def build_bpe_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 3000,
                        chat_template: Optional[str] = None) -> str:
    """Byte-level BPE with Llama-3's pre-tokenizer, trained on ``texts``.

    Training is deterministic for the same texts and vocab size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    # ignore_merges: a pre-token that is itself in the vocab is one token (as in Llama-3).
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_config(out_dir, chat_template)
    return out_dir


def build_sentencepiece_model(path: str, texts: Sequence[str], vocab_size: int = 200,
                              model_type: str = "bpe") -> str:
    """SentencePiece model at ``path`` (Llama-2 id layout). ``model_type="char"`` gives one
    piece per character, handy for hand-checked tests."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
