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
from megatron_pack.convert import mapping as M
from megatron_pack.checkpoint.layout import MARKER, iter_dir
from megatron_pack.convert.hf_config import (DTYPE_NAMES, ConversionError, copy_tokenizer, load_hf_config, parse_dtype,
                                            read_generation_config, special_tokens)
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


def convert_hf_to_megatron(hf_dir: str, output: str, *, tensor_model_parallel_size: int = 1,
                           pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                           tokenizer: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                           progress: bool = True) -> dict:
    """Write ``output`` (the import format of :mod:`megatron_pack.checkpoint.imported`);
    returns its metadata. ``dtype``: ``auto``/None keeps the HF tensors' dtype."""
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    preset, hf_cfg = load_hf_config(hf_dir)
    try:
        M.check_tp(preset, tp)
        M.check_pp(preset, pp)
    except ValueError as e:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: {e}") from None
    reader = SafetensorsReader(hf_dir)
    reader.validate(preset)
    generation = read_generation_config(hf_dir)
    out_dtype = parse_dtype(dtype) or reader.dtype(M.HF_EMBEDDING)
    vocab = preset.vocab_size
    padded = padded_vocab_size(vocab, tp, make_vocab_size_divisible_by)
    per_stage = preset.num_layers // pp

    tmp = prepare_output(output)
    try:
        it = iter_dir(tmp, 0)
        for r in range(tp):
            for s in range(pp):
                os.makedirs(C.rank_dir(it, r, s))

        def table_block(name: str, r: int) -> torch.Tensor:
            """TP rank r's rows of the padded table: real rows, then zeros."""
            start, real_end, _ = M.vocab_rows(vocab, padded, tp, r)
            block = torch.zeros(padded // tp, preset.hidden_size, dtype=out_dtype)
            step = max(1, (64 << 20) // (preset.hidden_size * 4))  # read <= 64 MB at a time
            for a in range(start, real_end, step):
                b = min(a + step, real_end)
                block[a - start: b - start].copy_(reader.get_rows(name, a, b))
            return block

        for r in range(tp):
            C.save_tensors(os.path.join(C.rank_dir(it, r, 0), "embedding.safetensors"),
                           {M.MEG_EMBEDDING: table_block(M.HF_EMBEDDING, r)})
            release_memory()
        with _progress(preset.num_layers, "hf-to-megatron", progress) as bar:
            for i in range(preset.num_layers):
                hf = {n: reader.get(M.hf_layer_key(i, n)).to(out_dtype) for n in M.hf_layer_names(preset)}
                stage, local = divmod(i, per_stage)
                shards = M.hf_layer_to_megatron(hf, preset, tp)
                del hf  # drop each layer as soon as it is written: peak = one layer + its shards
                for r in range(tp):
                    C.save_tensors(os.path.join(C.rank_dir(it, r, stage), C.layer_file(local)), shards[r])
                    shards[r] = None
                del shards
                release_memory()
                bar.update(1)
        norm = reader.get(M.HF_FINAL_NORM).to(out_dtype)
        out_name = M.HF_EMBEDDING if preset.tie_word_embeddings else M.HF_OUTPUT
        for r in range(tp):
            C.save_tensors(os.path.join(C.rank_dir(it, r, pp - 1), "head.safetensors"),
                           {M.MEG_FINAL_NORM: norm, M.MEG_OUTPUT: table_block(out_name, r)})
        meta = {
            "format": C.IMPORT_FORMAT, "version": C.IMPORT_VERSION,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "architecture": preset.to_dict(),
            "vocab_size": vocab, "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "dtype": DTYPE_NAMES[out_dtype], "source": os.path.abspath(hf_dir),
            "hf_config": {**special_tokens(hf_cfg), "max_position_embeddings": hf_cfg.get("max_position_embeddings")},
            "generation_config": generation,
        }
        C.write_metadata(it, meta)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("0\n")
        tok = tokenizer
        if tok:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            meta["tokenizer_files"] = copy_tokenizer(tok, os.path.join(tmp, "tokenizer"))
            C.write_metadata(it, meta)
        finish_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return meta
