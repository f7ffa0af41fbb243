"""The parallel-layout and batch arithmetic, one copy for training and the planner.

    world = DP x (TP x PP x CP);  global batch = micro-batch x DP x micro-batches per step
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayoutCheck:
    """Derived sizes (0 where they cannot be derived) and every reason the layout is illegal,
    each starting with the flag to change."""

    data_parallel_size: int
    num_microbatches: int
    errors: list = field(default_factory=list)


def check_layout(world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 context_parallel_size: int = 1, micro_batch_size: int = 1, global_batch_size: int = 1, *,
                 sequence_parallel: bool = False, architecture=None) -> LayoutCheck:
    """Check a layout for ``world_size`` ranks. ``architecture`` (anything with
    ``num_attention_heads``, ``num_query_groups``, ``num_layers``, ``name``) adds the checks
    that TP divides the heads and KV groups and PP the layers."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    mp = tp * pp * cp
    errors = []
    if world_size % mp:
        errors.append(f"--tensor/pipeline/context-model-parallel-size: TP*PP*CP = {tp}*{pp}*{cp} = {mp} does not "
                      f"divide the world size {world_size}")
    if architecture is not None:
        a = architecture
        if a.num_attention_heads % tp:
            errors.append(f"--tensor-model-parallel-size: TP {tp} does not divide the {a.num_attention_heads} "
                          f"attention heads of {a.name}")
        if a.num_query_groups % tp:
            errors.append(f"--tensor-model-parallel-size: TP {tp} does not divide the {a.num_query_groups} query "
                          f"groups (KV heads) of {a.name}")
        if a.num_layers % pp:
            errors.append(f"--pipeline-model-parallel-size: PP {pp} does not divide the {a.num_layers} layers of "
                          f"{a.name} (stages must hold equal layer counts)")
    if sequence_parallel and tp == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    dp = world_size // mp if world_size % mp == 0 else 0
    m = 0
    if dp:
        per_step = micro_batch_size * dp
        if global_batch_size % per_step:
            errors.append(f"--global-batch-size: {global_batch_size} is not a multiple of micro-batch-size * "
                          f"data-parallel = {micro_batch_size} * {dp}")
        else:
            m = global_batch_size // per_step
    return LayoutCheck(dp, m, errors)
