"""megatron_pack.parallel: distributed init (torchrun env, NCCL/gloo), seeds, CPU redirection.

``layout`` (the batch arithmetic) needs no torch, so the names below load lazily: the command
lines check a layout before paying for torch's import.
"""

__all__ = ["ParallelState", "current_state", "destroy_distributed", "initialize_distributed", "set_seed"]


def __getattr__(name):
    if name in __all__:
        from megatron_pack.parallel import init

        return getattr(init, name)
    raise AttributeError(f"module 'megatron_pack.parallel' has no attribute {name!r}")
