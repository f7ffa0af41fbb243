"""One small tokenizer interface over HF ``tokenizer.json`` and SentencePiece ``.model``.

Templates need only: encode plain texts (never adding BOS/EOS, never turning text that
looks like a special token into that token), look special tokens up by name, and the
bos/eos/pad ids. Accepted paths:

- ``tokenizer.json`` (HF ``tokenizers``), or a directory holding one, optionally with
  ``tokenizer_config.json`` (bos/eos/pad names, ``chat_template``) and ``chat_template.jinja``;
- a SentencePiece ``.model`` file (Llama-2 / Mistral), or a directory with ``tokenizer.model``;
- Meta's tiktoken ``tokenizer.model`` (Llama-3 ``original/``), see ``tokenization.tiktoken_model``.
"""


from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from megatron_pack.tokenization.base import (
    BOS_CANDIDATES,
    EOS_CANDIDATES,
    PAD_CANDIDATES,
    BaseTokenizer,
    TokenizerError,
    token_name,
)

# GPT-2's pre-tokenizer regex (what ByteLevel(use_regex=True) applies).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Probe texts checked on both backends before the tiktoken one is trusted.
_PROBE = ("Hello, world! It's 2024-07-26.\n\n  def f(x):\n\treturn x**2  # ok",
          "Ünïcödé façade — naïve café 東京 😀 <|eot_id|> [INST] </s>", "   leading and trailing   \n\n\n")


def _byte_decoder() -> dict:
    """GPT-2 byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _split_pattern(pre) -> Optional[str]:
    """The regex of a Llama-3 style (Split + ByteLevel without regex) or GPT-2 style
    (ByteLevel with regex) pre-tokenizer; None for anything else."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    ok = (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
          and "Regex" in (split.get("pattern") or {}) and byte_level.get("type") == "ByteLevel"
          and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"))
    return split["pattern"]["Regex"] if ok else None


