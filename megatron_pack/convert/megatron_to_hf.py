"""Megatron checkpoint (a training dist checkpoint at any TP/PP, or an import) -> HF directory
(Llama, Mistral or Qwen2, as the recorded architecture says).

Streams layer by layer into :class:`~megatron_pack.convert.hf_safetensors.ShardedSafetensorsWriter`:
peak memory is one layer (all its TP shards merged) plus the shard being filled. Writes
``config.json``, safetensors (sharded with ``model.safetensors.index.json`` above
``max_shard_size``), the tokenizer files, ``generation_config.json`` and
``megatron_pack_export.json`` (where the special-token ids and the generation config came from),
into a temporary directory renamed at the end.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from megatron_pack.checkpoint import imported as C
from megatron_pack.checkpoint.dist import saved_run_config
from megatron_pack.checkpoint.dist_reader import DistCheckpointReader
from megatron_pack.checkpoint.iterations import resolve_iteration_dir
from megatron_pack.convert import mapping as M
from megatron_pack.convert.export_specials import (
    GENERATION_CONFIG,
    PROVENANCE_NAME,
    SOURCES,
    checkpoint_said,
    resolve_export_specials,
    tokenizer_said,
)
from megatron_pack.convert.hf_config import (
    DTYPES,
    ConversionError,
    copy_tokenizer,
    hf_config_dict,
    parse_dtype,
    parse_size,
)
from megatron_pack.convert.hf_safetensors import ShardedSafetensorsWriter
from megatron_pack.convert.hf_to_megatron import _progress, finish_output, prepare_output
from megatron_pack.files.atomic import write_json_atomic
from megatron_pack.files.safetensors import release_memory
from megatron_pack.model.presets import LlamaPreset, get_preset


class ImportSource:
    """An ``hf-to-megatron`` output: merge each layer's TP shards from its stage's directories."""

    def __init__(self, meta: dict):
        self.meta, self.dir = meta, meta["_dir"]
        self.preset = C.preset_from_metadata(meta)
        self.tp, self.pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
        self.dtype = DTYPES[meta["dtype"]]
        root = os.path.dirname(self.dir)
        self.tokenizer_dir = os.path.join(root, "tokenizer") if os.path.isdir(os.path.join(root, "tokenizer")) else None
        self.special = meta.get("hf_config", {})
        self.generation_config = meta.get("generation_config")

    def _rank(self, r, s, name):
        return C.read_tensors(os.path.join(C.rank_dir(self.dir, r, s), name))

    def layer(self, i: int) -> dict:
        stage, local = divmod(i, self.preset.num_layers // self.pp)
        return M.megatron_layer_to_hf([self._rank(r, stage, C.layer_file(local)) for r in range(self.tp)],
                                      self.preset)

    def embedding(self) -> torch.Tensor:
        return torch.cat([self._rank(r, 0, "embedding.safetensors")[M.MEG_EMBEDDING] for r in range(self.tp)])

    def final_norm(self) -> torch.Tensor:
        return self._rank(0, self.pp - 1, "head.safetensors")[M.MEG_FINAL_NORM]

    def output(self) -> Optional[torch.Tensor]:
        return torch.cat([self._rank(r, self.pp - 1, "head.safetensors")[M.MEG_OUTPUT] for r in range(self.tp)])


def training_vocab_size(run_config: dict, preset: LlamaPreset) -> Optional[int]:
    """The vocabulary the run trained with, as the training loop resolved it (when recorded)."""
    model = run_config.get("model", {})
    if model.get("vocab_size"):
        return int(model["vocab_size"])
    if model.get("tokenizer_model"):
        from megatron_pack.tokenization.tokenizer import load_tokenizer

        return int(load_tokenizer(model["tokenizer_model"]).vocab_size)
    return preset.vocab_size


class DistSource:
    """A training checkpoint (``megatron.core.dist_checkpointing``, torch_dist), any TP/PP."""

    def __init__(self, iter_path: str, vocab_size: Optional[int] = None, model: Optional[str] = None):
        self.reader = DistCheckpointReader(iter_path)
        rc = saved_run_config(iter_path) or {}
        if model:
            try:
                preset = get_preset(model)
            except ValueError as e:
                raise ConversionError(f"--model: {e}") from None
            name = preset.name
        elif rc.get("architecture"):  # recorded by every run since architectures are data
            preset = C.preset_from_metadata(rc)
            name = preset.name
        else:
            name = rc.get("model", {}).get("model")
            if not name:
                raise ConversionError(f"{iter_path}: no run_config.json recording the architecture; pass --model")
            preset = get_preset(name)
        vocab = vocab_size or training_vocab_size(rc, preset)
        if not vocab:
            raise ConversionError(f"{iter_path}: the run's vocabulary size is not recorded; pass --vocab-size")
        self.preset = preset.with_vocab(vocab)
        emb = self.reader.shape(M.MEG_EMBEDDING)
        self.dtype = self.reader.dtype(M.MEG_EMBEDDING)
        if emb[0] < vocab or emb[1] != preset.hidden_size:
            raise ConversionError(f"{iter_path}: embedding {list(emb)} does not fit architecture {name} "
                                  f"with vocabulary {vocab}")
        if self.reader.num_layers != preset.num_layers:
            raise ConversionError(f"{iter_path}: {self.reader.num_layers} layers, architecture {name} has "
                                  f"{preset.num_layers}")
        if self.reader.has(self.reader.LAYER_PREFIX + M.MEG_QKV_BIAS) != preset.qkv_bias:
            raise ConversionError(f"{iter_path}: q/k/v biases {'present' if not preset.qkv_bias else 'absent'} "
                                  f"but architecture {name} has qkv_bias={preset.qkv_bias}")
        self.tokenizer_dir = None
        hf = rc.get("hf") or {}
        self.special = hf.get("special_tokens") or {}
        self.generation_config = hf.get("generation_config")
        model_rc, ckpt_rc = rc.get("model", {}), rc.get("checkpoint", {})
        # where bos/eos can come from when the run recorded none: its tokenizer, else the import it started from
        self.tokenizer_model = model_rc.get("tokenizer_model")
        self.started_from = [ckpt_rc.get(k) for k in ("load", "pretrained_checkpoint") if ckpt_rc.get(k)]

    def layer(self, i: int) -> dict:
        return M.megatron_layer_to_hf([self.reader.layer(i)], self.preset)

    def embedding(self) -> torch.Tensor:
        return self.reader.tensor(M.MEG_EMBEDDING)

    def final_norm(self) -> torch.Tensor:
        return self.reader.tensor(M.MEG_FINAL_NORM)

    def output(self) -> Optional[torch.Tensor]:
        return self.reader.tensor(M.MEG_OUTPUT) if self.reader.has(M.MEG_OUTPUT) else None


def convert_megatron_to_hf(load: str, output: str, *, dtype: Optional[str] = None, max_shard_size="5GB",
                           tokenizer: Optional[str] = None, vocab_size: Optional[int] = None,
                           model: Optional[str] = None, progress: bool = True,
                           special_tokens_from: str = "checkpoint") -> dict:
    """Export ``load`` (checkpoint root or ``iter_*`` directory) to ``output``; returns
    ``{"files", "config", "source", "specials"}``. ``dtype`` None/``auto`` keeps the checkpoint's.
    ``special_tokens_from``: which of the checkpoint's record and the tokenizer's wins for the
    special-token ids and the generation config (:mod:`megatron_pack.convert.export_specials`)."""
    if special_tokens_from not in SOURCES:
        raise ConversionError(f"--special-tokens-from {special_tokens_from}: choose {' or '.join(SOURCES)}")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    meta = C.read_import_metadata(load)
    if meta is not None:
        src, kind = ImportSource(meta), "import"
    else:
        src, kind = DistSource(resolve_iteration_dir(load), vocab_size, model), "dist_checkpoint"
    preset = src.preset
    out_dtype = parse_dtype(dtype) or src.dtype
    tmp = prepare_output(output)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_bytes)
        writer.add(M.HF_EMBEDDING, M.strip_vocab(src.embedding(), preset.vocab_size).to(out_dtype))
        with _progress(preset.num_layers, "megatron-to-hf", progress) as bar:
            for i in range(preset.num_layers):
                for n, t in src.layer(i).items():
                    writer.add(M.hf_layer_key(i, n), t.to(out_dtype))
                release_memory()
                bar.update(1)
        writer.add(M.HF_FINAL_NORM, src.final_norm().to(out_dtype))
        if not preset.tie_word_embeddings:
            out = src.output()
            if out is None:
                raise ConversionError(f"{load}: no output_layer.weight but the model is untied")
            writer.add(M.HF_OUTPUT, M.strip_vocab(out, preset.vocab_size).to(out_dtype))
        files = writer.close()
        tok = tokenizer or src.tokenizer_dir
        specials = resolve_export_specials(
            checkpoint_said(src.special, src.generation_config, getattr(src, "started_from", ())),
            tokenizer_said((tok, getattr(src, "tokenizer_model", None))), special_tokens_from)
        ids = specials.ids
        cfg = hf_config_dict(preset, out_dtype, ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"])
        write_json_atomic(cfg, os.path.join(tmp, "config.json"), indent=2)
        files += copy_tokenizer(tok, tmp, skip=(GENERATION_CONFIG,)) if tok else []
        if specials.generation_config is not None:  # the resolved one, not the tokenizer directory's copy
            write_json_atomic(specials.generation_config, os.path.join(tmp, GENERATION_CONFIG), indent=2)
            files.append(GENERATION_CONFIG)
        write_json_atomic({"format": "megatron_pack.hf_export", "source": os.path.abspath(load), "source_kind": kind,
                           "tokenizer": tok and os.path.abspath(tok), **specials.provenance()},
                          os.path.join(tmp, PROVENANCE_NAME), indent=2)
        files.append(PROVENANCE_NAME)
        finish_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"files": files, "config": cfg, "source": kind, "specials": specials}
