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
from megatron_pack.parallel.layout import check_layout
from megatron_pack.planning.catalogue import get_gpu
from megatron_pack.planning.context_parallel import cp_options, exposed_seconds, kv_exchange, smallest_fitting_cp
from megatron_pack.planning.memory import RECOMPUTE, MemoryConfig, plan_memory
from megatron_pack.planning.timing import DEFAULT_MFU, TimingConfig, estimate, full_sequences, plan_stats

#: Published sizes (unpadded vocabulary, untied output layer) the built totals are checked against.
PUBLISHED_PARAMETERS = {"llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.55e9,
                        "qwen2.5-7b": 7.61e9, "qwen2.5-72b": 72.7e9, "mistral-7b": 7.25e9}


class CannotRunError(ValueError):
    """The layout is legal but the data gives training nothing to do (no step in an epoch)."""


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
    balance_batches: Optional[bool] = None
    """Training's --balance-batches: which placement's per-step imbalance the run pays
    (``step_seconds_as_run`` of each mode); default as training: on when DP > 1 or PP > 1."""
    gpu: str = "a800-80gb"
    mfu: float = DEFAULT_MFU
    overhead_gb: float = 3.0
    """CUDA context + NCCL buffers + fragmentation allowance per GPU (an assumption)."""
    flash_attention: bool = True
    data_path: Optional[str | list] = None
    """One prefix, or a blend as the training CLI takes it (``["0.7", "A", "0.3", "B"]``)."""
    pack_mode: str = "bfd"
    pack_scope: str = "epoch"
    """Training's --pack-scope; ``step`` adds (and selects) the per-step packing row."""
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
    from megatron_pack.data.packed_dataset import required_multiple  # torch: only once the layout is legal

    mult = required_multiple(tp, cp, cfg.sequence_parallel)
    if cp > 1 and cfg.seq_length % mult:
        raise LayoutError(f"--seq-length {cfg.seq_length} must be a multiple of {mult} under "
                          f"--context-parallel-size {cp} (every document splits into 2*CP chunks, each over TP "
                          "with sequence parallel)")
    s = -(-cfg.seq_length // mult) * mult
    if s != cfg.seq_length:
        warnings.append(f"sequences padded from --seq-length {cfg.seq_length} to {s} (a multiple of {mult} "
                        f"for sequence/context parallel)")
    return Layout(dp, m, s, tuple(warnings))


def _balance_on(cfg: PlanConfig, lay: Layout) -> bool:
    """--balance-batches as training resolves it (training/loop.py): on when DP > 1 or PP > 1."""
    if cfg.balance_batches is not None:
        return bool(cfg.balance_batches)
    return lay.data_parallel_size > 1 or cfg.pipeline_model_parallel_size > 1


def _vocab(cfg: PlanConfig, preset) -> int:
    from megatron_pack.model.vocab import resolve_vocab_size

    if not cfg.data_path:
        return resolve_vocab_size(cfg.vocab_size, None, preset, None)
    # a blend: the rule per source, as training resolves it
    return max(resolve_vocab_size(cfg.vocab_size, None, preset, p) for p in _prefixes(cfg.data_path))


def _memory_config(cfg: PlanConfig, lay: Layout, **over) -> MemoryConfig:
    kw = dict(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size, cp=cfg.context_parallel_size,
              dp=lay.data_parallel_size, seq_length=lay.padded_seq_length, micro_batch_size=cfg.micro_batch_size,
              num_microbatches=lay.num_microbatches,
              sequence_parallel=cfg.sequence_parallel, use_distributed_optimizer=cfg.use_distributed_optimizer,
              recompute_granularity=cfg.recompute_granularity, bf16=cfg.bf16,
              flash_attention=cfg.flash_attention, overhead_gb=cfg.overhead_gb)
    kw.update(over)
    return MemoryConfig(**kw)


def _prefixes(data_path) -> list:
    """The source prefixes of ``--data-path`` (one prefix, or a Megatron-LM blend list)."""
    from megatron_pack.data.blend import parse_blend

    return [data_path] if isinstance(data_path, str) else list(parse_blend(data_path).prefixes)


def _train_split(cfg: PlanConfig) -> tuple[list, int]:
    """The training part of every source, split by --valid-fraction exactly as training splits
    it (each source on its own); ``(parts, held-out conversations)``."""
    from megatron_pack.data.sampling import SFTSubset, split_indices
    from megatron_pack.files.indexed import SFTIndexedDataset

    parts, held_out = [], 0
    for prefix in _prefixes(cfg.data_path):
        base = SFTIndexedDataset(prefix)
        train_idx, _ = split_indices(len(base), cfg.valid_fraction, cfg.seed)
        if train_idx.size == 0:
            raise ValueError(f"{prefix}: no training conversations after holding out "
                             f"--valid-fraction {cfg.valid_fraction} of {len(base)}")
        parts.append(SFTSubset(base, train_idx))
        held_out += len(base) - train_idx.size
    return parts, held_out


def _train_dataset(cfg: PlanConfig, parts: list, mode: str):
    """Epoch 0 of the training stream for ``mode``, built by the classes training builds it with
    (:class:`PackedSFTDataset` per source, :class:`BlendedPackedDataset` over a blend), so
    the planner's plan is the trainer's: the same split, over-long policy, per-document padding,
    and items without a trained target left out. Plans in memory (no cache files written)."""
    from megatron_pack.data.blend import BlendedPackedDataset, parse_blend
    from megatron_pack.data.context_parallel import document_multiple
    from megatron_pack.data.packed_dataset import PackedSFTDataset

    kw = dict(seed=cfg.seed, overlong=cfg.overlong, document_mask=cfg.document_mask, use_cache=False,
              document_multiple=document_multiple(cfg.context_parallel_size, cfg.tensor_model_parallel_size,
                                                  cfg.sequence_parallel))
    if isinstance(cfg.data_path, str):
        return PackedSFTDataset(parts[0], cfg.seq_length, mode, **kw)
    blend = parse_blend(cfg.data_path)
    return BlendedPackedDataset([lambda e, x=x: PackedSFTDataset(x, cfg.seq_length, mode, epoch=e, **kw)
                                 for x in parts], blend.names, blend.weights)


def _mode_rows(cfg: PlanConfig, preset, params, tcfg: TimingConfig, progress: bool,
               lay: Layout | None = None) -> tuple[list, dict]:
    from megatron_pack.data.balance_forecast import forecast
    from megatron_pack.model.cost import CostModel
    from megatron_pack.packing.plan import get_mode

    parts, held_out = _train_split(cfg)
    num_conversations = sum(len(x) for x in parts)
    tokens = sum(int(x.lengths.sum()) for x in parts)
    modes = list(cfg.modes)
    if get_mode(cfg.pack_mode).name not in [get_mode(x).name for x in modes]:
        modes.append(cfg.pack_mode)
    rows = []
    for spec in modes:
        t0 = time.perf_counter()
        plan = _train_dataset(cfg, parts, spec).plan
        stats = plan_stats(plan, document_mask=cfg.document_mask, pad_attention=cfg.pad_attention)
        est = estimate(preset, params.matmul_total, stats, tcfg)
        rows.append({"mode": str(get_mode(spec)), "selected": get_mode(spec) == get_mode(cfg.pack_mode),
                     "efficiency": float(plan.efficiency), "real_tokens": stats.real_tokens,
                     "attention_sum_sq": stats.sum_sq, "plan_seconds": time.perf_counter() - t0, **est.to_json()})
        if lay is not None and not cfg.pad_attention:
            # per-step imbalance over DP ranks: the step waits for the slowest rank
            cost = CostModel.from_architecture(preset, matmul_params=params.matmul_total,
                                               cp=cfg.context_parallel_size)
            f = forecast(plan, cost, global_batch_size=cfg.global_batch_size, dp_size=lay.data_parallel_size,
                         micro_batch_size=cfg.micro_batch_size, padded_length=lay.padded_seq_length,
                         document_mask=cfg.document_mask, seed=cfg.seed)
            balanced = est.step_seconds * f.slowdown_balanced
            contiguous = est.step_seconds * f.slowdown_contiguous
            rows[-1].update({"balance": f.to_json(), "step_seconds_contiguous": contiguous,
                             "step_seconds_balanced": balanced,
                             "step_seconds_as_run": balanced if _balance_on(cfg, lay) else contiguous})
    if cfg.pack_scope == "step":
        from megatron_pack.planning.step_scope import step_scope_row

        if not isinstance(cfg.data_path, str):
            raise ValueError("--pack-scope step takes one dataset prefix, not a blend")
        for r in rows:
            r["selected"] = False
        rows.append({**step_scope_row(cfg, parts[0], preset, params.matmul_total, tcfg, tcfg.num_gpus // (
            cfg.model_parallel_size), lay.padded_seq_length if lay else cfg.seq_length), "selected": True})
    base = next((r for r in rows if r["mode"] == "padding"), None)
    for r in rows:
        r["time_vs_padding"] = r["epoch_seconds"] / base["epoch_seconds"] if base and base["steps"] and r["steps"] else None
        if cfg.train_epochs is not None:  # as training counts them (epochs_to_iters), from epoch 0's plan
            whole, frac = int(cfg.train_epochs), cfg.train_epochs - int(cfg.train_epochs)
            r["train_steps"] = whole * r["steps"] + int(r["steps"] * frac)
            r["train_seconds"] = r["train_steps"] * r["step_seconds"]
    info = {"data_path": cfg.data_path if isinstance(cfg.data_path, str) else " ".join(map(str, cfg.data_path)),
            "num_conversations": num_conversations, "tokens": tokens,
            "valid_fraction": cfg.valid_fraction, "held_out_conversations": held_out,
            "document_mask": cfg.document_mask, "pad_attention": cfg.pad_attention, "overlong": cfg.overlong}
    return rows, info


