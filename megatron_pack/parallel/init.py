"""Distributed start-up: torchrun environment -> process group -> Megatron-Core parallel state.

One call per process, before building the model::

    state = initialize_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    set_seed(1234)
    ...
    destroy_distributed()

With CUDA the process group is NCCL and each rank takes ``cuda:LOCAL_RANK``; without it the
group is gloo and :mod:`megatron_pack.parallel.cpu_compat` is switched on so Megatron-Core
runs on the CPU (tests, the tiny preset). Without torchrun's variables the process is a
world of one.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_pack.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the (tp, cp, dp, pp) grid; a snapshot, not a handle."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    device: torch.device
    backend: str

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _init_process_group(backend: str, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"a process group is already up as rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"but the environment says rank {rank}/{world_size}")
        return
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    elif world_size == 1:
        # A lone process needs no rendezvous: an in-memory store avoids picking a port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun")


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    backend: str | None = None,
    timeout_minutes: int = 30,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> ParallelState:
    """Join the job torchrun started and build Megatron-Core's model-parallel groups.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Called again
    in a process whose group is up (tests that try several layouts), it keeps the process group
    and rebuilds the model-parallel groups.
    """
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp)):
        if int(value) < 1:
            raise ValueError(f"{name}_model_parallel_size must be >= 1, got {value}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x context ({cp}) "
            f"= {tp * pp * cp}; the data-parallel size would not be whole")

    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        cpu_compat.enable()  # before any Megatron-Core group or RNG tracker exists
        device = torch.device("cpu")

    _init_process_group(backend, rank, world_size, datetime.timedelta(minutes=timeout_minutes))

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    return current_state(backend=backend, device=device, local_rank=local_rank)


def current_state(*, backend: str | None = None, device: torch.device | None = None,
                  local_rank: int | None = None) -> ParallelState:
    """The :class:`ParallelState` of this process from Megatron-Core's groups."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("model parallel state is not initialised; call initialize_distributed() first")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelState(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0) if local_rank is None else local_rank,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        device=device,
        backend=backend or dist.get_backend(),
    )


def set_seed(seed: int, *, data_parallel_random_init: bool = False) -> int:
    """Seed python, numpy, torch and Megatron-Core's model-parallel RNG tracker, as Megatron-LM does.

    Each pipeline stage adds ``100 * pp_rank`` (its layers are different layers, so they must not
    share an init stream); ``data_parallel_random_init`` also adds ``10 * dp_rank``. Tensor-parallel
    ranks keep one seed here and Megatron-Core derives their tracker streams (``seed + 2718 +
    tp_rank`` for TP regions, ``seed`` for the rest). Returns the seed this rank used.
    """
    from megatron.core import parallel_state as ps

    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if ps.model_parallel_is_initialized():
        seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
        if data_parallel_random_init:
            seed += 10 * ps.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if ps.model_parallel_is_initialized():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return seed


def destroy_distributed() -> None:
    """Tear down Megatron-Core's groups, the process group and the CPU redirection (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_compat.disable()  # the CUDA -> CPU redirection lives exactly as long as the groups
