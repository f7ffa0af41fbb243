"""Megatron-Core private names this package touches, in one place, each checked against the
release it was written for (0.16).

* :func:`in_process_write_results`: Megatron-Core's torch_dist writer collects each save's write
  results in a queue of a *spawned* ``multiprocessing.Manager``
  (``dist_checkpointing/strategies/filesystem_async._get_write_results_queue``), created at the
  first save and kept for the life of the process: a server process (~270 MB) and the resource
  tracker the spawn starts. Neither watches the trainer: SIGKILL it (an OOM kill, a scheduler's
  kill after its grace period) and both live on, indefinitely. Our saves are synchronous
  (``AsyncRequest.execute_sync``: the writer puts its results and the strategy takes them in this
  same process), so a plain thread-safe ``queue.Queue`` does the Manager's job and nothing is
  spawned. The forked per-bucket writers are covered by
  :func:`megatron_pack.checkpoint.integrity.children_die_with_parent`.
* :func:`fill_empty_optimizer_state`: the distributed optimizer's
  ``_init_optimizer_states_with_dummy_values``, so a fresh optimizer can describe its state for a
  load before its first step.
"""

from __future__ import annotations

import queue

from megatron_pack.mcore_version import mcore_version

TESTED = "0.16"


def in_process_write_results() -> None:
    """Give Megatron-Core's writer an in-process results queue instead of a spawned Manager's
    (synchronous saves only). Idempotent; a no-op where a release has no Manager queue; raises
    ``RuntimeError`` naming the release where its layout is not the one this was written for."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if not hasattr(fa, "_get_write_results_queue"):
        return  # no Manager queue in this release
    if not hasattr(fa, "_results_queue"):
        raise RuntimeError(f"megatron-core {mcore_version()}: filesystem_async._get_write_results_queue no longer "
                           f"caches _results_queue (written for {TESTED}); "
                           f"update megatron_pack/checkpoint/mcore_shim.py")
    if fa._results_queue is None:
        fa._results_queue = queue.Queue()


def fill_empty_optimizer_state(optimizer) -> None:
    """Megatron-Core 0.16's distributed optimizer (torch Adam, no Apex/TE) cannot describe its
    state for loading before the first step: its ``state_dict`` asserts on an empty Adam state.
    Its own dummy-state initialiser fills it; the load overwrites the values. Raises
    ``RuntimeError`` naming the release where the initialiser is gone but an empty state needs it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or inner.state:
            continue  # not a distributed optimizer, or its state already exists
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            raise RuntimeError(f"megatron-core {mcore_version()}: DistributedOptimizer has no "
                               f"_init_optimizer_states_with_dummy_values (written for {TESTED}); update "
                               f"megatron_pack/checkpoint/mcore_shim.py")
        opt._init_optimizer_states_with_dummy_values()
