"""Meta's tiktoken ``tokenizer.model`` (the ``original/`` folder of Llama-3 checkpoints).

Not SentencePiece: a text file, one ``<base64 token bytes> <rank>`` per line, read by Meta's
``llama/tokenizer.py`` with tiktoken, Llama-3's split regex and 256 special tokens appended
after the ranks (``<|begin_of_text|>`` = 128000 ... ``<|eot_id|>`` = 128009 for the 128,000-rank
Llama-3 file). Loaded the same way here, so its ids equal Meta's and the HF conversion's.
"""

from __future__ import annotations

import base64
import re
from typing import Optional

import numpy as np

from megatron_pack.tokenization.base import BaseTokenizer, TokenizerError

#: Llama-3's pre-tokenizer split (tiktoken's cl100k pattern), as in Meta's ``llama/tokenizer.py``.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]
_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")
CONVERT_HINT = ("load it as a Meta tiktoken file (needs `pip install tiktoken`), or convert it to a HF "
                "tokenizer.json with transformers' convert_llama_weights_to_hf.py (--llama_version 3.1), "
                "or point --tokenizer at the checkpoint's HF directory (tokenizer.json)")


def is_tiktoken_model(path: str) -> bool:
    """The first lines look like ``<base64> <rank>`` (SentencePiece models are protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).split(b"\n")[:-1][:8]
    except OSError:
        return False
    return bool(head) and all(_LINE.match(line) for line in head)


def llama3_special_tokens(num_ranks: int) -> dict:
    names = LLAMA3_SPECIAL_TOKENS + [f"<|reserved_special_token_{2 + i}|>"
                                     for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))]
    return {name: num_ranks + i for i, name in enumerate(names)}


class TiktokenModelTokenizer(BaseTokenizer):
    kind = "tiktoken-model"

    def __init__(self, path: str):
        super().__init__()
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(f"{path}: a Meta tiktoken BPE file (Llama-3 original/tokenizer.model); "
                                 f"{CONVERT_HINT}") from None
        self.path = path
        ranks = {}
        try:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, OSError) as exc:
            raise TokenizerError(f"{path}:{lineno}: not a valid tiktoken BPE line ({exc})") from None
        self._specials = llama3_special_tokens(len(ranks))
        try:
            self._enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self._specials)
        except Exception as exc:  # tiktoken raises ValueError/pyo3 errors on inconsistent ranks
            raise TokenizerError(f"{path}: tiktoken cannot build an encoding from this file ({exc})") from None
        self._names = {v: k for k, v in self._specials.items()}
        self.vocab_size = len(ranks) + len(self._specials)
        self.bos_id = self._specials["<|begin_of_text|>"]
        self.eos_id = self._specials["<|end_of_text|>"]
        self.pad_id = self._specials["<|finetune_right_pad_id|>"]
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.special_tokens = sorted(self._specials, key=len, reverse=True)
        self.template_tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        self._byte_len = np.array([len(self._enc.decode_single_token_bytes(i)) if i < len(ranks)
                                   else len(self._names[i].encode()) for i in range(self.vocab_size)], dtype=np.int64)

    def _encode_batch(self, texts):
        return [self._enc.encode_ordinary(t) for t in texts]

    def _encode_bytes(self, text):
        ids = self._enc.encode_ordinary(text)
        return ids, self._byte_len[ids].tolist() if ids else []

    def _piece_to_id(self, name: str) -> Optional[int]:
        if name in self._specials:
            return self._specials[name]
        try:
            return self._enc.encode_single_token(name.encode("utf-8"))
        except KeyError:
            return None

    def id_to_piece(self, token_id):
        token_id = int(token_id)
        if token_id in self._names:
            return self._names[token_id]
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
