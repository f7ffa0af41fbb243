"""The training loop: ``train(config) -> results``, Megatron-Core all the way down.

One step = one global batch: ``get_forward_backward_func()`` (no-pipelining or 1F1B)
runs the micro-batches, Megatron-Core DDP reduces the gradients and
``finalize_model_grads`` divides them by the global supervised-token count (see
:mod:`megatron_pack.training.loss`), the Megatron optimizer clips and steps, and
``OptimizerParamScheduler`` moves the learning rate.

    train  ->  initialize_distributed -> _run:
               build datasets -> setup_model_and_optimizer (setup) -> restore (restore)
               -> loop of train_step (step), evaluate, save -> results
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from megatron_pack.checkpoint.dist import save_checkpoint
from megatron_pack.checkpoint.integrity import acquire_save_lock
from megatron_pack.checkpoint.signals import SignalHandler
from megatron_pack.data.sampling import TrainStream, build_datasets, epochs_to_iters
from megatron_pack.training.config import TrainConfig, total_train_iters
from megatron_pack.run_log import TrainingLogger, is_main_logger
from megatron_pack.training.restore import data_signature, restore
from megatron_pack.training.setup import resolve_architecture, resolve_vocab_size, setup_model_and_optimizer
from megatron_pack.training.step import (NonFiniteLossError, StepContext, evaluate, evaluate_by_source,  # noqa: F401
                                         train_step)


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns figures of the run (see :func:`_results`).

    Collective: every rank of the torchrun job calls it. Joins/creates the process group;
    tears it down at the end only if it created it.
    """
    from megatron_pack.parallel import destroy_distributed, initialize_distributed

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    p = config.parallel
    st = initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                p.context_parallel_size, backend=p.distributed_backend,
                                timeout_minutes=p.distributed_timeout_minutes)
    try:
        return _run(config, st)
    finally:
        if owns_group:
            destroy_distributed()


