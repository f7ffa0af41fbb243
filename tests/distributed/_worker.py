"""One rank of the distributed equality tests (started by ``launcher.launch``).

Scenarios (``--scenario``):
  reference  world 1: build the tiny model, save its weights as a dist checkpoint, check
             packed == padded, RoPE/mask restart per document, run 3 optimizer steps.
  layouts    any world: for each ``--layouts`` entry (``tp2``, ``pp2``, ``tp2pp2``, ``dp2`` ...)
             rebuild the parallel groups and the model, load the reference weights
             (resharding TP1 -> TPn / PPn), repeat the checks and the 3 steps.

Every rank writes ``rank{r}.json``; the pytest side compares numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from functools import partial

T0 = time.monotonic()  # before the heavy imports below: the log's times include them

import launcher  # noqa: E402  (this folder: the script's own)
import torch  # noqa: E402

from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed  # noqa: E402

VOCAB = 256  # padded vocab is 256 at TP1 and TP2, so the softmax sees the same logits
SEQ = 32
MICRO = 2  # packed sequences per THD micro-batch
STEPS = 3
GLOBAL = 4  # packed sequences per optimizer step
INIT_STD = 0.1  # larger than Llama's 0.02 so attention is far from uniform and masks matter


def datasets(prefix):
    from megatron_pack.data.packed_dataset import PackedSFTDataset

    packed = PackedSFTDataset(prefix, SEQ, "bfd", document_mask=True, shuffle_sequences=False, use_cache=False)
    padded = PackedSFTDataset(prefix, SEQ, "padding", shuffle_sequences=False, use_cache=False)
    return packed, padded


def docs_of(ds, i):
    return [int(d) for d in ds.plan.sequence(int(ds.order[i]))[:, 0]]


def cp_datasets(prefix, cp):
    """The CP data (docs of odd lengths, some shorter than 2*CP), mask on and off, packed by ONE
    plan made at padded lengths (CP 2) so every CP size sees the same sequences."""
    from megatron_pack.data.context_parallel import document_multiple
    from megatron_pack.data.packed_dataset import PackedSFTDataset
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.packing.plan import build_plan

    data = SFTIndexedDataset(prefix)
    plan = build_plan(data.lengths, SEQ, "bfd", pad_multiple=4)
    return {mask: PackedSFTDataset(data, SEQ, plan=plan, document_mask=mask, shuffle_sequences=False,
                                   document_multiple=document_multiple(cp)) for mask in (True, False)}


def build(tp, pp, ckpt, save=False, sp=False, cp=1):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_pack.model import build_model, get_preset, transformer_config

    state = initialize_distributed(tp, pp, cp)
    set_seed(1234)
    preset = get_preset("tiny")
    cfg = transformer_config(preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             context_parallel_size=cp, sequence_parallel=sp, use_cpu_initialization=True,
                             calculate_per_token_loss=True, init_method_std=INIT_STD)
    model = build_model(preset, cfg, vocab_size=VOCAB, backend="local")
    if save:
        if state.rank == 0:
            os.makedirs(ckpt, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    dist_opt = cp == 1  # CP layouts compare whole gradients with the CP1 run: no sharded buffers there
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
                                                 use_distributed_optimizer=dist_opt), [ddp])
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    return state, cfg, ddp, opt


def forward_step(data_iterator, model, *, drop_packed_after_first_stage=False, weighting="token"):
    """What the training loop does on every stage: read the micro-batch, pass packed params."""
    from megatron.core import parallel_state as ps

    from megatron_pack.model.packed import model_inputs

    batch = next(data_iterator)
    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    if cp_group is not None:
        from megatron_pack.data.context_parallel import split_batch_for_cp

        batch = split_batch_for_cp(batch, cp_group.size(), cp_group.rank())
    kwargs = model_inputs(batch, cp_group=cp_group)
    if drop_packed_after_first_stage and not ps.is_pipeline_first_stage():
        kwargs["packed_seq_params"] = None  # the Megatron-LM failure mode, for the negative check
    out = model(**kwargs)

    def loss_func(per_token):
        if weighting == "sample":  # the library's per-sample loss, CP-aware
            from megatron_pack.training.loss import masked_loss

            loss, n, rep = masked_loss(per_token, batch["loss_mask"], "sample", batch["cu_seqlens"],
                                       batch["num_cu_seqlens"], segment_ids=batch.get("segment_ids"),
                                       cp_group=cp_group)
            return loss, n, {"lm": rep["lm loss"]}
        mask = batch["loss_mask"].float()
        loss = (per_token.float() * mask).sum()
        n = mask.sum().to(torch.int)
        return loss, n, {"lm": torch.stack([loss.detach(), n.float()])}

    return out, loss_func


def run_batch(state, cfg, ddp, micro_batches, forward_only=False, **fs_kwargs):
    """One global batch through the pipeline schedule; this DP rank takes its share of micro-batches.
    Returns the global per-token loss on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mine = micro_batches[state.dp_rank::state.dp_size]
    shape = mine[0]["tokens"].shape
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, **fs_kwargs), data_iterator=iter(mine), model=[ddp],
        num_microbatches=len(mine), seq_length=shape[0] * shape[1] if mine[0]["cu_seqlens"].dim() == 1 else shape[1],
        micro_batch_size=1 if mine[0]["cu_seqlens"].dim() == 1 else shape[0], forward_only=forward_only)
    if not ps.is_pipeline_last_stage():
        return None
    tot = torch.stack([x["lm"] for x in losses]).sum(0)
    torch.distributed.all_reduce(tot, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(tot[0] / tot[1])


def grads(ddp):
    return {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}


def packed_vs_padded(state, cfg, ddp, packed, padded):
    """Loss and every gradient shard of this rank: packed THD micro-batches vs one conversation per row."""
    from megatron_pack.data.collate import collate_padded, collate_thd

    n = len(packed) // MICRO * MICRO
    docs = sorted(d for i in range(n) for d in docs_of(packed, i))
    row_of = {docs_of(padded, i)[0]: i for i in range(len(padded))}
    thd = [collate_thd([packed[i + j] for j in range(MICRO)]) for i in range(0, n, MICRO)]
    rows = [row_of[d] for d in docs]
    mbs = next(b for b in (3, 4, 2, 1) if len(rows) % b == 0)  # fixed shape for pipeline send/recv
    pad = [collate_padded([padded[r] for r in rows[i:i + mbs]]) for i in range(0, len(rows), mbs)]

    ddp.zero_grad_buffer()
    loss_thd = run_batch(state, cfg, ddp, thd)
    g_thd = grads(ddp)
    ddp.zero_grad_buffer()
    loss_pad = run_batch(state, cfg, ddp, pad)
    g_pad = grads(ddp)
    ddp.zero_grad_buffer()
    # negative controls: the same packed batch without the document mask, and (PP) with the
    # packed params missing on later stages, must both change the loss
    no_mask = []
    for b in thd:
        b = dict(b)
        b["cu_seqlens"] = torch.tensor([0, b["tokens"].numel()], dtype=torch.int32)
        b["num_cu_seqlens"], b["max_seqlen"] = torch.tensor(2), torch.tensor(b["tokens"].numel())
        no_mask.append(b)
    loss_no_mask = run_batch(state, cfg, ddp, no_mask, forward_only=True)
    loss_dropped = (run_batch(state, cfg, ddp, thd, forward_only=True, drop_packed_after_first_stage=True)
                    if state.pp_size > 1 else None)
    return dict(
        loss_packed=loss_thd, loss_padded=loss_pad, loss_no_doc_mask=loss_no_mask, loss_pp_dropped=loss_dropped,
        grad_max_abs_diff=max(float((g_thd[k] - g_pad[k]).abs().max()) for k in g_thd),
        grad_max_abs=max(float(g.abs().max()) for g in g_thd.values()),
        num_docs=len(docs), num_packed_micro_batches=len(thd),
    )


def rope_restarts(ddp, packed):
    """The same document twice in one THD row: both copies must give the same per-token loss."""
    from megatron_pack.data.collate import collate_thd

    item = packed[0]
    n = int(item["cu_seqlens"][1])
    one = {k: (v[:n] if torch.is_tensor(v) and v.dim() == 1 and v.numel() == SEQ else v) for k, v in item.items()}
    one.update(cu_seqlens=torch.tensor([0, n], dtype=torch.int32), num_cu_seqlens=2, max_seqlen=n, num_real_tokens=n)
    batch = collate_thd([one, one])
    from megatron_pack.model.packed import model_inputs

    with torch.no_grad():
        per_token = ddp.module(**model_inputs(batch))[0]
    return float((per_token[:n] - per_token[n:]).abs().max()), float(per_token.abs().max())


def train(state, cfg, ddp, opt, packed):
    from megatron_pack.data.collate import collate_thd

    out = []
    for step in range(STEPS):
        idx = [(step * GLOBAL + i) % len(packed) for i in range(GLOBAL)]
        mbs = [collate_thd([packed[idx[i]], packed[idx[i + 1]]]) for i in range(0, GLOBAL, MICRO)]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = run_batch(state, cfg, ddp, mbs)
        ok, grad_norm, _ = opt.step()
        assert ok
        out.append({"loss": loss, "grad_norm": float(grad_norm)})
    return out


def parse_layout(name):
    """``tp2``, ``tp2sp``, ``pp2``, ``dp2``, ``cp2``, ``tp2spcp2``, ``pp2cp2`` -> (tp, pp, sp, cp)."""
    m = re.fullmatch(r"(?:tp(\d+))?(sp)?(?:pp(\d+))?(?:dp(\d+))?(?:cp(\d+))?", name)
    if not m or not name:
        raise ValueError(f"bad layout {name!r}")
    return int(m.group(1) or 1), int(m.group(3) or 1), bool(m.group(2)), int(m.group(5) or 1)


def cp_check(state, cfg, ddp, cp_data, grads_dir):
    """Loss and gradients of the CP data's packed micro-batches, mask on and off. The CP1 run
    (``cp1``) saves its gradients; a TP1/PP1 CP run compares with them. Negative control: the
    gathered keys left in rank order (chunks not reordered) must change the loss."""
    from megatron_pack.data.collate import collate_thd
    from megatron_pack.model.attention import VarlenCoreAttention

    out = {}
    for mask, ds in cp_data.items():
        n = len(ds) // MICRO * MICRO
        thd = [collate_thd([ds[i + j] for j in range(MICRO)]) for i in range(0, n, MICRO)]
        ddp.zero_grad_buffer()
        loss = run_batch(state, cfg, ddp, thd)
        g = grads(ddp)
        ddp.zero_grad_buffer()
        tag = "on" if mask else "off"
        out[f"loss_{tag}"] = loss
        out[f"grad_max_abs_{tag}"] = max(float(x.abs().max()) for x in g.values())
        path = os.path.join(grads_dir, f"cp1_grads_{tag}.pt")
        if state.cp_size == 1:
            torch.save(g, path)
        elif state.tp_size == state.pp_size == 1:
            ref = torch.load(path)
            out[f"grad_max_abs_diff_{tag}"] = max(float((g[k] - ref[k]).abs().max()) for k in g)
        if mask:
            out["loss_sample"] = run_batch(state, cfg, ddp, thd, forward_only=True, weighting="sample")
            out["num_micro_batches"] = len(thd)
            out["doc_lengths"] = sorted(int(x) for x in ds.plan.piece_lengths)
            if state.cp_size > 1:
                attn = [m for m in ddp.modules() if isinstance(m, VarlenCoreAttention)]
                for m in attn:
                    m.cp_reorder = False
                out["loss_not_reordered"] = run_batch(state, cfg, ddp, thd, forward_only=True)
                for m in attn:
                    m.cp_reorder = True
    return out


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def main():
    log("imported")
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--scenario", choices=["reference", "layouts"], required=True)
    ap.add_argument("--layouts", default="")
    ap.add_argument("--cp-data", default=None, help="dataset of the context-parallel layouts (cp1, cp2, ...)")
    args = ap.parse_args()
    packed, padded = datasets(args.data)
    results = {}
    layouts = ["ref"] if args.scenario == "reference" else []
    layouts += [x for x in args.layouts.split(",") if x]
    for name in layouts:
        tp, pp, sp, cp = (1, 1, False, 1) if name == "ref" else parse_layout(name)
        state, cfg, ddp, opt = build(tp, pp, args.ckpt, save=name == "ref", sp=sp, cp=cp)
        log(f"{name}: built")
        res = {"state": {k: v for k, v in vars(state).items() if k != "device"} | {"device": str(state.device)}}
        if "cp" in name:  # the context-parallel checks run on their own data
            cp_data = cp_datasets(args.cp_data, cp)
            res["cp"] = cp_check(state, cfg, ddp, cp_data, os.path.dirname(args.ckpt))
            log(f"{name}: checked")
            res["train"] = train(state, cfg, ddp, opt, cp_data[True])
            log(f"{name}: trained")
            results[name] = res
            continue
        res["check"] = packed_vs_padded(state, cfg, ddp, packed, padded)
        if name == "ref":
            res["rope_restart_diff"], res["rope_scale"] = rope_restarts(ddp, packed)
            m = ddp.module
            res["model"] = dict(inv_freq_1=float(m.rotary_pos_emb.inv_freq[1]), vocab=m.vocab_size,
                                tied=m.share_embeddings_and_output_weights,
                                core_attention=type(m.decoder.layers[0].self_attention.core_attention).__name__,
                                head_dim=cfg.kv_channels)
        log(f"{name}: checked")
        res["train"] = train(state, cfg, ddp, opt, packed)
        log(f"{name}: trained")
        results[name] = res
    rank = torch.distributed.get_rank()
    destroy_distributed()
    launcher.write_rank_result(args.out, rank, results)


if __name__ == "__main__":
    sys.exit(main())
