"""Building what a run trains: the vocabulary size, the model wrapped for DDP (and bf16), the
Megatron optimizer. Megatron-LM's ``setup_model_and_optimizer``, for one model chunk."""

from __future__ import annotations

import torch

from megatron_pack.config.spec import ConfigError, TrainConfig


def recorded_architecture(path: str):
    """``(architecture, HF extras)`` recorded in an import or a training checkpoint at ``path``
    (root or iteration directory); ``(None, {})`` when nothing there records one. HF extras:
    ``{"special_tokens": {...}, "generation_config": {...}}``, carried to the export."""
    from megatron_pack.checkpoint.dist import is_dist_checkpoint, saved_run_config
    from megatron_pack.checkpoint.imported import preset_from_metadata, read_import_metadata
    from megatron_pack.checkpoint.iterations import CheckpointError, resolve_iteration_dir
    from megatron_pack.model.presets import get_preset

    meta = read_import_metadata(path)
    if meta is not None:
        return preset_from_metadata(meta), {"special_tokens": meta.get("hf_config") or {},
                                            "generation_config": meta.get("generation_config")}
    try:
        iter_path = resolve_iteration_dir(path)
    except CheckpointError:
        return None, {}
    try:
        # a dist checkpoint without its record would silently disable the architecture and plan checks
        rc = saved_run_config(iter_path, required=is_dist_checkpoint(iter_path))
    except CheckpointError as e:
        raise ConfigError(f"{e}; cannot read the architecture the run recorded") from None
    if rc is None:
        return None, {}
    if rc.get("architecture"):
        return preset_from_metadata(rc), rc.get("hf") or {}
    name = (rc.get("model") or {}).get("model")  # checkpoints from before architectures were recorded
    return (get_preset(name) if name else None), rc.get("hf") or {}


def resolve_architecture(config: TrainConfig):
    """``(architecture, HF extras)`` of the run: the one recorded where the run starts from
    (``--load``: the import, or the checkpoint it resumes; else ``--pretrained-checkpoint``),
    checked against ``--model`` when both are given; else ``--model`` (default ``tiny``)."""
    from megatron_pack.checkpoint.imported import resolve_finetune_load
    from megatron_pack.model.architecture import architecture_differences
    from megatron_pack.model.presets import get_preset

    ck = config.checkpoint
    recorded, extras, where = None, {}, None
    if ck.load:
        where = resolve_finetune_load(ck.load, ck.save)[0]
        recorded, extras = recorded_architecture(where)
    if recorded is None and ck.pretrained_checkpoint:
        where = ck.pretrained_checkpoint
        recorded, extras = recorded_architecture(where)
    flag = config.model.model
    try:
        wanted = get_preset(flag) if flag else None
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    if recorded is None:
        return wanted or get_preset("tiny"), extras
    if wanted is not None:
        diff = architecture_differences(recorded, wanted)
        if diff:
            raise ConfigError(f"--model {flag}: the architecture recorded in {where} differs (recorded, --model): "
                              f"{diff}; drop --model to use the recorded one")
    return recorded, extras


def resolve_vocab_size(config: TrainConfig, preset) -> int:
    """The run's unpadded vocabulary (:mod:`megatron_pack.model.vocab` has the rule), after
    checking once that every token id of the dataset lies below it (an id past the embedding
    fails at some step; one in the TP padding rows trains to NaN)."""
    from megatron_pack.files.indexed_check import check_token_ids
    from megatron_pack.model.vocab import resolve_vocab_size as rule

    d = config.data
    # A blend: the rule per source (the same unless it falls through to the data's largest id).
    vocab = max(rule(config.model.vocab_size, config.model.tokenizer_path, preset, p) for p in d.train_blend.prefixes)
    for p in d.prefixes:  # the training sources, then --valid-data-path's
        check_token_ids(p, vocab)
    return vocab


def setup_model_and_optimizer(config: TrainConfig, preset, vocab_size: int, bf16: bool, use_cuda: bool):
    """``(model, optimizer, transformer config, distributed optimizer?)``: the GPTModel under
    Float16Module (bf16) and Megatron-Core DDP, its optimizer, and the config hooks that make
    ``finalize_model_grads`` divide by the global supervised-token count."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import transformer_config
    from megatron_pack.model.spec import choose_fusions

    p = config.parallel
    if p.context_parallel_size > 1 and p.cp_comm_type not in ("p2p", "a2a"):
        from megatron_pack.model.spec import resolve_backend

        if resolve_backend(config.model.backend) == "te":  # also when --transformer-impl auto picked TE
            raise ConfigError(f"--cp-comm-type: {p.cp_comm_type} does not take packed (THD) sequences in "
                              "Transformer Engine; use p2p or a2a")
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
        **({"init_method_std": config.model.init_method_std} if config.model.init_method_std else {}),
        **choose_fusions(use_cuda),  # off on CPU, on where the kernels import
        cp_comm_type=({"allgather": "all_gather"}.get(p.cp_comm_type, p.cp_comm_type)
                      if p.context_parallel_size > 1 else None),
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