def _run(config: TrainConfig, st) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pack.model.spec import describe as describe_backends
    from megatron_pack.parallel import set_seed
    from megatron_pack.training.schedule import build_scheduler

    sizes = config.resolve(st.world_size)
    set_seed(config.train.seed)
    use_cuda = st.device.type == "cuda"
    bf16 = config.model.bf16 if config.model.bf16 is not None else use_cuda
    lg = config.logging
    log = TrainingLogger(is_main_logger(st.rank, st.world_size), 0, lg.tensorboard_dir, lg.log_file,
                         wandb_project=lg.wandb_project, wandb_exp_name=lg.wandb_exp_name,
                         wandb_save_dir=lg.wandb_save_dir or (os.path.join(config.checkpoint.save, "wandb")
                                                              if lg.wandb_project and config.checkpoint.save else None),
                         run_config=dataclasses.asdict(config) if lg.wandb_project else None)
    lock = acquire_save_lock(config.checkpoint.save) if config.checkpoint.save else None  # one run per --save

    ds = build_datasets(config, tp_size=st.tp_size, cp_size=st.cp_size)
    t, ck = config.train, config.checkpoint
    total_iters = total_train_iters(t, lambda epochs: epochs_to_iters(ds.train, t.global_batch_size, epochs))
    log.train_iters = total_iters
    preset, hf_extras = resolve_architecture(config)  # --model, or what --load records
    vocab = resolve_vocab_size(config, preset)
    model, optimizer, tcfg, use_dist_opt = setup_model_and_optimizer(config, preset, vocab, bf16, use_cuda)
    scheduler = build_scheduler(optimizer, config.optim, total_iters,
                                override=config.checkpoint.override_opt_param_scheduler,
                                use_checkpoint=config.checkpoint.use_checkpoint_opt_param_scheduler)
    log.print(f"> model {preset.name}: vocab {vocab}, bf16 {bf16}, TP {st.tp_size} PP {st.pp_size} CP {st.cp_size} DP {st.dp_size}, "
              f"distributed optimizer {use_dist_opt}, {sizes.num_microbatches} micro-batches of "
              f"{t.micro_batch_size} x {ds.train.padded_length} tokens per rank and step")
    log.print(f"> backends: {describe_backends(tcfg, config.model.backend, config.optim.optimizer)}")  # ends with the one 'fusions:'

    path = config.data.data_path if config.data.data_path is not None else config.data.train_data_path
    path = path if isinstance(path, str) else " ".join(path)  # a blend's tokens
    log.print(f"> data {path}: {ds.num_train_conversations} train / {ds.num_valid_conversations} "
              f"held-out conversations; pack mode {config.data.packing.pack_mode} (document mask "
              f"{'on' if config.data.packing.document_mask else 'off'}): {len(ds.train)} sequences, "
              f"efficiency {ds.train.plan.efficiency:.2%}; {total_iters} steps")
    if ds.train_names:  # a blend: what each source contributes to an epoch
        counts = ds.train.source_counts()
        log.print("> blend (sequences per epoch 0): " + ", ".join(
            f"{n} {c} ({c / len(ds.train):.1%})" for n, c in zip(ds.train_names, counts)))

    if ds.train.plan.stats.unsupervised_items:
        log.print(f"> {ds.train.plan.stats.unsupervised_items} training items without a supervised token after "
                  f"truncation left out ({ds.train.plan.stats.unsupervised_tokens} tokens)")
    signature = data_signature(config)
    iteration, position = restore(config, model, optimizer, scheduler, preset=preset, vocab_size=vocab,
                                  signature=signature, log=log, document_multiple=ds.train.document_multiple)
    stream = TrainStream(ds.train, t.global_batch_size, t.micro_batch_size, st.dp_rank, st.dp_size, position,
                         balancer=_balancer(t, preset, vocab, st))
    log.print(f"> batch balancing {'on' if stream.balancer.enabled else 'off'} (compute per DP rank and micro-batch; "
              "training and evaluation)")
    # Evaluation places its batches by the same rule, with a balancer of its own (its plan's costs).
    eval_balancer = _balancer(t, preset, vocab, st) if stream.balancer.enabled else None
    ctx = StepContext(model=model, optimizer=optimizer, scheduler=scheduler,
                      forward_backward=get_forward_backward_func(), device=st.device,
                      seq_length=t.micro_batch_size * ds.train.padded_length,
                      loss_owner=st.is_last_stage and st.tp_rank == 0, use_cuda=use_cuda,
                      source_names=ds.train_names, cp_group=_cp_group(st.cp_size))
    run_config = dataclasses.asdict(config)
    run_config.update(architecture=preset.with_vocab(vocab).to_dict(), hf=hf_extras,  # read by export and --load
                      plan={"document_multiple": ds.train.document_multiple})  # read by --load (check_plan)

    def save(it):
        return save_checkpoint(ck.save, it, model, optimizer, scheduler, stream.pos.state_dict(),
                               extra={"data_signature": signature}, run_config=run_config,
                               checksums=ck.checkpoint_checksums)

    def validate(it):
        loss, count, by_source = evaluate_by_source(ctx, ds.valid, t.global_batch_size, t.micro_batch_size,
                                                    st.dp_rank, st.dp_size, t.eval_iters, eval_balancer)
        if ds.valid is not None:
            log.validation(it, loss, count, by_source)
        return loss, count

    history, exit_reason, last_ckpt = [], "completed", None
    valid_loss = valid_tokens = None
    # Megatron-LM's --exit-interval: stop after the next iteration divisible by it (a resumed
    # run goes on to the following multiple).
    stop_at = (min(total_iters, (iteration // ck.exit_interval + 1) * ck.exit_interval)
               if ck.exit_interval else total_iters)
    handler = SignalHandler() if ck.exit_signal_handler else None
    if handler:
        handler.__enter__()
    isolation = None
    try:
        if t.check_isolation:  # before the first step, on exactly what the steps will run
            from megatron_pack.training.isolation import check_isolation

            isolation = check_isolation(config, st, model, optimizer, tcfg, ctx, ds.train, vocab, bf16, log,
                                        "; ".join(describe_backends(tcfg, config.model.backend).split("; ")[:2]))
            if t.check_isolation == "only":
                exit_reason, stop_at = "isolation_only", iteration
        model.train()
        while iteration < stop_at:
            t0 = time.perf_counter()
            micro = stream.next_step()
            stats = dict(stream.last_stats)
            iteration += 1
            rec = train_step(ctx, micro, t.loss_weighting, iteration, last_ckpt)
            rec.update({"seconds": time.perf_counter() - t0, "real tokens": stats["real_tokens"],  # incl. data
                        "capacity": stats["capacity"], "samples": stats["samples"],
                        "imbalance": stats.get("imbalance")})
            history.append(rec)
            if rec.get("note"):
                log.print(f"> {rec['note']}")
            if iteration % config.logging.log_interval == 0 or iteration == stop_at:
                log_step(log, rec, stream.pos.consumed_samples, t.global_batch_size)
            if t.eval_interval and iteration % t.eval_interval == 0 and iteration < total_iters:
                validate(iteration)
            stop = handler is not None and handler.stop_requested()
            if ck.save and (stop or iteration == stop_at
                            or (ck.save_interval and iteration % ck.save_interval == 0)):
                last_ckpt = save(iteration)
                log.print(f"> saved checkpoint {last_ckpt}")
            if stop:
                exit_reason = "signal"
                log.print(f"> SIGTERM received: stopped after iteration {iteration}"
                          + (f", checkpoint {last_ckpt}" if ck.save else " (no --save: nothing saved)"))
                break
        if exit_reason == "completed" and iteration < total_iters:
            exit_reason = "exit_interval"
        if exit_reason == "completed":
            valid_loss, valid_tokens = validate(iteration)
    finally:
        if handler:
            handler.__exit__(None, None, None)
        if lock:
            lock.release()
        log.close()
    return _results(history, iteration=iteration, train_iters=total_iters, exit_reason=exit_reason,
                    valid_loss=valid_loss, valid_tokens=valid_tokens, num_train_sequences=len(ds.train),
                    checkpoint=last_ckpt, data_position=stream.pos.state_dict(), world_size=st.world_size,
                    isolation=isolation)


def _cp_group(cp_size: int):
    if cp_size == 1:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()


def log_step(log, rec: dict, consumed_samples: int, global_batch_size: int) -> None:
    """One Megatron-LM style line for the step record ``rec``."""
    dt = rec["seconds"]
    log.step(rec["iteration"], {
        "consumed samples": consumed_samples, "elapsed ms": dt * 1000.0,
        "learning rate": rec["learning rate"], "global batch size": global_batch_size, "lm loss": rec["lm loss"],
        "grad norm": rec["grad norm"], "real tokens/s": rec["real tokens"] / dt,
        "padding fraction": 1.0 - rec["real tokens"] / rec["capacity"],
        "conversations/s": rec["samples"] / dt, "skipped": rec["skipped"], "tokens": rec["tokens"],
        **({k: rec[k] for k in ("source lm loss", "source tokens") if k in rec}),
        "compute imbalance": rec.get("imbalance"),
    })


def _balancer(t, preset, vocab: int, st):
    """The stream's :class:`BatchBalancer`: cost from the architecture, on by default when
    DP > 1 or PP > 1 (``--balance-batches``/``--no-balance-batches`` override)."""
    from megatron_pack.data.balance import BatchBalancer
    from megatron_pack.model.cost import CostModel
    from megatron_pack.model.presets import padded_vocab_size

    on = t.balance_batches if t.balance_batches is not None else (st.dp_size > 1 or st.pp_size > 1)
    cost = CostModel.from_architecture(preset, vocab_size=padded_vocab_size(vocab, st.tp_size), cp=st.cp_size)
    return BatchBalancer(cost, st.dp_size, t.micro_batch_size, enabled=on)


def _results(history: list, **fields) -> dict:
    """The run's figures: the step history and throughput (the first step, which pays for
    warm-up, is left out of the rates)."""
    timed = history[1:] if len(history) > 1 else history
    secs = sum(r["seconds"] for r in timed)
    real = sum(r["real tokens"] for r in timed)
    return {
        **fields,
        "history": history,
        "final_train_loss": history[-1]["lm loss"] if history else None,
        "wall_time": sum(r["seconds"] for r in history),
        "tokens_per_s": real / secs if secs else 0.0,
        "samples_per_s": sum(r["samples"] for r in timed) / secs if secs else 0.0,
        "padding_fraction": 1.0 - sum(r["real tokens"] for r in history) / max(1, sum(r["capacity"] for r in history)),
    }
