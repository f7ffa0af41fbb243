"""The training loop: ``train(config) -> results``, Megatron-Core all the way down.

One step = one global batch: ``get_forward_backward_func()`` (no-pipelining or 1F1B)
runs the micro-batches, Megatron-Core DDP reduces the gradients and
``finalize_model_grads`` divides them by the global supervised-token count (see
:mod:`megatron_pack.training.loss`), the Megatron optimizer clips and steps, and
``OptimizerParamScheduler`` moves the learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from functools import partial

import numpy as np
import torch

from megatron_pack.training.checkpoint import SignalHandler, load_checkpoint, save_checkpoint
from megatron_pack.training.config import ConfigError, TrainConfig
from megatron_pack.training.data import (DataPosition, TrainStream, build_datasets, epochs_to_iters,
                                         eval_batches)
from megatron_pack.training.logging import TrainingLogger, is_main_logger
from megatron_pack.training.loss import masked_loss, reduce_reports


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the iteration."""


def resolve_vocab_size(config: TrainConfig, preset) -> int:
    """--vocab-size, else the tokenizer's, else the preset's, else max token id + 1."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if config.model.tokenizer_model:
        from megatron_pack.data.tokenizer import load_tokenizer

        return int(load_tokenizer(config.model.tokenizer_model).vocab_size)
    if preset.vocab_size:
        return preset.vocab_size
    tokens = np.memmap(config.data.data_path + ".bin", dtype=np.int32, mode="r")
    return int(tokens.max(initial=0)) + 1


def _data_signature(config: TrainConfig) -> dict:
    """What the saved data position means; a resumed run must agree."""
    d, t = config.data, config.train
    return {"data_path": os.path.abspath(d.data_path), "seq_length": d.seq_length, "pack_mode": d.packing.pack_mode,
            "document_mask": d.packing.document_mask, "overlong": d.packing.overlong,
            "valid_fraction": d.valid_fraction, "global_batch_size": t.global_batch_size, "seed": t.seed}


def _build_model_and_optimizer(config: TrainConfig, preset, vocab_size: int, bf16: bool, use_cuda: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import transformer_config

    p = config.parallel
    recompute = {}
    if config.model.recompute_granularity == "full":
        recompute = dict(recompute_method="uniform", recompute_num_layers=1)
    tcfg = transformer_config(
        preset,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        use_cpu_initialization=not use_cuda,
        recompute_granularity=config.model.recompute_granularity,
        calculate_per_token_loss=True,  # sums per micro-batch; finalize_model_grads divides globally
        **recompute,
    )
    model = build_model(preset, tcfg, vocab_size=vocab_size, backend=config.model.backend)
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tcfg, model)
    use_dist_opt = p.use_distributed_optimizer
    if use_dist_opt is None:
        use_dist_opt = torch.distributed.get_backend() == "nccl"
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=use_dist_opt)
    model = DistributedDataParallel(tcfg, ddp_cfg, model)
    o = config.optim
    ocfg = OptimizerConfig(optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                           adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                           clip_grad=o.clip_grad, bf16=bf16, params_dtype=tcfg.params_dtype,
                           use_distributed_optimizer=use_dist_opt)
    optimizer = get_megatron_optimizer(ocfg, [model])
    tcfg.no_sync_func = model.no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    return model, optimizer, tcfg, use_dist_opt


def _forward_step(device, weighting: str, data_iterator, model):
    """Megatron's forward_step_func, run on every stage with the same micro-batch."""
    from megatron_pack.model.packed import model_inputs

    batch = next(data_iterator)
    output = model(**model_inputs(batch, device=device))
    return output, partial(_loss_func, batch["loss_mask"].to(device), batch["cu_seqlens"], batch["num_cu_seqlens"],
                           weighting)


