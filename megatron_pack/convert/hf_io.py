"""HF checkpoint side: ``config.json`` validation, lazy safetensors reading, sharded writing.

Reading never loads a whole file: :class:`SafetensorsReader` opens each shard with
``safe_open`` and returns one tensor (or a row range of one) at a time. Writing buffers
tensors up to ``max_shard_bytes`` and flushes a shard, so peak memory is one shard plus
what the caller holds. Only safetensors are read: no pickle from user files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from megatron_pack.convert import mapping as M
from megatron_pack.model.presets import LlamaPreset


class ConversionError(ValueError):
    """Bad conversion input; the message names the file and the reason."""


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


def release_memory() -> None:
    """Hand freed heap pages back to the OS between layers (glibc keeps them otherwise, and
    the resident set of a long conversion creeps up by fragmentation); no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


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


# ---- reading -------------------------------------------------------------------------------------

class SafetensorsReader:
    """Tensors of a HF directory (``model.safetensors`` or an index + shards), one at a time."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            bins = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {bins}: pickle checkpoints are not read; convert them to safetensors first)" if bins else ""
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self._shapes: dict = {}  # name -> (shape, dtype code), read from the headers

    def _path(self, name: str) -> str:
        try:
            fname = self.weight_map[name]
        except KeyError:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing") from None
        path = os.path.join(self.dir, fname)
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: listed in the index but missing")
        return path

    def _open(self, name: str):
        # A fresh mapping per read: a handle kept open would keep every page it ever touched
        # in this process's resident set until the end (file-backed, but it is what RSS shows).
        return self._safe_open(self._path(name), framework="pt")

    def names(self) -> list:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple:
        if name not in self._shapes:
            with self._open(name) as f:
                for k in f.keys():
                    if self.weight_map.get(k) == self.weight_map[name]:
                        sl = f.get_slice(k)
                        self._shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._shapes[name][0]

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` only (the rest of the tensor is never read)."""
        with self._open(name) as f:
            return f.get_slice(name)[start:end]

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        code = self._shapes[name][1]
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)

    def validate(self, preset: LlamaPreset) -> None:
        """Every tensor the architecture needs is there with the shape the config implies
        (headers only: nothing is read), before any output is written."""
        shapes = M.hf_shapes(preset)
        expected = dict(shapes["top"])
        for i in range(preset.num_layers):
            for n, s in shapes["layer"].items():
                expected[M.hf_layer_key(i, n)] = s
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            raise ConversionError(f"{self.dir}: {len(missing)} tensors the config implies are missing, e.g. "
                                  f"{missing[:3]}")
        bad = [(n, self.shape(n), s) for n, s in expected.items() if self.shape(n) != s]
        if bad:
            n, got, want = bad[0]
            raise ConversionError(f"{self.dir}: {len(bad)} tensors disagree with config.json, e.g. {n} has shape "
                                  f"{list(got)}, the config implies {list(want)}")
        extra = [n for n in self.weight_map if n not in expected and not n.endswith("rotary_emb.inv_freq")]
        if extra:
            raise ConversionError(f"{self.dir}: unexpected tensors for a Llama model, e.g. {extra[:3]} "
                                  "(a different architecture?)")

    def close(self) -> None:
        self._shapes.clear()


# ---- writing -------------------------------------------------------------------------------------

_ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    """The safetensors format (JSON header, then raw little-endian bytes), each tensor written
    straight from its memory. ``safetensors.torch.save_file`` first turns every tensor into a
    ``bytes`` copy, doubling the peak of whatever is being written."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    items = []
    for name, t in tensors.items():
        if t.dtype not in _ST_CODES:
            raise ConversionError(f"{path}: cannot write {name} of dtype {t.dtype}")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append(t)
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in items:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

class ShardedSafetensorsWriter:
    """Writes HF's ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (or a
    single ``model.safetensors`` when everything fits one shard), at most ``max_shard_bytes``
    per shard (a single larger tensor gets a shard of its own)."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 10**9):
        if max_shard_bytes <= 0:
            raise ConversionError(f"max shard size must be > 0, got {max_shard_bytes}")
        self.out_dir, self.max = out_dir, max_shard_bytes
        self._buf: dict = {}
        self._buf_bytes = 0
        self._files: list = []  # [(temp name, [tensor names])]
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self.flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += nbytes
        self.total_size += nbytes

    def flush(self) -> None:
        if not self._buf:
            return
        tmp = f"shard-{len(self._files):05d}.tmp"
        write_safetensors(os.path.join(self.out_dir, tmp), self._buf, metadata={"format": "pt"})
        self._files.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0
        release_memory()

    def close(self) -> list:
        """Name the shards now that their count is known; returns the file names."""
        self.flush()
        n = len(self._files)
        if n == 1:
            os.replace(os.path.join(self.out_dir, self._files[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, tensors) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({t: final for t in tensors})
            names.append(final)
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return names


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
