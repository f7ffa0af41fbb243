"""Which special-token ids and generation config an HF export carries, and where each came from.

Two sources can say: the **checkpoint** (what the import recorded from the HF model it was made
from, or what a training run recorded from where it started, else the import it started from)
and the **tokenizer** (the tokenizer copied into the export: its bos/eos/pad tokens and the
``generation_config.json`` beside it). They disagree when a model was fine-tuned to stop on
another token than its tokenizer's default (Llama-3 Instruct stops on ``<|eot_id|>``, its
tokenizer's eos is ``<|end_of_text|>``). The preferred source wins key by key; the other fills
only what the preferred one leaves unset::

    prefer="checkpoint"  (default)   checkpoint  bos 1  eos 2  pad -   generation {eos: [2, 9]}
                                     tokenizer   bos 0  eos 4  pad 5   generation {eos: 4}
                                     export      bos 1  eos 2  pad 5   generation {eos: [2, 9]}

The export records the outcome in ``megatron_pack_export.json`` (:data:`PROVENANCE_NAME`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from megatron_pack.convert.hf_config import SPECIAL_TOKEN_KEYS, read_generation_config

SOURCES = ("checkpoint", "tokenizer")
PROVENANCE_NAME = "megatron_pack_export.json"
GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass
class Said:
    """What one source says: ids (None where it says nothing), generation config, and where."""

    ids: dict
    generation_config: Optional[dict] = None
    where: Optional[str] = None  # the file or directory it was read from


def checkpoint_said(special: dict, generation_config: Optional[dict], imports=()) -> Said:
    """The checkpoint's record (``special``: an import's HF config, or a run's recorded special
    tokens), gaps filled from the HF config recorded by the first readable import among ``imports``
    (the checkpoint a training run started from)."""
    from megatron_pack.checkpoint import imported as C

    ids = {k: special.get(k) for k in SPECIAL_TOKEN_KEYS}
    gen = generation_config
    for path in imports:
        if all(v is not None for v in ids.values()) and gen is not None:
            break
        try:
            meta = C.read_import_metadata(path) if path else None
        except Exception:  # a moved or rewritten import: not worth failing the export for
            meta = None
        if meta:
            for k in ids:
                ids[k] = meta.get("hf_config", {}).get(k) if ids[k] is None else ids[k]
            gen = meta.get("generation_config") if gen is None else gen
    return Said(ids, gen)


def tokenizer_said(paths) -> Said:
    """bos/eos/pad of the first tokenizer among ``paths`` that loads, and the generation config in
    the first of them that is a directory holding one."""
    from megatron_pack.tokenization.tokenizer import TokenizerError, load_tokenizer

    ids, gen, where = {k: None for k in SPECIAL_TOKEN_KEYS}, None, None
    for path in paths:
        if not path or not os.path.exists(path):
            continue
        if gen is None and os.path.isfile(os.path.join(path, GENERATION_CONFIG)):
            gen = read_generation_config(path)
        if where is None:
            try:
                tok = load_tokenizer(path, fast=False)
            except (TokenizerError, ValueError, OSError):
                continue  # a file the copy step still takes (e.g. a bare config); try the next source
            ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
            where = path
    return Said(ids, gen, where)


@dataclasses.dataclass
class ExportSpecials:
    """The ids for ``config.json``, the ``generation_config.json`` to write (None: none), and per
    item the source it came from (``checkpoint``, ``tokenizer`` or None where neither says)."""

    prefer: str
    ids: dict
    generation_config: Optional[dict]
    came_from: dict  # key (the id names and "generation_config") -> source or None
    overruled: dict  # key -> the other source's differing value, where it had one

    def provenance(self) -> dict:
        return {"special_tokens_from": self.prefer,
                "special_tokens": {k: {"value": self.ids[k], "from": self.came_from[k]} for k in self.ids},
                "generation_config_from": self.came_from["generation_config"],
                "overruled": self.overruled}

    def describe(self) -> str:
        """One line for the log."""
        ids = ", ".join(f"{k.removesuffix('_token_id')} {v}" for k, v in self.ids.items())
        srcs = sorted({self.came_from[k] for k in self.ids if self.came_from[k]})
        gen = self.came_from["generation_config"]
        text = (f"special tokens from the {' and '.join(srcs) or 'neither source (none recorded)'}: {ids}; "
                f"{GENERATION_CONFIG} {'from the ' + gen if gen else 'not written (neither source has one)'}")
        if self.overruled:
            other = SOURCES[1 - SOURCES.index(self.prefer)]
            shown = ", ".join(f"{k.removesuffix('_token_id')} {v}" if k != "generation_config" else GENERATION_CONFIG
                              for k, v in self.overruled.items())
            text += f" (the {other}'s differ: {shown}; --special-tokens-from {other} to use them)"
        return text


def resolve_export_specials(checkpoint: Said, tokenizer: Said, prefer: str = "checkpoint") -> ExportSpecials:
    """Key by key: the preferred source's value where it has one, else the other's."""
    if prefer not in SOURCES:
        raise ValueError(f"--special-tokens-from {prefer}: choose {' or '.join(SOURCES)}")
    other = SOURCES[1 - SOURCES.index(prefer)]
    first, second = (checkpoint, tokenizer) if prefer == "checkpoint" else (tokenizer, checkpoint)
    pairs = {k: (first.ids.get(k), second.ids.get(k)) for k in SPECIAL_TOKEN_KEYS}
    pairs["generation_config"] = (first.generation_config, second.generation_config)
    chosen, came_from, overruled = {}, {}, {}
    for k, (a, b) in pairs.items():
        chosen[k] = a if a is not None else b
        came_from[k] = prefer if a is not None else (other if b is not None else None)
        if a is not None and b is not None and a != b:
            overruled[k] = b
    gen = chosen.pop("generation_config")
    return ExportSpecials(prefer, chosen, gen, came_from, overruled)
