"""megatron_pack.training: SFT on Megatron-Core with packed sequences.

    config      dataclasses, one per concern (the CLI is generated from them: cli)
    setup       vocabulary size, model under DDP/bf16, Megatron optimizer
    restore     --load (resume or HF import) and --pretrained-checkpoint
    step        train_step and evaluate through Megatron-Core's forward-backward schedule
    loss        masked token CE, normalised over the global batch
    schedule    Megatron-Core's OptimizerParamScheduler (cosine + warmup)
    logging     Megatron-LM style lines, TensorBoard
    loop        train(config) -> results

Data comes from :mod:`megatron_pack.data.sampling`, checkpoints from :mod:`megatron_pack.checkpoint`.

Entry point: ``python -m megatron_pack.train`` (see ``--help``).
"""

from megatron_pack.config.spec import TrainConfig  # noqa: F401


def train(config):
    """:func:`megatron_pack.training.loop.train` (imported lazily: it pulls in Megatron-Core)."""
    from megatron_pack.training.loop import train as _train

    return _train(config)
