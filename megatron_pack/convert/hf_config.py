"""HF side of conversion: ``config.json`` <-> architecture, dtypes and sizes, tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from megatron_pack.checkpoint.layout import CheckpointError
from megatron_pack.model.presets import LlamaPreset


# Bad conversion input; the message names the file and the reason. One error type for
# unusable checkpoints, whether found here or while loading one for training.
ConversionError = CheckpointError


LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "rms_norm_eps")
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

def _rope_theta(cfg: dict, path: str) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = (params.get("rope_type") or params.get("type") or
                 (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default")
    if rope_type != "default":
        raise ConversionError(f"{path}: RoPE scaling {rope_type!r} is not supported (only plain RoPE, as in "
                              "Llama-2/Llama-3); the converted model would compute different positions")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def preset_from_hf_config(cfg: dict, path: str = "config.json") -> LlamaPreset:
    """Validate a HF ``config.json`` dict and return the Llama architecture it describes."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in (None, "llama") or (archs and not set(archs) & set(LLAMA_ARCHITECTURES)):
        raise ConversionError(f"{path}: model_type {cfg.get('model_type')!r}, architectures {archs}: only Llama-style "
                              f"models ({', '.join(LLAMA_ARCHITECTURES)}, model_type 'llama') are supported")
    if not archs and cfg.get("model_type") is None:
        raise ConversionError(f"{path}: neither 'architectures' nor 'model_type' says this is a Llama model")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ConversionError(f"{path}: missing required keys {missing}")
    for k in REQUIRED_KEYS[:5] + ("num_key_value_heads",):
        v = cfg.get(k, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConversionError(f"{path}: {k} must be a positive integer, got {v!r}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ConversionError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                              f"= {hidden // heads} (not supported)")
    if heads % kv:
        raise ConversionError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act {cfg['hidden_act']!r}; Llama uses 'silu' (SwiGLU)")
    for k in ("attention_bias", "mlp_bias"):
        if cfg.get(k):
            raise ConversionError(f"{path}: {k}=true is not supported (Llama has no linear biases)")
    return LlamaPreset(
        name="hf-llama", num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads, num_query_groups=kv,
        vocab_size=cfg["vocab_size"], rope_theta=_rope_theta(cfg, path),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), norm_eps=float(cfg["rms_norm_eps"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


def load_hf_config(hf_dir: str) -> tuple:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: not found (--hf-dir must be a Hugging Face model directory)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return preset_from_hf_config(cfg, path), cfg


def hf_config_dict(preset: LlamaPreset, dtype: torch.dtype, bos_token_id=None, eos_token_id=None) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with ``preset``'s architecture (readable by
    transformers 4.x via ``rope_theta``/``torch_dtype`` and 5.x via ``rope_parameters``/``dtype``)."""
    theta = int(preset.rope_theta) if float(preset.rope_theta).is_integer() else preset.rope_theta
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": preset.hidden_size, "intermediate_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads, "num_key_value_heads": preset.num_query_groups,
        "num_hidden_layers": preset.num_layers, "head_dim": preset.kv_channels,
        "rms_norm_eps": preset.norm_eps, "rope_theta": float(theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(theta)},
        "vocab_size": preset.vocab_size, "max_position_embeddings": preset.max_position_embeddings,
        "tie_word_embeddings": preset.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": preset.init_method_std,
        "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype],
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }


def copy_tokenizer(src: Optional[str], out_dir: str) -> list:
    """Copy tokenizer files from a directory (known names) or a single file; returns their names."""
    if not src:
        return []
    if os.path.isfile(src):
        shutil.copy2(src, os.path.join(out_dir, os.path.basename(src)))
        return [os.path.basename(src)]
    if not os.path.isdir(src):
        raise ConversionError(f"--tokenizer {src}: no such file or directory")
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not copied:
        raise ConversionError(f"--tokenizer {src}: no tokenizer files there (looked for {', '.join(TOKENIZER_FILES)})")
    for n in copied:
        shutil.copy2(os.path.join(src, n), os.path.join(out_dir, n))
    return copied
