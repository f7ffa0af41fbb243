"""megatron_pack.training: SFT on Megatron-Core with packed sequences.

    config      dataclasses, one per concern (the CLI is generated from them: cli)
    data        held-out split, packed datasets, resumable DP-sharded batch stream
    loss        masked token CE, normalised over the global batch
    schedule    Megatron-Core's OptimizerParamScheduler (cosine + warmup)
    checkpoint  dist_checkpointing save/load, RNG and data position, SIGTERM
    logging     Megatron-LM style lines, TensorBoard
    loop        train(config) -> results

Entry point: ``python -m megatron_pack.train`` (see ``--help``).
"""

from megatron_pack.training.config import TrainConfig  # noqa: F401


def train(config):
    """:func:`megatron_pack.training.loop.train` (imported lazily: it pulls in Megatron-Core)."""
    from megatron_pack.training.loop import train as _train

    return _train(config)
