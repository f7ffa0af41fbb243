"""The training loop: ``train(config) -> results``, Megatron-Core all the way down.

One step = one global batch: ``get_forward_backward_func()`` (no-pipelining or 1F1B)
runs the micro-batches, Megatron-Core DDP reduces the gradients and
``finalize_model_grads`` divides them by the global supervised-token count (see
:mod:`megatron_pack.training.loss`), the Megatron optimizer clips and steps, and
``OptimizerParamScheduler`` moves the learning rate.

    train  ->  initialize_distributed -> Trainer(config, st)   (builds: layout check, datasets,
               setup_model_and_optimizer (setup), restore (restore), the stream)
               -> Trainer.train(): loop of train_step (step), evaluate, save -> results
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from megatron_pack.checkpoint.dist import save_checkpoint
from megatron_pack.checkpoint.integrity import acquire_save_lock
from megatron_pack.checkpoint.signals import SignalHandler
from megatron_pack.config.datasets import build_datasets
from megatron_pack.config.spec import TrainConfig, total_train_iters
from megatron_pack.data.sampling import epochs_to_iters
from megatron_pack.data.step_packing import train_stream
from megatron_pack.run_log import TrainingLogger, is_main_logger
from megatron_pack.training.restore import architecture_record, data_signature, restore
from megatron_pack.training.setup import resolve_architecture, resolve_vocab_size, setup_model_and_optimizer
from megatron_pack.training.step import NonFiniteLossError, StepContext, evaluate, evaluate_by_source, train_step  # noqa: F401


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
        return Trainer(config, st).train()
    finally:
        if owns_group:
            destroy_distributed()


class Trainer:
    """One run: everything is built in ``__init__`` (torchtitan's shape), :meth:`train` loops.

    The save lock and the logger are held by an :class:`contextlib.ExitStack` from the start of
    the build, so a build that fails releases them too; :meth:`train` closes it.
    """

    def __init__(self, config: TrainConfig, st):
        from megatron_pack.parallel import set_seed

        self.config, self.st = config, st
        self.exits = contextlib.ExitStack()
        try:
            self.preset, self.hf_extras = resolve_architecture(config)  # --model, or what --load records
            # the layout against the architecture: TP must divide the heads, PP the layers (one line, exit 2)
            self.sizes = config.resolve(st.world_size, architecture=self.preset)
            set_seed(config.train.seed)
            self.use_cuda = st.device.type == "cuda"
            self.bf16 = config.model.bf16 if config.model.bf16 is not None else self.use_cuda
            self.log = self._logger()
            self.exits.callback(self.log.close)
            lock = acquire_save_lock(config.checkpoint.save) if config.checkpoint.save else None  # one run per --save
            if lock:  # held by one rank
                self.exits.callback(lock.release)
            self._build_data()
            self._build_model()
            self._restore()
        except BaseException:
            self.exits.close()
            raise

    def _logger(self) -> TrainingLogger:
        config, st, lg = self.config, self.st, self.config.logging
        save_dir = config.checkpoint.save
        return TrainingLogger(is_main_logger(st.rank, st.world_size), 0, lg.tensorboard_dir, lg.log_file,
                              wandb_project=lg.wandb_project, wandb_exp_name=lg.wandb_exp_name,
                              wandb_save_dir=lg.wandb_save_dir or (os.path.join(save_dir, "wandb")
                                                                   if lg.wandb_project and save_dir else None),
                              run_config=dataclasses.asdict(config) if lg.wandb_project else None)

    def _build_data(self):
        config, t = self.config, self.config.train
        self.ds = ds = build_datasets(config)
        self.total_iters = total_train_iters(t, lambda epochs: epochs_to_iters(ds.train, t.global_batch_size, epochs))
        self.log.train_iters = self.total_iters

    def _build_model(self):
        from megatron_pack.model.spec import describe as describe_backends
        from megatron_pack.training.schedule import build_scheduler

        config, st, t, ds = self.config, self.st, self.config.train, self.ds
        self.vocab = resolve_vocab_size(config, self.preset)
        self.model, self.optimizer, self.tcfg, use_dist_opt = setup_model_and_optimizer(config, self.preset, self.vocab,
                                                                                   self.bf16, self.use_cuda)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_iters,
                                         override=config.checkpoint.override_opt_param_scheduler,
                                         use_checkpoint=config.checkpoint.use_checkpoint_opt_param_scheduler)
        log = self.log
        log.print(f"> model {self.preset.name}: vocab {self.vocab}, bf16 {self.bf16}, TP {st.tp_size} PP {st.pp_size} "
                  f"CP {st.cp_size} DP {st.dp_size}, distributed optimizer {use_dist_opt}, "
                  f"{'up to ' if hasattr(ds.train, 'num_steps') else ''}{self.sizes.num_microbatches} micro-batches "
                  f"of {t.micro_batch_size} x {ds.train.padded_length} tokens per rank and step")
        # ends with the one 'fusions:'
        log.print(f"> backends: {describe_backends(self.tcfg, config.model.backend, config.optim.optimizer)}")
        path = config.data.train_path
        path = path if isinstance(path, str) else " ".join(path)  # a blend's tokens
        log.print(f"> data {path}: {ds.num_train_conversations} train / {ds.num_valid_conversations} "
                  f"held-out conversations; pack mode {config.data.packing.pack_mode} (document mask "
                  f"{'on' if config.data.packing.document_mask else 'off'}): {len(ds.train)} sequences, "
                  f"efficiency {ds.train.plan.efficiency:.2%}; {self.total_iters} steps")
        if ds.train_names:  # a blend: what each source contributes to an epoch
            counts = ds.train.source_counts()
            log.print("> blend (sequences per epoch 0): " + ", ".join(
                f"{n} {c} ({c / len(ds.train):.1%})" for n, c in zip(ds.train_names, counts)))
        if ds.train.plan.stats.unsupervised_items:
            log.print(f"> {ds.train.plan.stats.unsupervised_items} training items without a supervised token after "
                      f"truncation left out ({ds.train.plan.stats.unsupervised_tokens} tokens)")

    def _restore(self):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        config, st, t, ds = self.config, self.st, self.config.train, self.ds
        self.signature = data_signature(config)
        self.iteration, position = restore(config, self.model, self.optimizer, self.scheduler, preset=self.preset,
                                           vocab_size=self.vocab, signature=self.signature, log=self.log,
                                           document_multiple=ds.train.document_multiple)
        self.stream = train_stream(ds.train, t.global_batch_size, t.micro_batch_size, st.dp_rank, st.dp_size,
                                   position, balancer=_balancer(t, self.preset, self.vocab, st),
                                   fixed_shapes=st.pp_size > 1)
        if hasattr(ds.train, "rows_spread"):  # --pack-scope step
            r = ds.train.rows_spread()
            self.log.print(f"> pack scope step: the padded run's {ds.train.num_steps} steps of {t.global_batch_size} "
                           f"conversations in {len(ds.train)} rows (epoch 0; rows per step min {r['min']} mean "
                           f"{r['mean']:.2f} max {r['max']})")
        self.log.print(f"> batch balancing {'on' if self.stream.balancer.enabled else 'off'} (compute per DP rank "
                       "and micro-batch; training and evaluation)")
        # Evaluation places its batches by the same rule, with a balancer of its own (its plan's costs).
        self.eval_balancer = _balancer(t, self.preset, self.vocab, st) if self.stream.balancer.enabled else None
        self.ctx = StepContext(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               forward_backward=get_forward_backward_func(), device=st.device,
                               seq_length=t.micro_batch_size * ds.train.padded_length,
                               loss_owner=st.is_last_stage and st.tp_rank == 0, use_cuda=self.use_cuda,
                               source_names=ds.train_names, cp_group=_cp_group(st.cp_size))
        self.run_config = dataclasses.asdict(config)
        self.run_config.update(architecture=architecture_record(self.preset, self.vocab),  # read by export, --load
                               hf=self.hf_extras,
                               plan={"document_multiple": ds.train.document_multiple})  # read by --load (check_plan)

    def save(self, iteration: int) -> str:
        ck = self.config.checkpoint
        return save_checkpoint(ck.save, iteration, self.model, self.optimizer, self.scheduler,
                               self.stream.pos.state_dict(), extra={"data_signature": self.signature},
                               run_config=self.run_config, checksums=ck.checkpoint_checksums)

    def validate(self, iteration: int):
        t, st, ds = self.config.train, self.st, self.ds
        loss, count, by_source = evaluate_by_source(self.ctx, ds.valid, t.global_batch_size, t.micro_batch_size,
                                                    st.dp_rank, st.dp_size, t.eval_iters, self.eval_balancer)
        if ds.valid is not None:
            self.log.validation(iteration, loss, count, by_source)
        return loss, count

    def train(self) -> dict:
        """The loop; returns figures of the run (see :func:`_results`)."""
        ck = self.config.checkpoint
        # Megatron-LM's --exit-interval: stop after the next iteration divisible by it (a resumed
        # run goes on to the following multiple).
        stop_at = (min(self.total_iters, (self.iteration // ck.exit_interval + 1) * ck.exit_interval)
                   if ck.exit_interval else self.total_iters)
        with self.exits:
            handler = self.exits.enter_context(SignalHandler()) if ck.exit_signal_handler else None
            isolation = self._check_isolation()
            if isolation is not None and self.config.train.check_isolation == "only":
                history, exit_reason, last_ckpt = [], "isolation_only", None
            else:
                history, exit_reason, last_ckpt = self._loop(stop_at, handler)
            valid_loss = valid_tokens = None
            if exit_reason == "completed" and self.iteration < self.total_iters:
                exit_reason = "exit_interval"
            if exit_reason == "completed":
                valid_loss, valid_tokens = self.validate(self.iteration)
        return _results(history, iteration=self.iteration, train_iters=self.total_iters, exit_reason=exit_reason,
                        valid_loss=valid_loss, valid_tokens=valid_tokens, num_train_sequences=len(self.ds.train),
                        checkpoint=last_ckpt, data_position=self.stream.pos.state_dict(),
                        world_size=self.st.world_size, isolation=isolation)

    def _check_isolation(self):
        """``--check-isolation``: before the first step, on exactly what the steps will run."""
        if not self.config.train.check_isolation:
            return None
        from megatron_pack.model.spec import describe as describe_backends
        from megatron_pack.training.isolation import check_isolation

        config = self.config
        backends = "; ".join(describe_backends(self.tcfg, config.model.backend).split("; ")[:2])
        return check_isolation(config, self.st, self.model, self.optimizer, self.tcfg, self.ctx, self.ds.train,
                               self.vocab, self.bf16, self.log, backends)

    def _loop(self, stop_at: int, handler) -> tuple[list, str, str | None]:
        """Steps until ``stop_at`` or a SIGTERM; ``(history, exit reason, last checkpoint)``."""
        t, ck, log, stream = self.config.train, self.config.checkpoint, self.log, self.stream
        history, last_ckpt = [], None
        self.model.train()
        while self.iteration < stop_at:
            t0 = time.perf_counter()
            micro = stream.next_step()
            stats = dict(stream.last_stats)
            self.iteration += 1
            iteration = self.iteration
            rec = train_step(self.ctx, micro, t.loss_weighting, iteration, last_ckpt)
            rec.update({"seconds": time.perf_counter() - t0, "real tokens": stats["real_tokens"],  # incl. data
                        "capacity": stats["capacity"], "samples": stats["samples"],
                        "imbalance": stats.get("imbalance"), "rows": stats.get("rows")})
            history.append(rec)
            if rec.get("note"):
                log.print(f"> {rec['note']}")
            if iteration % self.config.logging.log_interval == 0 or iteration == stop_at:
                log_step(log, rec, stream.pos.consumed_samples, t.global_batch_size)
            if t.eval_interval and iteration % t.eval_interval == 0 and iteration < self.total_iters:
                self.validate(iteration)
            stop = handler is not None and handler.stop_requested()
            if ck.save and (stop or iteration == stop_at
                            or (ck.save_interval and iteration % ck.save_interval == 0)):
                last_ckpt = self.save(iteration)
                log.print(f"> saved checkpoint {last_ckpt}")
            if stop:
                log.print(f"> SIGTERM received: stopped after iteration {iteration}"
                          + (f", checkpoint {last_ckpt}" if ck.save else " (no --save: nothing saved)"))
                return history, "signal", last_ckpt
        return history, "completed", last_ckpt


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
        **({"rows": rec["rows"]} if rec.get("rows") is not None else {}),
    })


def _balancer(t, preset, vocab: int, st):
    """The stream's :class:`BatchBalancer`: cost from the architecture, on by default when
    DP > 1 or PP > 1 (``--balance-batches``/``--no-balance-batches`` override)."""
    from megatron_pack.data.balance import BatchBalancer, balance_on
    from megatron_pack.model.cost import CostModel
    from megatron_pack.model.presets import padded_vocab_size

    on = balance_on(t.balance_batches, st.dp_size, st.pp_size)
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
