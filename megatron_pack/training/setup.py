"""Building what a run trains: the vocabulary size, the model wrapped for DDP (and bf16), the
Megatron optimizer. Megatron-LM's ``setup_model_and_optimizer``, for one model chunk."""

from __future__ import annotations

import torch

from megatron_pack.training.config import TrainConfig


def resolve_vocab_size(config: TrainConfig, preset) -> int:
    """The run's unpadded vocabulary (:mod:`megatron_pack.model.vocab` has the rule), after
    checking once that every token id of the dataset lies below it (an id past the embedding
    fails at some step; one in the TP padding rows trains to NaN)."""
    from megatron_pack.files.indexed_check import check_token_ids
    from megatron_pack.model.vocab import resolve_vocab_size as rule

    vocab = rule(config.model.vocab_size, config.model.tokenizer_model, preset, config.data.data_path)
    check_token_ids(config.data.data_path, vocab)
    return vocab


def setup_model_and_optimizer(config: TrainConfig, preset, vocab_size: int, bf16: bool, use_cuda: bool):
    """``(model, optimizer, transformer config, distributed optimizer?)``: the GPTModel under
    Float16Module (bf16) and Megatron-Core DDP, its optimizer, and the config hooks that make
    ``finalize_model_grads`` divide by the global supervised-token count."""
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
