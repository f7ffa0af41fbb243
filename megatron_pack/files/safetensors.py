"""The safetensors format: its header checked before any reader trusts it, written straight from
tensor memory, and giving freed heap back.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, doubling the
peak of whatever is being written; :func:`write_safetensors` does not. The safetensors library
answers a damaged header (sizes of 10^12 bytes, overlapping or missing tensors, bytes no tensor
covers) with a ``SafetensorError`` traceback; :func:`read_safetensors_header` names the file and
the reason first.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header cannot be trusted, with the file and the reason."""


#: Bytes per element of each dtype code (safetensors 0.8); sub-byte codes (F4, F6_*) are not sized.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
#: The safetensors library's own bound on the JSON header.
MAX_HEADER_BYTES = 100_000_000


def _entry(path: str, name: str, info) -> tuple:
    """``(dtype code, shape, start, end)`` of one header entry, checked for types and size."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list) \
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
        and len(info["shape"]) <= 64
    ints = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in info["shape"] + info["data_offsets"])
    if not ints:
        raise SafetensorsHeaderError(f"{path}: tensor {name!r}: malformed header entry {str(info)[:120]}")
    code, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if end < start:
        raise SafetensorsHeaderError(f"{path}: tensor {name!r}: data_offsets [{start}, {end}] end before they start")
    need = math.prod(shape) * ITEM_BYTES.get(code, 0)
    if code in ITEM_BYTES and end - start != need:
        raise SafetensorsHeaderError(f"{path}: tensor {name!r}: {code} {list(shape)} needs {need:,} bytes, "
                                     f"data_offsets give {end - start:,}")
    return code, shape, start, end


def read_safetensors_header(path: str) -> dict:
    """``{tensor name: (dtype code, shape)}`` of a safetensors file, after checking that its header
    is what a reader may trust: a bounded JSON object whose tensors have consistent sizes, do not
    overlap and exactly cover the file's data. Reads the header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsHeaderError(f"{path}: not a safetensors file (header length {n} for a file of "
                                             f"{size:,} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsHeaderError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsHeaderError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: header is not a JSON object")
    entries = sorted((_entry(path, k, v) + (k,) for k, v in header.items() if k != "__metadata__"),
                     key=lambda e: (e[2], e[3]))
    data_bytes, pos = size - 8 - n, 0
    for code, shape, start, end, name in entries:
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else f"leaves bytes {pos}..{start} uncovered"
            raise SafetensorsHeaderError(f"{path}: tensor {name!r} (data_offsets [{start}, {end}]) {what}")
        if end > data_bytes:
            raise SafetensorsHeaderError(f"{path}: tensor {name!r} claims bytes up to {end:,}, the file holds "
                                         f"{data_bytes:,} (truncated or a forged header)")
        pos = end
    if pos != data_bytes:
        raise SafetensorsHeaderError(f"{path}: the tensors cover {pos:,} of the file's {data_bytes:,} data bytes "
                                     "(trailing bytes no tensor describes)")
    return {name: (code, shape) for code, shape, _, _, name in entries}


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