def tiktoken_backend(json_path: str, hf_tokenizer):
    """A tiktoken encoder giving the same ids as ``hf_tokenizer``, or None.

    tiktoken runs the same byte-level BPE several times faster than ``tokenizers`` (its
    regex engine dominates Llama-3 tokenization). Used only for byte-level BPE with
    ``ignore_merges`` (tiktoken's whole-word-first rule, as in Llama-3's tokenizer.json),
    no normalizer, and a pre-tokenizer we can express as one regex; and only if both
    backends agree on probe texts.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    with open(json_path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not model.get("ignore_merges") or spec.get("normalizer") or not pattern:
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    decoder = _byte_decoder()
    try:
        ranks = {bytes(decoder[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in added}
        enc = tiktoken.Encoding("megatron_pack", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError):
        return None
    for text in _PROBE:
        if enc.encode_ordinary(text) != hf_tokenizer.encode(text, add_special_tokens=False).ids:
            return None
    return enc


class HFTokenizer(BaseTokenizer):
    kind = "hf"

    def __init__(self, json_path: str, config: Optional[dict] = None, chat_template: Optional[str] = None,
                 fast: bool = True):
        super().__init__()
        from tokenizers import Tokenizer

        self.path = json_path
        try:
            self._tok = Tokenizer.from_file(json_path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{json_path}: not a HF tokenizer.json ({exc})") from None
        # Text that merely looks like "<|eot_id|>" must not become the control token:
        # only templates emit special tokens.
        self._tok.encode_special_tokens = True
        self._tiktoken = tiktoken_backend(json_path, self._tok) if fast else None
        if self._tiktoken is not None:
            self.kind = "hf+tiktoken"
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = config or {}
        self.chat_template = chat_template
        self.bos_id = self._configured(config, "bos_token", BOS_CANDIDATES)
        self.eos_id = self._configured(config, "eos_token", EOS_CANDIDATES)
        self.pad_id = self._configured(config, "pad_token", PAD_CANDIDATES)
        self.bos_token = self.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self.special_tokens = sorted(
            (t.content for t in self._tok.get_added_tokens_decoder().values() if t.special), key=len, reverse=True
        )
        self.template_tokens = {k: n for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                               "cls_token", "mask_token")
                                if (n := token_name(config.get(k))) is not None}
        self._hf = None
        self._byte_len = self._tiktoken_added = None

    def added_tokens(self):
        return [(t.content, t.special) for t in self._tok.get_added_tokens_decoder().values()]

    def added_token_ids(self) -> dict:
        """``{content: id}`` of every added token, special or not."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    @property
    def tiktoken(self):
        """The tiktoken Encoding that encodes plain text, or None when ``tokenizers`` does."""
        return self._tiktoken

    def chat_backend(self):
        """A ``tokenizers.Tokenizer`` that matches added tokens in text, as transformers encodes
        a rendered chat (this tokenizer's own does not: only templates emit special tokens);
        built on first use."""
        if self._hf is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(self._tok.to_str())
            self._hf.encode_special_tokens = False
        return self._hf

    def tiktoken_tables(self) -> tuple:
        """``(byte length of every id, a tiktoken Encoding that knows the added tokens)``, built
        on first use (:func:`megatron_pack.tokenization.offsets.tiktoken_tables`)."""
        if self._byte_len is None:
            from megatron_pack.tokenization.offsets import tiktoken_tables

            self._byte_len, self._tiktoken_added = tiktoken_tables(self._tiktoken, self.added_token_ids(),
                                                                   self.vocab_size)
        return self._byte_len, self._tiktoken_added

    def encode_chats(self, texts, protects, added_re, control_re):
        from megatron_pack.tokenization.offsets import hf_encode_chats

        return hf_encode_chats(self, texts, protects, added_re)

    def _encode_bytes(self, text):
        byte_len, _ = self.tiktoken_tables()
        ids = self._tiktoken.encode_ordinary(text)
        return ids, byte_len[ids].tolist() if ids else []

    def _configured(self, config, key, candidates) -> Optional[int]:
        name = token_name(config.get(key))
        if name is not None and name in self._vocab:
            return self._vocab[name]
        return self._first_present(candidates)

    def _encode_batch(self, texts):
        if self._tiktoken is not None:
            # A plain loop: tiktoken's threaded batch call measured slower here than this;
            # parallelism comes from the worker processes.
            return [self._tiktoken.encode_ordinary(t) for t in texts]
        # encode_batch_fast skips offset tracking; rayon parallelises over the batch.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _piece_to_id(self, name):
        return self._vocab.get(name)

    def id_to_piece(self, token_id):
        return self._tok.id_to_token(int(token_id))


class SentencePieceTokenizer(BaseTokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: str):
        super().__init__()
        import sentencepiece as spm

        self.path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except Exception as exc:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({exc})") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.bos_token = self.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self.special_tokens = sorted(
            (self._sp.IdToPiece(i) for i in range(self.vocab_size) if self._sp.IsControl(i)), key=len, reverse=True
        )
        unk = self._sp.IdToPiece(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None
        # transformers' LlamaTokenizer defaults for a bare .model
        self.template_tokens = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                  ("unk_token", unk)) if v}

    def _encode_bytes(self, text):
        ids = self._sp.Encode(text, add_bos=False, add_eos=False)
        lens = np.array([1 if self._sp.IsByte(i) else len(self._sp.IdToPiece(i).replace("\u2581", " ").encode())
                         for i in ids], dtype=np.int64)
        excess = int(lens.sum()) - len(text.encode("utf-8")) if len(lens) else 0
        if excess > 0:  # the dummy-prefix "▁" stands for no input character
            lens[0] = max(0, lens[0] - excess)
        return ids, lens.tolist()

    def _encode_batch(self, texts):
        # Control pieces (<s>, </s>) are never produced from text by SentencePiece.
        return self._sp.Encode(texts, add_bos=False, add_eos=False, num_threads=self.threads or -1)

    def _piece_to_id(self, name):
        tid = self._sp.PieceToId(name)
        # PieceToId returns unk for unknown pieces; only accept the unk piece itself.
        if tid == self._sp.unk_id() and name != self._sp.IdToPiece(tid):
            return None
        return tid

    def id_to_piece(self, token_id):
        return self._sp.IdToPiece(int(token_id))