def make_plan(cfg: PlanConfig, progress: bool = False) -> dict:
    """The whole plan as a JSON-ready dict (see ``render`` for the printed form)."""
    t0 = time.perf_counter()
    preset = get_preset(cfg.model)
    gpu = get_gpu(cfg.gpu)
    lay = validate_layout(cfg)  # before the model build: an illegal layout answers in well under a second
    from megatron_pack.planning.params import count_parameters  # imports Megatron-Core

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

    def peak_at(c: PlanConfig) -> float:
        return max(st.total for st in plan_memory(preset, _memory_config(c, validate_layout(c)), params))

    options = cp_options(cfg, peak_at)
    proposed_cp = smallest_fitting_cp(options, gpu.memory_gib)

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
    if selected and selected["steps"] == 0:  # training stops on it (data.sampling.TrainStream): so does the plan
        raise CannotRunError(f"cannot run: an epoch of --pack-mode {selected['mode']} has {selected['num_sequences']} "
                             f"sequences, fewer than one global batch of {cfg.global_batch_size}; lower "
                             f"--global-batch-size or give more data")
    timing = {
        "gpu_peak_tflops": gpu.bf16_tflops, "mfu": cfg.mfu, "bubble": tcfg.bubble,
        "num_microbatches": m,
        "step_seconds": selected["step_seconds"] if selected else est.step_seconds,
        "model_flops_per_step": selected["model_flops_per_step"] if selected else est.model_flops_per_step,
        "basis": f"{selected['mode']} plan of {data['data_path']}" if selected else
                 "full sequences, one document each (no dataset given)",
    }
    exchange = kv_exchange(preset, gpu, tp=cfg.tensor_model_parallel_size, cp=cfg.context_parallel_size,
                           pp=cfg.pipeline_model_parallel_size, seq_length=lay.padded_seq_length,
                           micro_batch_size=cfg.micro_batch_size, num_microbatches=m,
                           gpus_per_node=cfg.gpus_per_node)
    exchange["exposed_seconds_per_step"] = exposed_seconds(
        exchange, timing["step_seconds"], selected["attention_share"] if selected else est.attention_share)
    timing["cp_kv_exchange"] = exchange
    timing["step_seconds"] += exchange["exposed_seconds_per_step"]
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
                   "balance_batches": _balance_on(cfg, lay),
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
        "cp_options_gb": options,
        "proposed_cp": proposed_cp,
        "timing": timing,
        "data": data,
        "modes": modes,
        "warnings": warnings,
        "unmodelled_flags": list(cfg.unmodelled_flags),
        "plan_seconds": time.perf_counter() - t0,
    }
    return out
