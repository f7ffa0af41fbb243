"""What every tokenizer offers the templates: plain-text ids (never BOS/EOS, never a special
token made from text), special tokens by name, bos/eos/pad ids, and whole chats with character
offsets (:mod:`megatron_pack.tokenization.offsets`). The backends live in ``tokenizer`` (HF
``tokenizer.json``, SentencePiece) and ``tiktoken_model`` (Meta's Llama-3 file).
"""

from __future__ import annotations

from typing import Optional, Sequence

BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>")


class TokenizerError(ValueError):
    """Path missing, not a tokenizer, or a special token the template needs is absent."""


def token_name(value) -> Optional[str]:
    """tokenizer_config.json stores tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class BaseTokenizer:
    """Shared behaviour; subclasses fill ``_encode_batch``, ``_piece_to_id`` and friends."""

    path: str
    kind: str
    vocab_size: int
    chat_template: Optional[str] = None
    threads: Optional[int] = None
    """Threads for one batch call (SentencePiece); HF tokenizers use RAYON_NUM_THREADS."""

    def __init__(self):
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- subclass hooks ------------------------------------------------------------
    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def _piece_to_id(self, name: str) -> Optional[int]:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    # -- public ----------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; no BOS/EOS; special-token strings stay plain text.

        Repeated texts (system prompts, stock replies) are encoded once per call.
        """
        if not texts:
            return []
        unique = dict.fromkeys(texts)
        if len(unique) == len(texts):
            return self._encode_batch(list(texts))
        for text, ids in zip(unique, self._encode_batch(list(unique))):
            unique[text] = ids
        return [unique[t] for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_cached(self, text: str) -> tuple[int, ...]:
        """For template constants (role names, newlines): encoded once per process."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = tuple(self.encode(text))
        return ids

    def has_token(self, name: str) -> bool:
        return self._piece_to_id(name) is not None

    def token_id(self, name: str) -> int:
        tid = self._piece_to_id(name)
        if tid is None:
            raise TokenizerError(f"{self.path}: tokenizer has no token {name!r}")
        return tid

    def _first_present(self, names) -> Optional[int]:
        for name in names:
            tid = self._piece_to_id(name)
            if tid is not None:
                return tid
        return None

    # -- the Jinja path: whole chats, the way transformers tokenizes them -----------------
    template_tokens: dict = {}
    """bos_token/eos_token/... as transformers passes them to a chat template."""

    def added_tokens(self) -> list:
        """(content, is_special) of every added/control token."""
        return [(t, True) for t in self.special_tokens]

    def encode_chats(self, texts, protects, added_re, control_re) -> list:
        """Per text: (ids, char starts, char ends). Added tokens in the text become their ids
        except inside the ``protects`` ranges (message text kept as text)."""
        from megatron_pack.tokenization.offsets import split_encode

        return [split_encode(self, t, p, added_re) for t, p in zip(texts, protects)]

    def _encode_bytes(self, text):
        """(ids, byte length of each token) of plain text (no added tokens)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