def _read_chat_template(directory: str, config: dict) -> Optional[str]:
    """The directory's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or transformers' list of named templates: the ``default`` one).
    A template of any other type is refused: ignoring it would guess another template."""
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        try:
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{jinja_file}: unreadable chat template ({exc})") from None
    template = config.get("chat_template")
    where = f"{os.path.join(directory, 'tokenizer_config.json')}: chat_template"
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        if not template or not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise TokenizerError(f"{where}: a list must hold {{\"name\": ..., \"template\": \"...\"}} objects with "
                                 f"string templates, found {json.dumps(template)[:120]}")
        named = {t.get("name"): t["template"] for t in template}
        return named.get("default") or next(iter(named.values()))
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{where} = {json.dumps(template)[:120]}: not a string (a Jinja template, or a list of "
                             "named ones); refusing to guess a template instead")
    return template


#: Megatron-LM ``--tokenizer-type`` -> the file a path of that kind holds.
TOKENIZER_TYPE_FILES = {"HuggingFaceTokenizer": ("tokenizer.json", ".json"),
                        "SentencePieceTokenizer": ("tokenizer.model", ".model")}


def tokenizer_path_for_type(path: str, tokenizer_type: Optional[str]) -> str:
    """The file ``--tokenizer-type`` selects at ``path`` (a directory may hold both kinds);
    TokenizerError when ``path`` holds no tokenizer of that kind. Reads nothing but names."""
    if tokenizer_type is None:
        return path
    if tokenizer_type not in TOKENIZER_TYPE_FILES:
        raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose from {sorted(TOKENIZER_TYPE_FILES)}")
    name, suffix = TOKENIZER_TYPE_FILES[tokenizer_type]
    if os.path.isdir(path):
        found = os.path.join(path, name)
        if os.path.isfile(found):
            return found
        raise TokenizerError(f"{path}: --tokenizer-type {tokenizer_type} needs {name} in this directory")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer path does not exist")
    if not path.endswith(suffix):
        raise TokenizerError(f"{path}: --tokenizer-type {tokenizer_type} expects a {suffix} file or a directory "
                             f"with {name}")
    return path


def _model_file(path: str) -> BaseTokenizer:
    """A ``.model`` file: SentencePiece, or Meta's tiktoken BPE (Llama-3 ``original/``)."""
    from megatron_pack.tokenization.tiktoken_model import TiktokenModelTokenizer, is_tiktoken_model

    if is_tiktoken_model(path):
        return TiktokenModelTokenizer(path)
    return SentencePieceTokenizer(path)


def load_tokenizer(path: str, fast: bool = True) -> BaseTokenizer:
    """Tokenizer at ``path`` (file or directory); TokenizerError says what is wrong.

    ``fast``: encode HF byte-level BPE with tiktoken when installed and id-identical.
    """
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer path does not exist")
    if os.path.isdir(path):
        config_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{config_path}: unreadable tokenizer config ({exc})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
        json_path = os.path.join(path, "tokenizer.json")
        if os.path.isfile(json_path):
            return HFTokenizer(json_path, config, _read_chat_template(path, config), fast=fast)
        sp_path = os.path.join(path, "tokenizer.model")
        if os.path.isfile(sp_path):
            tok = _model_file(sp_path)
            tok.chat_template = _read_chat_template(path, config)
            return tok
        raise TokenizerError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
    if path.endswith(".json"):
        return HFTokenizer(path, fast=fast)
    if path.endswith(".model"):
        return _model_file(path)
    raise TokenizerError(
        f"{path}: not a tokenizer (expected tokenizer.json, a SentencePiece .model, or a directory with one)"
    )
