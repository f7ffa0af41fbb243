"""Shared fixtures: tiny tokenizers built locally (no downloads)."""

import pytest

from megatron_pack.templates.builtin_templates import LLAMA3_CHAT_TEMPLATE
from megatron_pack.tokenization.tiny_tokenizers import (
    build_bpe_tokenizer,
    build_sentencepiece_model,
    build_wordlevel_tokenizer,
)

# Every word the chat tests use; anything else encodes to <unk>.
CHAT_WORDS = (
    "system user assistant ipython tool hi hello there how are you fine thanks bye what is two plus "
    "four six a bot be nice ok yes no weather sunny today call get lookup result [ ] INST / SYS < > "
    ": . , ! ? ' \" { } 0 1 2 3 4 5 6 7 8 9"
).split()

SP_TEXTS = [
    "[INST] <<SYS>>\nbe nice\n<</SYS>>\n\nhi [/INST] yes </s>",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?<>[]/|_:;'\"-{}",
]


@pytest.fixture(scope="session")
def wordlevel_dir(tmp_path_factory):
    """HF tokenizer dir, word-level, Llama-3 + ChatML specials, Llama-3 chat_template."""
    return build_wordlevel_tokenizer(str(tmp_path_factory.mktemp("wl")), CHAT_WORDS, LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def sp_char_model(tmp_path_factory):
    """SentencePiece char model: one piece per character, '▁' for spaces, <s>=1, </s>=2."""
    return build_sentencepiece_model(str(tmp_path_factory.mktemp("sp") / "char.model"), SP_TEXTS, model_type="char")


@pytest.fixture(scope="session")
def sp_bpe_model(tmp_path_factory):
    """SentencePiece BPE model trained on a few sentences (Llama-2 id layout)."""
    texts = SP_TEXTS + [f"hello there, how are you today? I am fine thanks {i}" for i in range(20)]
    return build_sentencepiece_model(str(tmp_path_factory.mktemp("spb") / "bpe.model"), texts, vocab_size=120)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """Byte-level BPE tokenizer dir (Llama-3 style) trained on a few sentences."""
    texts = [
        "hello there, how are you today? I am fine, thanks for asking.",
        "What is two plus four? Two plus four is six.",
        "The weather is sunny today; call the lookup tool to get the result.",
        "system user assistant ipython tool\n\n",
    ] * 5
    return build_bpe_tokenizer(str(tmp_path_factory.mktemp("bpe")), texts, vocab_size=400,
                               chat_template=LLAMA3_CHAT_TEMPLATE)
