"""A cluster plan: validate the layout, count parameters, size memory, estimate time.

``make_plan(PlanConfig(...))`` returns the plan as a JSON-ready dict; ``render`` prints it.
Parameters come from the real Megatron-Core model built per rank on the meta device
(:mod:`.params`), memory from :mod:`.memory`, time from :mod:`.timing`; with a dataset every
packing mode is planned on it and costed side by side (the shape of the training-time
table of "Packing Analysis", arXiv 2410.08081, from our own plans).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_pack.model.presets import get_preset
from megatron_pack.packing.modes import DEFAULT_MODES
from megatron_pack.packing.plan import overlong_policy
from megatron_pack.parallel.layout import check_layout
from megatron_pack.planning.catalogue import get_gpu
from megatron_pack.planning.memory import RECOMPUTE, MemoryConfig, plan_memory
from megatron_pack.planning.timing import DEFAULT_MFU, TimingConfig, estimate, full_sequences, plan_stats

#: Published sizes (unpadded vocabulary, untied output layer) the built totals are checked against.
PUBLISHED_PARAMETERS = {"llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.55e9,
                        "qwen2.5-7b": 7.61e9, "qwen2.5-72b": 72.7e9, "mistral-7b": 7.25e9}


class LayoutError(ValueError):
    """An impossible parallel layout; the message lists every reason."""


@dataclass
class PlanConfig:
    """A run to plan; field names are the training CLI's (Megatron's flags, ``_`` for ``-``)."""

    model: str = "llama3-70b"
    nnodes: int = 1
    gpus_per_node: int = 8
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: Optional[str] = None
    bf16: bool = True
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 64
    vocab_size: Optional[int] = None
    """Default: the preset's (required for ``tiny``)."""
    gpu: str = "a800-80gb"
    mfu: float = DEFAULT_MFU
    overhead_gb: float = 3.0
    """CUDA context + NCCL buffers + fragmentation allowance per GPU (an assumption)."""
    flash_attention: bool = True
    data_path: Optional[str] = None
    pack_mode: str = "bfd"
    modes: tuple = DEFAULT_MODES
    document_mask: bool = True
    pad_attention: bool = False
    """Cost attention as S^2 per sequence (a BSHD kernel over padding) instead of real segments."""
    overlong: str = "truncate"
    valid_fraction: float = 0.05
    """Held out of training (as the training CLI does); the epoch is the rest."""
    seed: int = 1234
    train_epochs: Optional[float] = None
    train_iters: Optional[int] = None
    unmodelled_flags: list = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass(frozen=True)
class Layout:
    data_parallel_size: int
    num_microbatches: int
    padded_seq_length: int
    """S: --seq-length padded up to what SP (TP) and CP (2*CP) need, as the dataset does."""
    warnings: tuple


