"""HF side of conversion: ``config.json`` <-> architecture, dtypes and sizes, tokenizer files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Optional

import torch

from megatron_pack.checkpoint.iterations import CheckpointError
from megatron_pack.model.architecture import ArchitectureError
from megatron_pack.model.hf_architecture import (  # noqa: F401
    HF_ARCHITECTURES,
    architecture_from_hf_config,
    hf_config_from_architecture,
    read_hf_config,
)
from megatron_pack.model.presets import LlamaPreset

# Bad conversion input; the message names the file and the reason. One error type for
# unusable checkpoints, whether found here or while loading one for training.
ConversionError = CheckpointError


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(DTYPES))}") from None


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot read size {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    exp = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** exp)


# ---- config ------------------------------------------------------------------------------------

def preset_from_hf_config(cfg: dict, path: str = "config.json") -> LlamaPreset:
    """Validate a HF ``config.json`` dict and return the architecture it describes (the
    supported families and what is refused: :mod:`megatron_pack.model.hf_architecture`)."""
    try:
        return architecture_from_hf_config(cfg, path)
    except ArchitectureError as e:
        raise ConversionError(str(e)) from None


def load_hf_config(hf_dir: str) -> tuple:
    """``(architecture, config dict)`` of the HF model directory ``hf_dir``."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: not found (--hf-dir must be a Hugging Face model directory)")
    try:
        cfg, path = read_hf_config(path)
    except ArchitectureError as e:
        raise ConversionError(str(e)) from None
    arch = preset_from_hf_config(cfg, path)
    name = os.path.basename(os.path.abspath(hf_dir))
    return (dataclasses.replace(arch, name=name) if name else arch), cfg


def hf_config_dict(preset: LlamaPreset, dtype: torch.dtype, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None) -> dict:
    """``config.json`` of the family's ``*ForCausalLM`` with ``preset``'s architecture."""
    return hf_config_from_architecture(preset, DTYPE_NAMES[dtype], {
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id})


#: What of a HF checkpoint's config travels with the weights to the export, besides the
#: architecture: the special token ids (generation stops at ``eos_token_id``).
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_tokens(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in SPECIAL_TOKEN_KEYS}


def read_generation_config(hf_dir: str) -> Optional[dict]:
    """``generation_config.json`` of a HF directory (None if absent): exported unchanged, so the
    fine-tuned model samples and stops like the original."""
    path = os.path.join(hf_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            gen = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(gen, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return gen


def copy_tokenizer(src: Optional[str], out_dir: str, skip=()) -> list:
    """Copy tokenizer files from a directory (known names except ``skip``) or a single file;
    returns their names."""
    if not src:
        return []
    if os.path.isfile(src):
        shutil.copy2(src, os.path.join(out_dir, os.path.basename(src)))
        return [os.path.basename(src)]
    if not os.path.isdir(src):
        raise ConversionError(f"--tokenizer {src}: no such file or directory")
    copied = [n for n in TOKENIZER_FILES if n not in skip and os.path.isfile(os.path.join(src, n))]
    if not copied:
        raise ConversionError(f"--tokenizer {src}: no tokenizer files there (looked for {', '.join(TOKENIZER_FILES)})")
    for n in copied:
        shutil.copy2(os.path.join(src, n), os.path.join(out_dir, n))
    return copied
