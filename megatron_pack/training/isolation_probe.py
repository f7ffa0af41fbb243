"""Running audit rows through the run's own model and Megatron-Core schedule, watching every layer.

Every rank (each TP rank, PP stage, CP and DP rank) runs the same passes, as in training:
``forward_backward`` sends activations between stages, so a pass is one schedule call. Hooks
on each transformer layer of this stage hand its output (forward passes, gathered over TP
under sequence parallelism) or the gradient of its input (backward passes) to the current
pass's callback, tagged with the global layer number and the micro-batch index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pack.data.context_parallel import split_batch_for_cp
from megatron_pack.model.packed import model_inputs
from megatron_pack.model.state_keys import unwrap
from megatron_pack.training.isolation_rows import local_positions


@dataclass
class AuditEnv:
    """What the passes need of the run: its model, schedule and layout."""

    model: object
    forward_backward: object  # Megatron-Core's get_forward_backward_func()
    device: torch.device
    seq_length: int  # tokens of a THD micro-batch (micro_batch_size x padded length)
    cp_group: object = None
    tp_group: object = None
    sequence_parallel: bool = False

    @property
    def cp_size(self) -> int:
        return self.cp_group.size() if self.cp_group is not None else 1

    @property
    def cp_rank(self) -> int:
        return self.cp_group.rank() if self.cp_group is not None else 0

    @property
    def tp_size(self) -> int:
        return self.tp_group.size() if self.tp_group is not None else 1

    @property
    def tp_rank(self) -> int:
        return self.tp_group.rank() if self.tp_group is not None else 0


class LayerWatch:
    """Hooks on this stage's transformer layers. Set ``on_output(layer, mb, hidden [t, h])`` and
    ``on_query(layer, mb, rotated query [t, heads * d])`` for forward passes, or
    ``on_input_grad(layer, mb, grad [t, h])`` for backward passes; ``mb`` is the micro-batch the
    schedule is running (set by :func:`run_pass`)."""

    def __init__(self, env: AuditEnv):
        self.env = env
        self.layers = list(unwrap(env.model).decoder.layers)
        self.on_output = None
        self.on_query = None
        self.on_input_grad = None
        self.mb = -1
        self._handles = []

    @property
    def layer_numbers(self) -> list:
        return [int(layer.layer_number) for layer in self.layers]

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._forward))
            self._handles.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
            core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
            if core is not None:  # its query arrives rotated (RoPE applied): where positions show
                n = int(layer.layer_number)
                self._handles.append(core.register_forward_pre_hook(
                    lambda mod, args, kwargs, n=n: self._query(n, args, kwargs), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward(self, layer, args, output):
        if self.on_output is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        h = h.detach().reshape(-1, h.size(-1))
        if self.env.sequence_parallel and self.env.tp_size > 1:  # the whole CP-local sequence
            parts = [torch.empty_like(h) for _ in range(self.env.tp_size)]
            dist.all_gather(parts, h.contiguous(), group=self.env.tp_group)
            h = torch.cat(parts)
        self.on_output(int(layer.layer_number), self.mb, h)
        return None

    def _query(self, layer_number: int, args, kwargs):
        if self.on_query is None:
            return None
        q = kwargs.get("query", args[0] if args else None)
        if torch.is_tensor(q):  # [t, (1,) heads of this TP rank, head dim]: the whole CP-local sequence
            self.on_query(layer_number, self.mb, q.detach().reshape(q.size(0), -1))
        return None

    def _pre(self, layer, args, kwargs):
        if self.on_input_grad is None:
            return None
        h = kwargs.get("hidden_states", args[0] if args else None)
        if torch.is_tensor(h) and h.requires_grad:
            n, mb, sink = int(layer.layer_number), self.mb, self.on_input_grad
            h.register_hook(lambda g: sink(n, mb, g.detach().reshape(-1, g.size(-1))))
        return None


def to_global(per_token: torch.Tensor, batch: dict, env: AuditEnv) -> torch.Tensor:
    """This CP rank's per-token values -> the whole micro-batch row in global order (all-gather
    over the CP group: every CP rank of the last stage computes the loss of the same micro-batch)."""
    if env.cp_size == 1:
        return per_token
    parts = [torch.empty_like(per_token) for _ in range(env.cp_size)]
    dist.all_gather(parts, per_token.contiguous(), group=env.cp_group)
    out = torch.empty(int(batch["tokens"].numel()), dtype=per_token.dtype, device=per_token.device)
    for r, part in enumerate(parts):
        out[local_positions(batch, env.cp_size, r).to(out.device)] = part
    return out


def run_pass(env: AuditEnv, watch: LayerWatch, batches: list, targets: list | None = None) -> list:
    """One schedule call over ``batches`` (global THD micro-batches). Forward only without
    ``targets``; with them (a global 0/1 mask per micro-batch) the loss is the sum of the
    targeted tokens' losses and the schedule runs backward too. Returns each micro-batch's
    per-token loss in global order on the last stage (an empty list elsewhere)."""
    losses = []

    def step(data_iterator, model):
        i, batch = next(data_iterator)
        watch.mb = i
        local = split_batch_for_cp(batch, env.cp_size, env.cp_rank) if env.cp_size > 1 else batch
        out = model(**model_inputs(local, device=env.device, cp_group=env.cp_group))

        def loss_func(output):
            per = output.float().reshape(-1)
            losses.append(to_global(per.detach(), batch, env))
            if targets is None:
                loss = per.sum() * 0.0
            else:
                pos = local_positions(batch, env.cp_size, env.cp_rank)
                loss = (per * targets[i][pos].to(per.device, per.dtype)).sum()
            return loss, torch.ones((), dtype=torch.int, device=per.device), {}

        return out, loss_func

    grad = contextlib.nullcontext() if targets is not None else torch.no_grad()
    with grad:
        env.forward_backward(forward_step_func=step, data_iterator=iter(list(enumerate(batches))),
                             model=[env.model], num_microbatches=len(batches), seq_length=env.seq_length,
                             micro_batch_size=1, forward_only=targets is None)
    watch.mb = -1
    return losses


@contextlib.contextmanager
def untouched_run(model, optimizer, tcfg):
    """Leave no trace: eval mode (no dropout, no recomputation), every RNG stream saved and
    restored, no gradient all-reduce, gradients zeroed afterwards; nothing steps the optimizer."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, tracker.get_states())
    was_training = model.training
    finalize = getattr(tcfg, "finalize_model_grads_func", None)
    if tcfg is not None:
        tcfg.finalize_model_grads_func = None
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if tcfg is not None:
            tcfg.finalize_model_grads_func = finalize
        if optimizer is not None:
            optimizer.zero_grad()
        if hasattr(model, "zero_grad_buffer"):
            model.zero_grad_buffer()
        for p in model.parameters():
            p.grad = None
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        tracker.set_states(states[4])