def validate_layout(cfg: PlanConfig) -> Layout:
    """The derived sizes of a legal layout; raises :class:`LayoutError` listing every reason."""
    from megatron_pack.data.packed_dataset import required_multiple

    preset = get_preset(cfg.model)
    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    errors, warnings = [], []
    for name in ("nnodes", "gpus_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size", "seq_length", "micro_batch_size", "global_batch_size"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if errors:
        raise LayoutError("; ".join(errors))
    check = check_layout(cfg.world_size, tp, pp, cp, cfg.micro_batch_size, cfg.global_batch_size,
                         sequence_parallel=cfg.sequence_parallel, architecture=preset)
    errors += check.errors
    if cfg.recompute_granularity not in RECOMPUTE:
        errors.append(f"--recompute-granularity must be full or selective, got {cfg.recompute_granularity!r}")
    dp, m = check.data_parallel_size, check.num_microbatches
    if errors:
        raise LayoutError("; ".join(errors))
    if tp > cfg.gpus_per_node:
        warnings.append(f"TP {tp} spans nodes ({cfg.gpus_per_node} GPUs per node): its all-reduces leave NVLink")
    if tp > 1 and not cfg.sequence_parallel:
        warnings.append("TP > 1 without --sequence-parallel: norm/residual activations are replicated on every "
                        "TP rank")
    if pp > 1 and m < pp:
        warnings.append(f"{m} micro-batches per step for {pp} pipeline stages: the bubble (PP-1)/M = "
                        f"{(pp - 1) / m:.0%} dominates")
    if cfg.use_distributed_optimizer and dp * cp == 1:
        warnings.append("--use-distributed-optimizer with DP*CP = 1 shards nothing")
    mult = required_multiple(tp, cp, cfg.sequence_parallel)
    s = -(-cfg.seq_length // mult) * mult
    if s != cfg.seq_length:
        warnings.append(f"sequences padded from --seq-length {cfg.seq_length} to {s} (a multiple of {mult} "
                        f"for sequence/context parallel)")
    return Layout(dp, m, s, tuple(warnings))


def _vocab(cfg: PlanConfig, preset) -> int:
    from megatron_pack.model.vocab import resolve_vocab_size

    return resolve_vocab_size(cfg.vocab_size, None, preset, cfg.data_path)


def _memory_config(cfg: PlanConfig, lay: Layout, **over) -> MemoryConfig:
    kw = dict(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size, cp=cfg.context_parallel_size,
              dp=lay.data_parallel_size, seq_length=lay.padded_seq_length, micro_batch_size=cfg.micro_batch_size,
              num_microbatches=lay.num_microbatches,
              sequence_parallel=cfg.sequence_parallel, use_distributed_optimizer=cfg.use_distributed_optimizer,
              recompute_granularity=cfg.recompute_granularity, bf16=cfg.bf16,
              flash_attention=cfg.flash_attention, overhead_gb=cfg.overhead_gb)
    kw.update(over)
    return MemoryConfig(**kw)


def _mode_rows(cfg: PlanConfig, preset, params, tcfg: TimingConfig, progress: bool,
               lay: Layout | None = None) -> tuple[list, dict]:
    from megatron_pack.data.balance_forecast import forecast
    from megatron_pack.files.indexed import SFTIndexedDataset
    from megatron_pack.model.cost import CostModel
    from megatron_pack.packing.plan import build_plan, get_mode
    from megatron_pack.data.sampling import split_indices

    ds = SFTIndexedDataset(cfg.data_path)
    # the training split, drawn exactly as training draws it
    train_idx, _ = split_indices(len(ds), cfg.valid_fraction, cfg.seed)
    if train_idx.size == 0:
        raise ValueError(f"{cfg.data_path}: no training conversations after holding out "
                         f"--valid-fraction {cfg.valid_fraction} of {len(ds)}")
    lengths = ds.lengths[train_idx]
    modes = list(cfg.modes)
    if get_mode(cfg.pack_mode).name not in [get_mode(x).name for x in modes]:
        modes.append(cfg.pack_mode)
    rows = []
    for spec in modes:
        t0 = time.perf_counter()
        plan = build_plan(lengths, cfg.seq_length, spec, seed=cfg.seed, overlong=cfg.overlong,
                          turn_starts=(lambda i: ds.turns[int(train_idx[i])]) if overlong_policy(cfg.overlong) == "cut-at-turns" else None)
        stats = plan_stats(plan, document_mask=cfg.document_mask, pad_attention=cfg.pad_attention)
        est = estimate(preset, params.matmul_total, stats, tcfg)
        rows.append({"mode": plan.mode, "selected": get_mode(spec) == get_mode(cfg.pack_mode),
                     "efficiency": float(plan.efficiency), "real_tokens": stats.real_tokens,
                     "attention_sum_sq": stats.sum_sq, "plan_seconds": time.perf_counter() - t0, **est.to_json()})
        if lay is not None and not cfg.pad_attention:
            # per-step imbalance over DP ranks: the step waits for the slowest rank
            cost = CostModel.from_architecture(preset, matmul_params=params.matmul_total,
                                               cp=cfg.context_parallel_size)
            f = forecast(plan, cost, global_batch_size=cfg.global_batch_size, dp_size=lay.data_parallel_size,
                         micro_batch_size=cfg.micro_batch_size, padded_length=lay.padded_seq_length,
                         document_mask=cfg.document_mask, seed=cfg.seed)
            rows[-1].update({"balance": f.to_json(),
                             "step_seconds_contiguous": est.step_seconds * f.slowdown_contiguous,
                             "step_seconds_balanced": est.step_seconds * f.slowdown_balanced})
    base = next((r for r in rows if r["mode"] == "padding"), None)
    for r in rows:
        r["time_vs_padding"] = r["epoch_seconds"] / base["epoch_seconds"] if base else None
        if cfg.train_epochs is not None:  # as training counts them (epochs_to_iters), from epoch 0's plan
            whole, frac = int(cfg.train_epochs), cfg.train_epochs - int(cfg.train_epochs)
            r["train_steps"] = whole * r["steps"] + int(r["steps"] * frac)
            r["train_seconds"] = r["train_steps"] * r["step_seconds"]
    info = {"data_path": cfg.data_path, "num_conversations": int(len(lengths)), "tokens": int(lengths.sum()),
            "valid_fraction": cfg.valid_fraction, "held_out_conversations": int(len(ds) - len(lengths)),
            "document_mask": cfg.document_mask, "pad_attention": cfg.pad_attention, "overlong": cfg.overlong}
    return rows, info


def make_plan(cfg: PlanConfig, progress: bool = False) -> dict:
    """The whole plan as a JSON-ready dict (see ``render`` for the printed form)."""
    from megatron_pack.planning.params import count_parameters

    t0 = time.perf_counter()
    preset = get_preset(cfg.model)
    gpu = get_gpu(cfg.gpu)
    lay = validate_layout(cfg)
    dp, m, warnings = lay.data_parallel_size, lay.num_microbatches, list(lay.warnings)
    vocab = _vocab(cfg, preset)
    params = count_parameters(preset, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                              pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
                              context_parallel_size=cfg.context_parallel_size, world_size=cfg.world_size,
                              vocab_size=vocab, progress=progress)

    stages = plan_memory(preset, _memory_config(cfg, lay), params)
    peak = max(stages, key=lambda s: s.total)
    alternatives = []
    sp_options = (False, True) if cfg.tensor_model_parallel_size > 1 else (False,)
    for sp in sp_options:
        for dist_opt in (False, True):
            row = {"sequence_parallel": sp, "use_distributed_optimizer": dist_opt}
            for rc in RECOMPUTE:
                mc = _memory_config(cfg, lay, sequence_parallel=sp, use_distributed_optimizer=dist_opt,
                                    recompute_granularity=rc)
                row[rc or "none"] = max(s.total for s in plan_memory(preset, mc, params))
            alternatives.append(row)

    tcfg = TimingConfig(gpu=gpu, num_gpus=cfg.world_size, pp=cfg.pipeline_model_parallel_size, num_microbatches=m,
                        global_batch_size=cfg.global_batch_size, seq_length=lay.padded_seq_length, mfu=cfg.mfu,
                        recompute_granularity=cfg.recompute_granularity)
    if cfg.data_path:
        modes, data = _mode_rows(cfg, preset, params, tcfg, progress, lay)
    else:
        n = (cfg.train_iters or 1) * cfg.global_batch_size
        modes, data = [], None
        est = estimate(preset, params.matmul_total, full_sequences(n, lay.padded_seq_length), tcfg)
    selected = next((r for r in modes if r["selected"]), None)
    if selected and selected["steps"] == 0:
        warnings.append(f"{selected['num_sequences']} sequences with --pack-mode {selected['mode']}: fewer than one "
                        f"global batch of {cfg.global_batch_size}, so an epoch has no step (training refuses it)")
    timing = {
        "gpu_peak_tflops": gpu.bf16_tflops, "mfu": cfg.mfu, "bubble": tcfg.bubble,
        "num_microbatches": m,
        "step_seconds": selected["step_seconds"] if selected else est.step_seconds,
        "model_flops_per_step": selected["model_flops_per_step"] if selected else est.model_flops_per_step,
        "basis": f"{selected['mode']} plan of {cfg.data_path}" if selected else
                 "full sequences, one document each (no dataset given)",
    }
    if selected and cfg.train_epochs is not None:
        timing["train_seconds"] = selected["train_seconds"]
    elif not selected and cfg.train_iters:
        timing["train_seconds"] = est.epoch_seconds

    published = PUBLISHED_PARAMETERS.get(preset.name)
    out = {
        "model": preset.name,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "unmodelled_flags"},
        "layout": {"world_size": cfg.world_size, "tp": cfg.tensor_model_parallel_size,
                   "pp": cfg.pipeline_model_parallel_size, "cp": cfg.context_parallel_size, "dp": dp,
                   "num_microbatches": m, "seq_length_padded": lay.padded_seq_length,
                   "layers_per_stage": preset.num_layers // cfg.pipeline_model_parallel_size},
        "gpu": dataclasses.asdict(gpu),
        "total_parameters": params.total,
        "total_parameters_unpadded": params.total_unpadded,
        "published_parameters": published,
        "published_relative_error": (params.total_unpadded - published) / published if published else None,
        "vocab_size": params.vocab_size,
        "padded_vocab_size": params.padded_vocab_size,
        "matmul_parameters": params.matmul_total,
        "per_rank_parameters": [dataclasses.asdict(r) for r in params.per_rank],
        "param_build": {"builder": params.builder, "distinct_ranks": len(params.per_rank),
                        "seconds": params.build_seconds, "notes": params.notes},
        "memory_per_gpu_gb": {k: v for k, v in peak.to_json().items() if k not in ("pp_rank", "parameters",
                                                                                  "microbatches_in_flight")},
        "memory_peak_stage": peak.pp_rank,
        "memory_per_stage_gb": [s.to_json() for s in stages],
        "memory_alternatives_gb": alternatives,
        "gpu_memory_gb": gpu.memory_gib,
        "fits": bool(peak.total <= gpu.memory_gib),
        "timing": timing,
        "data": data,
        "modes": modes,
        "warnings": warnings,
        "unmodelled_flags": list(cfg.unmodelled_flags),
        "plan_seconds": time.perf_counter() - t0,
    }
    return out