def _loss_func(loss_mask, cu_seqlens, num_cu_seqlens, weighting, output_tensor):
    return masked_loss(output_tensor, loss_mask, weighting, cu_seqlens.to(output_tensor.device), num_cu_seqlens)


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns figures of the run (see the end of this function).

    Collective: every rank of the torchrun job calls it. Joins/creates the process group;
    tears it down at the end only if it created it.
    """
    from megatron.core import parallel_state as mps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pack.model.presets import get_preset
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    p = config.parallel
    st = initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                p.context_parallel_size, backend=p.distributed_backend,
                                timeout_minutes=p.distributed_timeout_minutes)
    try:
        return _train(config, st, get_forward_backward_func, mps, get_preset, set_seed)
    finally:
        if owns_group:
            destroy_distributed()


def _train(config, st, get_forward_backward_func, mps, get_preset, set_seed) -> dict:
    sizes = config.resolve(st.world_size)
    set_seed(config.train.seed)
    use_cuda = st.device.type == "cuda"
    bf16 = config.model.bf16 if config.model.bf16 is not None else use_cuda
    log = TrainingLogger(is_main_logger(st.rank, st.world_size), 0, config.logging.tensorboard_dir,
                         config.logging.log_file)

    ds = build_datasets(config, tp_size=st.tp_size, cp_size=st.cp_size)
    t = config.train
    total_iters = t.train_iters or epochs_to_iters(ds.train, t.global_batch_size, t.train_epochs)
    log.train_iters = total_iters
    preset = get_preset(config.model.model)
    vocab = resolve_vocab_size(config, preset)
    model, optimizer, tcfg, use_dist_opt = _build_model_and_optimizer(config, preset, vocab, bf16, use_cuda)
    from megatron_pack.training.schedule import build_scheduler

    scheduler = build_scheduler(optimizer, config.optim, total_iters)
    log.print(f"> model {preset.name}: vocab {vocab}, bf16 {bf16}, TP {st.tp_size} PP {st.pp_size} DP {st.dp_size}, "
              f"distributed optimizer {use_dist_opt}, {sizes.num_microbatches} micro-batches of "
              f"{t.micro_batch_size} x {ds.train.padded_length} tokens per rank and step")
    log.print(f"> data {config.data.data_path}: {ds.num_train_conversations} train / {ds.num_valid_conversations} "
              f"held-out conversations; pack mode {config.data.packing.pack_mode} (document mask "
              f"{'on' if config.data.packing.document_mask else 'off'}): {len(ds.train)} sequences, "
              f"efficiency {ds.train.plan.efficiency:.2%}; {total_iters} steps")

    iteration, position = 0, DataPosition()
    signature = _data_signature(config)
    ck = config.checkpoint
    resumed = False
    if ck.load:
        from megatron_pack.convert.checkpoint_io import resolve_finetune_load, start_from_import

        # --load IMPORT (tools/convert_checkpoint.py hf-to-megatron) starts a fine-tune from the
        # HF weights the first time; once --save holds a checkpoint the same flags resume it.
        load_dir, is_import = resolve_finetune_load(ck.load, ck.save)
        if is_import:
            start_from_import(load_dir, model, optimizer, preset=preset, vocab_size=vocab)
            log.print(f"> fine-tuning from imported weights {load_dir} (fresh optimizer, iteration 0)")
            resumed = True
        else:
            loaded = load_checkpoint(load_dir, model, optimizer, scheduler)
            if loaded is not None:
                saved_sig = loaded["extra"].get("data_signature", {})
                diff = {k: (saved_sig.get(k), v) for k, v in signature.items() if saved_sig.get(k) != v}
                if diff:
                    raise ConfigError(f"--load {load_dir}: the checkpoint's data setup differs (saved, now): {diff}; "
                                      "its data position would be meaningless. Use the same settings, a fresh --save, "
                                      "or --pretrained-checkpoint for weights only.")
                iteration = loaded["iteration"]
                position = DataPosition.from_state_dict(loaded["data"])
                resumed = True
                log.print(f"> resumed from {loaded['path']} at iteration {iteration} (epoch {position.epoch}, "
                          f"consumed samples {position.consumed_samples})")
            else:
                log.print(f"> --load {load_dir}: no checkpoint there, starting fresh")
    if ck.pretrained_checkpoint and not resumed:
        from megatron_pack.convert.checkpoint_io import (is_imported_checkpoint, load_model_from_dist_checkpoint,
                                                         start_from_import)

        if is_imported_checkpoint(ck.pretrained_checkpoint):
            start_from_import(ck.pretrained_checkpoint, model, optimizer, preset=preset, vocab_size=vocab)
        else:  # a megatron_pack training checkpoint: weights only, at any TP/PP
            load_model_from_dist_checkpoint(ck.pretrained_checkpoint, model)
            if hasattr(optimizer, "reload_model_params"):
                optimizer.reload_model_params()  # bf16: refresh the fp32 main copies
        log.print(f"> initial weights from {ck.pretrained_checkpoint} (fresh optimizer, iteration 0)")

    stream = TrainStream(ds.train, t.global_batch_size, t.micro_batch_size, st.dp_rank, st.dp_size, position)
    fb = get_forward_backward_func()
    device = st.device
    seq_len = t.micro_batch_size * ds.train.padded_length  # a THD micro-batch is one row of B*S tokens
    loss_owner = st.is_last_stage and st.tp_rank == 0  # one copy of each report in the all-reduce
    run_config = dataclasses.asdict(config)

    def save(it):
        return save_checkpoint(ck.save, it, model, optimizer, scheduler, stream.pos.state_dict(),
                               extra={"data_signature": signature}, run_config=run_config)

    def evaluate(it):
        if ds.valid is None:
            return None, 0
        model.eval()
        reports = []
        with torch.no_grad():
            for micro in eval_batches(ds.valid, t.global_batch_size, t.micro_batch_size, st.dp_rank, st.dp_size,
                                      t.eval_iters):
                reports += fb(forward_step_func=partial(_forward_step, device, "token"), data_iterator=iter(micro),
                              model=[model], num_microbatches=len(micro), seq_length=seq_len, micro_batch_size=1,
                              forward_only=True)
        model.train()
        loss, count = reduce_reports(reports if loss_owner else [])
        log.validation(it, loss, count)
        return loss, count

    history, exit_reason, last_ckpt = [], "completed", None
    valid_loss = valid_tokens = None
    step_fn = partial(_forward_step, device, t.loss_weighting)
    # Megatron-LM's --exit-interval: stop after the next iteration divisible by it (a resumed
    # run goes on to the following multiple).
    stop_at = (min(total_iters, (iteration // ck.exit_interval + 1) * ck.exit_interval)
               if ck.exit_interval else total_iters)
    handler = SignalHandler() if ck.exit_signal_handler else None
    if handler:
        handler.__enter__()
    try:
        model.train()
        while iteration < stop_at:
            t0 = time.perf_counter()
            micro = stream.next_step()
            stats = dict(stream.last_stats)
            optimizer.zero_grad()
            model.zero_grad_buffer()
            reports = fb(forward_step_func=step_fn, data_iterator=iter(micro), model=[model],
                         num_microbatches=len(micro), seq_length=seq_len, micro_batch_size=1, forward_only=False)
            loss, count = reduce_reports(reports if loss_owner else [])
            iteration += 1
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"iteration {iteration}: lm loss is {loss} over {count} supervised tokens; stopping before the "
                    f"optimizer step. Lower --lr, check the data, or resume from the last checkpoint"
                    + (f" ({last_ckpt})" if last_ckpt else ""))
            lr = optimizer.param_groups[0]["lr"]
            ok, grad_norm, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            if use_cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rec = {"iteration": iteration, "lm loss": loss, "tokens": count, "learning rate": lr,
                   "grad norm": None if grad_norm is None else float(grad_norm), "seconds": dt,
                   "real tokens": stats["real_tokens"], "capacity": stats["capacity"], "samples": stats["samples"],
                   "skipped": 0 if ok else 1}
            history.append(rec)
            if iteration % config.logging.log_interval == 0 or iteration == stop_at:
                log.step(iteration, {
                    "consumed samples": stream.pos.consumed_samples, "elapsed ms": dt * 1000.0,
                    "learning rate": lr, "global batch size": t.global_batch_size, "lm loss": loss,
                    "grad norm": rec["grad norm"], "real tokens/s": stats["real_tokens"] / dt,
                    "padding fraction": 1.0 - stats["real_tokens"] / stats["capacity"],
                    "samples/s": stats["samples"] / dt, "skipped": rec["skipped"], "tokens": count,
                })
            if t.eval_interval and iteration % t.eval_interval == 0 and iteration < total_iters:
                evaluate(iteration)
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
            valid_loss, valid_tokens = evaluate(iteration)
    finally:
        if handler:
            handler.__exit__(None, None, None)
        log.close()

    timed = history[1:] if len(history) > 1 else history  # the first step pays for warm-up
    secs = sum(r["seconds"] for r in timed)
    real = sum(r["real tokens"] for r in timed)
    return {
        "iteration": iteration,
        "train_iters": total_iters,
        "exit_reason": exit_reason,
        "history": history,
        "final_train_loss": history[-1]["lm loss"] if history else None,
        "valid_loss": valid_loss,
        "valid_tokens": valid_tokens,
        "wall_time": sum(r["seconds"] for r in history),
        "tokens_per_s": real / secs if secs else 0.0,
        "samples_per_s": sum(r["samples"] for r in timed) / secs if secs else 0.0,
        "padding_fraction": 1.0 - sum(r["real tokens"] for r in history) / max(1, sum(r["capacity"] for r in history)),
        "num_train_sequences": len(ds.train),
        "checkpoint": last_ckpt,
        "data_position": stream.pos.state_dict(),
        "world_size": st.world_size,
    }
