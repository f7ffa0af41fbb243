"""One optimizer step and one evaluation pass, through Megatron-Core's forward-backward schedule.

Every pipeline stage reads the same micro-batch, so each gets the packed-sequence metadata.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from megatron_pack.data.eval_batches import eval_batches
from megatron_pack.training.loss import masked_loss, reduce_reports, reduce_source_reports


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the iteration."""


@dataclass
class StepContext:
    """What every step needs and nothing changes during a run."""

    model: object
    optimizer: object
    scheduler: object
    forward_backward: object  # Megatron-Core's get_forward_backward_func()
    device: torch.device
    seq_length: int  # a THD micro-batch is one row of micro_batch_size * padded length tokens
    loss_owner: bool  # last stage, TP rank 0: one copy of each report in the all-reduce
    use_cuda: bool
    cp_group: object = None  # context parallel: each CP rank takes its chunks of every document
    source_names: tuple = ()  # training blend's sources: the step record gets a loss per source


def forward_step(device, weighting: str, data_iterator, model, cp_group=None, num_sources: int = 0):
    """Megatron's forward_step_func, run on every stage with the same micro-batch.

    Under context parallelism every CP rank reads the whole micro-batch and keeps its chunks;
    the loss sums its own tokens and the counts add up over DP x CP in ``finalize_model_grads``."""
    from megatron_pack.data.context_parallel import split_batch_for_cp
    from megatron_pack.model.packed import model_inputs

    batch = next(data_iterator)
    if cp_group is not None and cp_group.size() > 1:
        batch = split_batch_for_cp(batch, cp_group.size(), cp_group.rank())
    output = model(**model_inputs(batch, device=device, cp_group=cp_group))
    return output, partial(_loss_func, batch["loss_mask"].to(device), batch["cu_seqlens"], batch["num_cu_seqlens"],
                           weighting, batch.get("segment_ids"), cp_group,
                           token_sources(batch) if num_sources else None, num_sources)


def token_sources(batch: dict):
    """Source id of every token of a (blended) THD micro-batch, or None: row ``b`` of the
    micro-batch comes from ``batch["source"][b]``. Under CP the local tokens map to their
    document (``segment_ids``), the document to its row by where it starts."""
    src = batch.get("source")
    if src is None:
        return None
    rows = src.numel()
    if "segment_ids" in batch:  # split by split_batch_for_cp
        bounds = batch["cu_seqlens_padded"][: int(batch["num_cu_seqlens"])].to(torch.int64)
        row_len = int(bounds[-1]) // rows
        return src[bounds[:-1] // row_len][batch["segment_ids"].reshape(-1).to(torch.int64)]
    return src.repeat_interleave(batch["tokens"].numel() // rows)


def _loss_func(loss_mask, cu_seqlens, num_cu_seqlens, weighting, segment_ids, cp_group, source, num_sources,
               output_tensor):
    return masked_loss(output_tensor, loss_mask, weighting, cu_seqlens.to(output_tensor.device), num_cu_seqlens,
                       segment_ids=segment_ids, cp_group=cp_group, source=source, num_sources=num_sources)


def _run(ctx: StepContext, micro: list, weighting: str, forward_only: bool, num_sources: int = 0) -> list:
    step = partial(forward_step, ctx.device, weighting, cp_group=ctx.cp_group, num_sources=num_sources)
    return ctx.forward_backward(forward_step_func=step,
                                data_iterator=iter(micro), model=[ctx.model], num_microbatches=len(micro),
                                seq_length=ctx.seq_length, micro_batch_size=1, forward_only=forward_only)


def train_step(ctx: StepContext, micro: list, weighting: str, iteration: int, last_checkpoint=None) -> dict:
    """Forward/backward over the global batch's micro-batches, then the optimizer and schedule.
    ``iteration`` is the number this step gets. Raises NonFiniteLossError before stepping."""
    t0 = time.perf_counter()
    ctx.optimizer.zero_grad()
    ctx.model.zero_grad_buffer()
    n_src = len(ctx.source_names)
    reports = _run(ctx, micro, weighting, False, n_src)  # every rank runs it; one copy of each report counts
    loss, count = reduce_reports(reports if ctx.loss_owner else [])
    by_source = reduce_source_reports(reports if ctx.loss_owner else [], n_src) if n_src else []
    if count == 0:  # legitimate data (all prompts, answers cut off): nothing to learn, not a divergence
        # Same decision on every rank (the count is all-reduced). Like Megatron-LM's skipped
        # iteration: no optimizer step (Adam's momentum would still move the weights on zero
        # gradients), no schedule step; the data position moves on.
        return {"iteration": iteration, "lm loss": float("nan"), "tokens": 0,
                "learning rate": ctx.optimizer.param_groups[0]["lr"], "grad norm": None,
                "seconds": time.perf_counter() - t0, "skipped": 1,
                "note": f"iteration {iteration}: the global batch has no supervised token; step skipped"}
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"iteration {iteration}: lm loss is {loss} over {count} supervised tokens; stopping before the "
            f"optimizer step. Lower --lr, check the data, or resume from the last checkpoint"
            + (f" ({last_checkpoint})" if last_checkpoint else ""))
    lr = ctx.optimizer.param_groups[0]["lr"]
    ok, grad_norm, _ = ctx.optimizer.step()
    if ok:
        ctx.scheduler.step(increment=1)
    if ctx.use_cuda:
        torch.cuda.synchronize()
    return {"iteration": iteration, "lm loss": loss, "tokens": count, "learning rate": lr,
            "grad norm": None if grad_norm is None else float(grad_norm), "seconds": time.perf_counter() - t0,
            "skipped": 0 if ok else 1,
            **({"source lm loss": {n: v for n, (v, _) in zip(ctx.source_names, by_source)},
                "source tokens": {n: c for n, (_, c) in zip(ctx.source_names, by_source)}} if n_src else {})}


def evaluate(ctx: StepContext, valid, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
             eval_iters, balancer=None) -> tuple:
    """Token-weighted held-out loss over ``valid`` (every sequence once across DP ranks):
    ``(loss, supervised tokens)``, or ``(None, 0)`` without a held-out split. ``balancer``:
    place each step's sequences as training does (:func:`~megatron_pack.data.eval_batches.eval_batches`)."""
    return evaluate_by_source(ctx, valid, global_batch_size, micro_batch_size, dp_rank, dp_size, eval_iters,
                              balancer)[:2]


def evaluate_by_source(ctx: StepContext, valid, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, eval_iters, balancer=None) -> tuple:
    """:func:`evaluate` plus ``{source name: (loss, tokens)}`` for a blended held-out set
    (``{}`` otherwise)."""
    if valid is None:
        return None, 0, {}
    names = tuple(getattr(valid, "names", ()))
    ctx.model.eval()
    reports = []
    with torch.no_grad():
        for micro in eval_batches(valid, global_batch_size, micro_batch_size, dp_rank, dp_size, eval_iters, balancer):
            reports += _run(ctx, micro, "token", True, len(names))
    ctx.model.train()
    owned = reports if ctx.loss_owner else []
    loss, count = reduce_reports(owned)
    by_source = dict(zip(names, reduce_source_reports(owned, len(names)))) if names else {}
    return loss, count, by_source
