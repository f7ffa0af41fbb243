"""megatron_pack.parallel: distributed init (torchrun env, NCCL/gloo), seeds, CPU redirection."""

from megatron_pack.parallel.init import (
    ParallelState,
    current_state,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)

__all__ = ["ParallelState", "current_state", "destroy_distributed", "initialize_distributed", "set_seed"]
