"""One rank of the HF conversion tests (started by ``launcher.launch`` with WORKER set to this file).

For each ``--layouts`` entry ``tp,pp,SOURCE`` it rebuilds the parallel groups, builds the
model, fills it from SOURCE (an ``hf-to-megatron`` import, or with ``--dist`` a training
checkpoint, model weights only) and runs one packed (THD) micro-batch of the documents in
``--docs`` through the pipeline schedule; the last stage gathers the vocab-parallel logits
and writes ``logits_{i}.npy``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def forward_logits(model, batch):
    """Full-vocabulary logits [tokens, padded vocab] on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pack.model.packed import model_inputs

    def step(it, m):
        out = m(**model_inputs(next(it)))
        return out, lambda o: (o.sum() * 0.0, {"logits": o.detach()})

    n = batch["tokens"].numel()
    res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                      num_microbatches=1, seq_length=n, micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = res[0]["logits"].reshape(n, -1)
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def thd_batch(docs):
    tokens = torch.tensor([t for d in docs for t in d])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    cu = torch.tensor(np.cumsum([0] + [len(d) for d in docs]), dtype=torch.int32)
    return {"tokens": tokens, "position_ids": pos, "cu_seqlens": cu, "num_cu_seqlens": len(cu),
            "max_seqlen": max(len(d) for d in docs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", required=True, help="JSON list of token lists (one packed row)")
    ap.add_argument("--layouts", required=True, help="tp,pp,SOURCE;tp,pp,SOURCE;...")
    ap.add_argument("--dist", action="store_true", help="SOURCE is a training checkpoint")
    ap.add_argument("--preset", default=None, help="with --dist: override the architecture run_config.json records")
    ap.add_argument("--vocab-size", type=int, default=None)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_pack.checkpoint.dist_reader import load_model_from_dist_checkpoint
    from megatron_pack.checkpoint.imported import load_imported_weights, preset_from_metadata, read_import_metadata
    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import get_preset, transformer_config
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed
    from megatron_pack.training.setup import recorded_architecture

    docs = json.loads(open(args.docs).read())
    batch = thd_batch(docs)
    written = []
    for i, spec in enumerate(args.layouts.split(";")):
        tp, pp, source = spec.split(",", 2)
        tp, pp = int(tp), int(pp)
        initialize_distributed(tp, pp)
        set_seed(1)
        if args.dist and args.preset:
            preset = get_preset(args.preset).with_vocab(args.vocab_size)
        elif args.dist:
            preset, _ = recorded_architecture(source)
            preset = preset.with_vocab(args.vocab_size) if args.vocab_size else preset
        else:
            preset = preset_from_metadata(read_import_metadata(source))
        model = build_model(preset, transformer_config(preset, tensor_model_parallel_size=tp,
                                                       pipeline_model_parallel_size=pp, use_cpu_initialization=True))
        if args.dist:
            load_model_from_dist_checkpoint(source, model)
        else:
            load_imported_weights(source, model, preset=preset, vocab_size=preset.vocab_size)
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, batch)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            np.save(os.path.join(args.out, f"logits_{i}_rank{torch.distributed.get_rank()}.npy"), logits.numpy())
            written.append(i)
        torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    destroy_distributed()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"written": written}, f)


if __name__ == "__main__":
    main()
