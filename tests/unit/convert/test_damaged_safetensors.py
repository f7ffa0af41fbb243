"""Damaged safetensors headers (sizes of 10^12 bytes, overlapping tensors, a tensor the index
names but the file lacks, bytes no tensor covers): one line naming the file and the reason, exit 2,
nothing written -- at conversion and when training loads an import (the safetensors library's
own answer was a 13-line ``SafetensorError`` traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_convert_mapping import write_hf_dir

from megatron_pack.checkpoint.iterations import CheckpointError
from megatron_pack.files.safetensors import SafetensorsHeaderError, read_safetensors_header, write_safetensors

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_checkpoint.py")


def _rewrite(path, edit, tail=b""):
    """Rewrite the header of the safetensors file at ``path`` through ``edit(header dict)``."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    open(path, "wb").write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:] + tail)


def _first_two(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]


def _huge(h):
    k = _first_two(h)[0]
    h[k].update(shape=[10**6, 250_000], data_offsets=[h[k]["data_offsets"][0], 10**12])


def _overlap(h):
    a, b = _first_two(h)
    h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 4, h[b]["data_offsets"][1] - 4]


DAMAGE = {
    "claims 1e12 bytes": (_huge, b"", "claims bytes up to 1,000,000,000,000, the file holds"),
    "overlap": (_overlap, b"", "overlaps the tensor before it"),
    "trailing bytes": (lambda h: None, b"\0" * 16, "trailing bytes no tensor describes"),
    "index names a tensor the file lacks": (None, b"", "holds no tensor 'model.norm.weight' (the index says it does)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_header_is_one_line_at_conversion(tmp_path, case):
    edit, tail, reason = DAMAGE[case]
    hf = tmp_path / "hf"
    write_hf_dir(hf)
    st = hf / "model.safetensors"
    if edit is None:  # the index still names the tensor the (consistent) file no longer holds
        from safetensors.torch import load_file

        tensors = {k: v.clone() for k, v in load_file(str(st)).items()}  # not views of the file rewritten
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: st.name for k in tensors}}))
        del tensors["model.norm.weight"]
        write_safetensors(str(st), tensors)
    else:
        _rewrite(st, edit, tail)
    res = subprocess.run([sys.executable, TOOL, "hf-to-megatron", "--hf-dir", str(hf), "--output",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert str(st) in lines[0] and reason in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_header_reader_accepts_what_the_writer_writes_and_refuses_truncation(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(0),
               "c": torch.ones(4, dtype=torch.bfloat16)}
    write_safetensors(path, tensors, metadata={"format": "pt"})
    assert read_safetensors_header(path) == {"a": ("F32", (2, 3)), "b": ("F32", (0,)), "c": ("BF16", (4,))}
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(path)[k], v) for k, v in tensors.items())  # the library agrees
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1])
    with pytest.raises(SafetensorsHeaderError, match="claims bytes up to"):
        read_safetensors_header(path)
    open(path, "wb").write((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(SafetensorsHeaderError, match="not a safetensors file"):
        read_safetensors_header(path)


def test_damaged_import_file_is_one_line_at_load(tmp_path):
    """``--load`` of an import reads each rank's files through the same check."""
    from megatron_pack.checkpoint.imported import read_tensors

    path = tmp_path / "layer_000.safetensors"
    write_safetensors(str(path), {"w": torch.ones(4, 4), "v": torch.ones(4)})
    assert set(read_tensors(str(path))) == {"w", "v"}  # control
    _rewrite(path, _overlap)
    with pytest.raises(CheckpointError, match=f"{path}: tensor .* overlaps the tensor before it"):
        read_tensors(str(path))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_tensors(str(path))
