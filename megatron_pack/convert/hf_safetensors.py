"""HF safetensors directories: lazy reading one tensor (or row range) at a time, sharded writing.

Reading never loads a whole file: :class:`SafetensorsReader` opens each shard with
``safe_open`` per read. Writing buffers tensors up to ``max_shard_bytes`` and flushes a shard,
so peak memory is one shard plus what the caller holds. Only safetensors are read: no pickle
from user files.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_pack.checkpoint.iterations import CheckpointError as ConversionError
from megatron_pack.convert import mapping as M
from megatron_pack.files.safetensors import (
    SafetensorsHeaderError,
    read_safetensors_header,
    release_memory,
    write_safetensors,
)
from megatron_pack.model.presets import LlamaPreset

# safetensors header codes a weight may have (anything else -- I32, I8, U8, F8_*, ... -- is refused)
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class SafetensorsReader:
    """Tensors of a HF directory (``model.safetensors`` or an index + shards), one at a time.
    Every shard's header is checked (:func:`read_safetensors_header`) before the safetensors
    library opens it, so a damaged file is one line naming it, not a ``SafetensorError``."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = hf_dir
        self._headers: dict = {}  # file name -> {tensor: (dtype code, shape)}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            bad = next((f for f in self.weight_map.values()
                        if not isinstance(f, str) or os.path.basename(f) != f), None)
            if bad is not None:
                raise ConversionError(f"{index}: weight_map names {bad!r}, not a file in {hf_dir}")
        elif os.path.isfile(single):
            self.weight_map = {k: "model.safetensors" for k in self._header("model.safetensors")}
        else:
            bins = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (
                f" (found {bins}: pickle checkpoints are not read; convert them to safetensors first)" if bins else ""
            )
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")

    def _header(self, fname: str) -> dict:
        if fname not in self._headers:
            path = os.path.join(self.dir, fname)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: listed in the index but missing")
            try:
                self._headers[fname] = read_safetensors_header(path)
            except SafetensorsHeaderError as e:
                raise ConversionError(str(e)) from None
        return self._headers[fname]

    def _entry(self, name: str) -> tuple:
        """``(dtype code, shape)`` of ``name`` from its shard's checked header."""
        try:
            fname = self.weight_map[name]
        except KeyError:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing") from None
        header = self._header(fname)
        if name not in header:
            raise ConversionError(f"{os.path.join(self.dir, fname)}: holds no tensor {name!r} (the index says it does)")
        return header[name]

    def _open(self, name: str):
        # A fresh mapping per read: a handle kept open would keep every page it ever touched
        # in this process's resident set until the end (file-backed, but it is what RSS shows).
        self._entry(name)
        return self._safe_open(os.path.join(self.dir, self.weight_map[name]), framework="pt")

    def names(self) -> list:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` only (the rest of the tensor is never read)."""
        with self._open(name) as f:
            return f.get_slice(name)[start:end]

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[0]
        if code not in FLOAT_DTYPES:
            raise ConversionError(
                f"{os.path.join(self.dir, self.weight_map[name])}: tensor {name!r} is {code}; "
                f"weights must be one of {sorted(FLOAT_DTYPES)} (an integer or quantized tensor "
                "would be cast to nonsense values)"
            )
        return FLOAT_DTYPES[code]

    def check_layer_count(self, preset: LlamaPreset, config_path: str) -> None:
        """``num_hidden_layers`` against the layers the tensors hold, before anything is sized
        from it (a config claiming 10^9 layers over a 2-layer file once built 10^9 layers' names)."""
        held = {int(m.group(1)) for m in map(_LAYER_NAME.match, self.weight_map) if m}
        if len(held) != preset.num_layers:
            raise ConversionError(
                f"{config_path}: num_hidden_layers = {preset.num_layers}, but the safetensors in "
                f"{self.dir} hold {len(held)} layers" + (f" (model.layers.{min(held)} .. {max(held)})" if held else "")
            )

    def validate(self, preset: LlamaPreset, config_path: str = "config.json") -> None:
        """Every tensor the architecture needs is there with the shape the config implies
        (headers only: nothing is read), before any output is written."""
        self.check_layer_count(preset, config_path)
        shapes = M.hf_shapes(preset)
        expected = dict(shapes["top"])
        for i in range(preset.num_layers):
            for n, s in shapes["layer"].items():
                expected[M.hf_layer_key(i, n)] = s
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            raise ConversionError(
                f"{self.dir}: {len(missing)} tensors the config implies are missing, e.g. {missing[:3]}"
            )
        bad = [(n, self.shape(n), s) for n, s in expected.items() if self.shape(n) != s]
        if bad:
            n, got, want = bad[0]
            raise ConversionError(
                f"{self.dir}: {len(bad)} tensors disagree with config.json, e.g. {n} has shape "
                f"{list(got)}, the config implies {list(want)}"
            )
        for n in expected:  # integer / unknown dtypes refused before anything is written
            self.dtype(n)
        # a tied model saved with a redundant lm_head.weight: transformers ties it to the
        # embedding on load, and so does the conversion (the copy is not read)
        ignored = {M.HF_OUTPUT} if preset.tie_word_embeddings else set()
        extra = [
            n
            for n in self.weight_map
            if n not in expected and n not in ignored and not n.endswith("rotary_emb.inv_freq")
        ]
        if extra:
            raise ConversionError(
                f"{self.dir}: unexpected tensors for a {preset.family} model as config.json "
                f"describes it, e.g. {extra[:3]} (a different architecture?)"
            )

    def close(self) -> None:
        self._headers.clear()


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
            json.dump(
                {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))},
                f,
                indent=2,
            )
        return names
