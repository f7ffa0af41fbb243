"""HF Llama / Mistral / Qwen2 directory -> megatron_pack import checkpoint for one TP/PP layout, one layer at a time.

Peak memory is one HF layer plus its TP shards, or one TP block of the embedding/output
table (read as a row range, never the whole table): ``benchmarks/bench_convert.py``
measures it. Everything is validated (config keys, architecture, every tensor's shape
from the safetensors headers, TP/PP divisibility) before anything is written; output goes
to a temporary sibling directory that is renamed at the end, so a failure leaves nothing.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from megatron_pack.checkpoint import imported as C
from megatron_pack.checkpoint.iterations import MARKER, iter_dir
from megatron_pack.convert import mapping as M
from megatron_pack.convert.hf_config import (
    DTYPE_NAMES,
    ConversionError,
    copy_tokenizer,
    load_hf_config,
    parse_dtype,
    read_generation_config,
    special_tokens,
)
from megatron_pack.convert.hf_safetensors import SafetensorsReader
from megatron_pack.files.safetensors import release_memory
from megatron_pack.model.presets import padded_vocab_size


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)


def prepare_output(output: str) -> str:
    """A fresh temporary directory beside ``output`` (which must not already hold files)."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConversionError(f"--output {output}: already exists and is not empty; choose a new directory")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def finish_output(tmp: str, output: str) -> None:
    if os.path.isdir(output):
        os.rmdir(output)  # empty (checked by prepare_output)
    os.replace(tmp, output)


def _open_source(hf_dir: str, tp: int, pp: int) -> tuple:
    """``(architecture, config dict, reader)``: config, layout and every tensor header checked,
    nothing read or written yet."""
    preset, hf_cfg = load_hf_config(hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    try:
        M.check_tp(preset, tp)
        M.check_pp(preset, pp)
    except ValueError as e:
        raise ConversionError(f"{config_path}: {e}") from None
    reader = SafetensorsReader(hf_dir)
    reader.validate(preset, config_path)
    return preset, hf_cfg, reader


def _table_block(reader: SafetensorsReader, name: str, preset, padded: int, tp: int, r: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """TP rank r's rows of the padded vocabulary table: real rows, then zeros."""
    start, real_end, _ = M.vocab_rows(preset.vocab_size, padded, tp, r)
    block = torch.zeros(padded // tp, preset.hidden_size, dtype=dtype)
    step = max(1, (64 << 20) // (preset.hidden_size * 4))  # read <= 64 MB at a time
    for a in range(start, real_end, step):
        b = min(a + step, real_end)
        block[a - start: b - start].copy_(reader.get_rows(name, a, b))
    return block


def _write_layers(reader: SafetensorsReader, it: str, preset, tp: int, pp: int, dtype: torch.dtype,
                  progress: bool) -> None:
    """Each layer read, split into its TP shards, written to its stage and dropped."""
    per_stage = preset.num_layers // pp
    with _progress(preset.num_layers, "hf-to-megatron", progress) as bar:
        for i in range(preset.num_layers):
            hf = {n: reader.get(M.hf_layer_key(i, n)).to(dtype) for n in M.hf_layer_names(preset)}
            stage, local = divmod(i, per_stage)
            shards = M.hf_layer_to_megatron(hf, preset, tp)
            del hf  # drop each layer as soon as it is written: peak = one layer + its shards
            for r in range(tp):
                C.save_tensors(os.path.join(C.rank_dir(it, r, stage), C.layer_file(local)), shards[r])
                shards[r] = None
            del shards
            release_memory()
            bar.update(1)


def _write_weights(reader: SafetensorsReader, it: str, preset, tp: int, pp: int, padded: int, dtype: torch.dtype,
                   progress: bool) -> None:
    """Embedding rows on the first stage, the layers, final norm and output rows on the last."""
    for r in range(tp):
        for s in range(pp):
            os.makedirs(C.rank_dir(it, r, s))
    for r in range(tp):
        C.save_tensors(os.path.join(C.rank_dir(it, r, 0), "embedding.safetensors"),
                       {M.MEG_EMBEDDING: _table_block(reader, M.HF_EMBEDDING, preset, padded, tp, r, dtype)})
        release_memory()
    _write_layers(reader, it, preset, tp, pp, dtype, progress)
    norm = reader.get(M.HF_FINAL_NORM).to(dtype)
    out_name = M.HF_EMBEDDING if preset.tie_word_embeddings else M.HF_OUTPUT
    for r in range(tp):
        C.save_tensors(os.path.join(C.rank_dir(it, r, pp - 1), "head.safetensors"),
                       {M.MEG_FINAL_NORM: norm, M.MEG_OUTPUT: _table_block(reader, out_name, preset, padded, tp, r,
                                                                             dtype)})


def convert_hf_to_megatron(hf_dir: str, output: str, *, tensor_model_parallel_size: int = 1,
                           pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                           tokenizer: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                           progress: bool = True) -> dict:
    """Write ``output`` (the import format of :mod:`megatron_pack.checkpoint.imported`);
    returns its metadata. ``dtype``: ``auto``/None keeps the HF tensors' dtype."""
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    preset, hf_cfg, reader = _open_source(hf_dir, tp, pp)
    generation = read_generation_config(hf_dir)
    out_dtype = parse_dtype(dtype) or reader.dtype(M.HF_EMBEDDING)
    padded = padded_vocab_size(preset.vocab_size, tp, make_vocab_size_divisible_by)
    tmp = prepare_output(output)
    try:
        it = iter_dir(tmp, 0)
        _write_weights(reader, it, preset, tp, pp, padded, out_dtype, progress)
        meta = {
            "format": C.IMPORT_FORMAT, "version": C.IMPORT_VERSION,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "architecture": preset.to_dict(),
            "vocab_size": preset.vocab_size, "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "dtype": DTYPE_NAMES[out_dtype], "source": os.path.abspath(hf_dir),
            "hf_config": {**special_tokens(hf_cfg), "max_position_embeddings": hf_cfg.get("max_position_embeddings")},
            "generation_config": generation,
        }
        C.write_metadata(it, meta)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("0\n")
        if tokenizer:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            meta["tokenizer_files"] = copy_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
            C.write_metadata(it, meta)
        finish_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return meta
