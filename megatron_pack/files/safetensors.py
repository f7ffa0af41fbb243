"""The safetensors format written straight from tensor memory, and giving freed heap back.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, doubling the
peak of whatever is being written; :func:`write_safetensors` does not.
"""

from __future__ import annotations

import json
from typing import Optional

import torch


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
            raise ValueError(f"{path}: cannot write {name} of dtype {t.dtype}")
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
