"""A cluster plan: validate the layout, count parameters, size memory, estimate time.

``make_plan(PlanConfig(...))`` returns the plan as a JSON-ready dict; ``render`` prints it.
Parameters come from the real Megatron-Core model built per rank on the meta device
(:mod:`.params`), memory from :mod:`.memory`, time from :mod:`.step_time`; with a dataset every
packing mode is planned on it and costed side by side (the shape of the training-time
table of "Packing Analysis", arXiv 2410.08081, from our own plans).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from megatron_pack.config.cli import build_spec, spec_fields
from megatron_pack.config.spec import LayoutError, RunSpec, arg, need, parse_mode  # noqa: F401 (LayoutError: API)
from megatron_pack.model.presets import get_preset
from megatron_pack.packing.modes import DEFAULT_MODES, PAPER_MODES
from megatron_pack.planning.catalogue import get_gpu
from megatron_pack.planning.cp_exchange import cp_options, exposed_seconds, kv_exchange, smallest_fitting_cp
from megatron_pack.planning.memory import RECOMPUTE, MemoryConfig, plan_memory
from megatron_pack.planning.step_time import DEFAULT_MFU, TimingConfig, estimate, full_sequences, plan_stats

#: Published sizes (unpadded vocabulary, untied output layer) the built totals are checked against.
PUBLISHED_PARAMETERS = {"llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.55e9,
                        "qwen2.5-7b": 7.61e9, "qwen2.5-72b": 72.7e9, "mistral-7b": 7.25e9}


class CannotRunError(ValueError):
    """The layout is legal but the data gives training nothing to do (no step in an epoch)."""


#: The planner's table rows: the paper's four settings, then every other registered mode.
PLANNED_MODES = PAPER_MODES + tuple(m for m in DEFAULT_MODES if m not in PAPER_MODES)


@dataclass
class ClusterArgs:
    """The cluster and the cost model: what the planner adds to the run spec."""

    nnodes: int = arg(1, "Nodes.")
    gpus_per_node: int = arg(8, "GPUs per node.")
    gpu: str = arg("a800-80gb", "A800-80GB, A100-80GB, H100-80GB, H200 (or a800, a100, h100, h200).")
    mfu: float = arg(DEFAULT_MFU, f"Assumed model FLOP utilisation while computing (default {DEFAULT_MFU:.2f}).")
    overhead_gb: float = arg(3.0, "Per-GPU allowance for CUDA context, NCCL buffers and fragmentation (an "
                                  "assumption).")
    flash_attention: bool = arg(True, "Attention kernels keep no s x s scores (TE / flash-attn; the THD path).")
    modes: str = arg(",".join(PLANNED_MODES), "Packing modes to compare, comma-separated.")
    pad_attention: bool = arg(False, "Cost attention as S^2 per sequence (a BSHD kernel over padding) instead of "
                                     "real segments.")

    def __post_init__(self):
        for name in ("nnodes", "gpus_per_node"):
            need(getattr(self, name) >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.modes, str):  # a tuple of mode strings (library callers)
            self.modes = ",".join(self.modes)
        self._mode_names = tuple(m for m in self.modes.split(",") if m)
        self._modes = tuple(parse_mode(m, "--modes") for m in self._mode_names)

    @property
    def mode_names(self) -> tuple:
        return self._mode_names

    @property
    def parsed_modes(self) -> tuple:
        return self._modes


#: Spec fields the planner models, in the order of the plan's "config" record; every other
#: training flag is accepted and listed as not modelled. (The cluster fields come from ClusterArgs.)
MODELLED = ("model", "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
            "sequence_parallel", "use_distributed_optimizer", "recompute_granularity", "bf16", "seq_length",
            "micro_batch_size", "global_batch_size", "vocab_size", "balance_batches", "data_path", "pack_mode",
            "pack_scope", "document_mask", "overlong", "valid_fraction", "seed", "train_epochs", "train_iters")
#: Modelled without a figure of their own: accepted so launch scripts can pass them (the vocabulary
#: comes from --tokenizer-model; CP is costed as TE's ring whatever --cp-comm-type).
ACCEPTED = ("tokenizer_model", "cp_comm_type")
#: The planner's defaults where training has none that fits a costing (training: per device).
PLANNER_DEFAULTS = {"model": "llama3-70b", "global_batch_size": 64, "bf16": True, "use_distributed_optimizer": False}
_JSON_ORDER = ("model", "nnodes", "gpus_per_node", "tensor_model_parallel_size", "pipeline_model_parallel_size",
               "context_parallel_size", "sequence_parallel", "use_distributed_optimizer", "recompute_granularity",
               "bf16", "seq_length", "micro_batch_size", "global_batch_size", "vocab_size", "balance_batches", "gpu",
               "mfu", "overhead_gb", "flash_attention", "data_path", "pack_mode", "pack_scope", "modes",
               "document_mask", "pad_attention", "overlong", "valid_fraction", "seed", "train_epochs", "train_iters")


@dataclass
class PlanConfig:
    """A run to plan: the run spec (the training CLI's fields) and the cluster."""

    spec: RunSpec
    cluster: ClusterArgs = field(default_factory=ClusterArgs)
    unmodelled_flags: list = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.cluster.nnodes * self.cluster.gpus_per_node

    def with_cp(self, cp: int) -> "PlanConfig":
        """The same run at context parallel size ``cp`` (re-checked as the spec checks it)."""
        par = dataclasses.replace(self.spec.parallel, context_parallel_size=cp)
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, parallel=par))

    def with_mode(self, mode: str) -> RunSpec:
        """The run spec with ``--pack-mode mode`` over the whole epoch (``--pack-scope step``'s
        row is :func:`_step_row`)."""
        d = self.spec.data
        return dataclasses.replace(self.spec, data=dataclasses.replace(
            d, packing=dataclasses.replace(d.packing, pack_mode=mode, pack_scope="epoch")))

    def to_json(self) -> dict:
        """The plan's "config" record: every modelled value, flat, by flag name."""
        leaves = spec_fields()
        out = {}
        for name in _JSON_ORDER:
            if name == "modes":
                out[name] = list(self.cluster.mode_names)
            elif hasattr(self.cluster, name):
                out[name] = getattr(self.cluster, name)
            else:
                value = self.spec
                for part in leaves[name][0]:
                    value = getattr(value, part)
                out[name] = value
        return out


def plan_config(unmodelled_flags=(), **flat) -> PlanConfig:
    """A :class:`PlanConfig` from flat field names (``tensor_model_parallel_size=8, nnodes=4``),
    with the planner's defaults; spec checks raise :class:`ConfigError` naming the flag."""
    cluster_names = {f.name for f in dataclasses.fields(ClusterArgs)}
    cluster = ClusterArgs(**{k: v for k, v in flat.items() if k in cluster_names})
    leaves = spec_fields()
    values = {}
    for name, value in {**PLANNER_DEFAULTS, **{k: v for k, v in flat.items() if k not in cluster_names}}.items():
        if name not in leaves:
            raise TypeError(f"plan_config: unknown field {name!r}")
        values["__".join(leaves[name][0])] = value
    return PlanConfig(build_spec(values), cluster, list(unmodelled_flags))


@dataclass(frozen=True)
class Layout:
    data_parallel_size: int
    num_microbatches: int
    padded_seq_length: int
    """S: --seq-length padded up to what SP (TP) and CP (2*CP) need, as the dataset does."""
    warnings: tuple


def validate_layout(cfg: PlanConfig) -> Layout:
    """The derived sizes of a legal layout; raises :class:`LayoutError` listing every reason
    (the same check and line as training's, :meth:`RunSpec.resolve`)."""
    spec, par = cfg.spec, cfg.spec.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    sizes = spec.resolve(cfg.world_size, architecture=get_preset(spec.model.model))
    dp, m = sizes.data_parallel_size, sizes.num_microbatches
    gpn, warnings = cfg.cluster.gpus_per_node, []
    if tp > gpn:
        warnings.append(f"TP {tp} spans nodes ({gpn} GPUs per node): its all-reduces leave NVLink")
    if tp > 1 and not par.sequence_parallel:
        warnings.append("TP > 1 without --sequence-parallel: norm/residual activations are replicated on every "
                        "TP rank")
    if pp > 1 and m < pp:
        warnings.append(f"{m} micro-batches per step for {pp} pipeline stages: the bubble (PP-1)/M = "
                        f"{(pp - 1) / m:.0%} dominates")
    if par.use_distributed_optimizer and dp * cp == 1:
        warnings.append("--use-distributed-optimizer with DP*CP = 1 shards nothing")
    from megatron_pack.data.packed_dataset import required_multiple  # torch: only once the layout is legal

    mult = required_multiple(tp, cp, par.sequence_parallel)
    seq = spec.data.seq_length
    s = -(-seq // mult) * mult
    if s != seq:
        warnings.append(f"sequences padded from --seq-length {seq} to {s} (a multiple of {mult} "
                        f"for sequence/context parallel)")
    return Layout(dp, m, s, tuple(warnings))


def _vocab(cfg: PlanConfig, preset) -> int:
    from megatron_pack.model.vocab import resolve_vocab_size

    m, blend = cfg.spec.model, cfg.spec.data.train_blend
    if blend is None:
        return resolve_vocab_size(m.vocab_size, m.tokenizer_path, preset, None)
    # a blend: the rule per source, as training resolves it
    return max(resolve_vocab_size(m.vocab_size, m.tokenizer_path, preset, p) for p in blend.prefixes)


def _memory_config(cfg: PlanConfig, lay: Layout, **over) -> MemoryConfig:
    par, m, c = cfg.spec.parallel, cfg.spec.model, cfg.cluster
    kw = dict(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, cp=par.context_parallel_size,
              dp=lay.data_parallel_size, seq_length=lay.padded_seq_length,
              micro_batch_size=cfg.spec.train.micro_batch_size, num_microbatches=lay.num_microbatches,
              sequence_parallel=par.sequence_parallel, use_distributed_optimizer=par.use_distributed_optimizer,
              recompute_granularity=m.recompute_granularity, bf16=m.bf16,
              flash_attention=c.flash_attention, overhead_gb=c.overhead_gb)
    kw.update(over)
    return MemoryConfig(**kw)


def _modes(cfg: PlanConfig) -> list:
    """The mode strings to cost: --modes, and --pack-mode when it is not among them."""
    modes = list(cfg.cluster.mode_names)
    if cfg.spec.data.packing.mode.name not in [m.name for m in cfg.cluster.parsed_modes]:
        modes.append(cfg.spec.data.packing.pack_mode)
    return modes


def _mode_row(cfg: PlanConfig, preset, params, tcfg: TimingConfig, lay: Layout, spec: RunSpec) -> tuple:
    """One mode's figures, on epoch 0 of the training stream training builds (the same split,
    over-long policy, per-document padding, blend; plans in memory, no cache files written)."""
    from megatron_pack.config.datasets import build_datasets
    from megatron_pack.data.balance import balance_on
    from megatron_pack.data.balance_forecast import forecast
    from megatron_pack.model.cost import CostModel

    t0 = time.perf_counter()
    c, t, mode = cfg.cluster, spec.train, spec.data.packing.mode
    document_mask = spec.data.packing.document_mask
    ds = build_datasets(spec, use_cache=False, with_valid=False)
    plan = ds.train.plan
    stats = plan_stats(plan, document_mask=document_mask, pad_attention=c.pad_attention)
    est = estimate(preset, params.matmul_total, stats, tcfg)
    row = {"mode": str(mode), "selected": mode == cfg.spec.data.packing.mode,
           "efficiency": float(plan.efficiency), "real_tokens": stats.real_tokens,
           "attention_sum_sq": stats.sum_sq, "plan_seconds": time.perf_counter() - t0, **est.to_json()}
    if not c.pad_attention:
        # per-step imbalance over DP ranks: the step waits for the slowest rank
        par = spec.parallel
        cost = CostModel.from_architecture(preset, matmul_params=params.matmul_total, cp=par.context_parallel_size)
        f = forecast(plan, cost, global_batch_size=t.global_batch_size, dp_size=lay.data_parallel_size,
                     micro_batch_size=t.micro_batch_size, padded_length=lay.padded_seq_length,
                     document_mask=document_mask, seed=t.seed)
        balanced = est.step_seconds * f.slowdown_balanced
        contiguous = est.step_seconds * f.slowdown_contiguous
        on = balance_on(t.balance_batches, lay.data_parallel_size, par.pipeline_model_parallel_size)
        row.update({"balance": f.to_json(), "step_seconds_contiguous": contiguous,
                    "step_seconds_balanced": balanced, "step_seconds_as_run": balanced if on else contiguous})
    return row, ds


def _step_row(cfg: PlanConfig, preset, params, tcfg: TimingConfig, lay: Layout) -> dict:
    """``--pack-scope step``'s row (``bfd per step``, selected): the padded run's steps each packed,
    on the dataset training builds for that scope."""
    from megatron_pack.config.datasets import build_datasets
    from megatron_pack.planning.step_scope import step_scope_row

    spec = cfg.spec
    ds = build_datasets(spec, use_cache=False, with_valid=False).train
    row = step_scope_row(ds, preset, params.matmul_total, tcfg, dp=lay.data_parallel_size,
                         micro_batch_size=spec.train.micro_batch_size, padded_length=lay.padded_seq_length,
                         document_mask=spec.data.packing.document_mask, pad_attention=cfg.cluster.pad_attention)
    return {**row, "selected": True}


def _mode_rows(cfg: PlanConfig, preset, params, tcfg: TimingConfig, lay: Layout) -> tuple[list, dict]:
    d, p = cfg.spec.data, cfg.spec.data.packing
    built = [_mode_row(cfg, preset, params, tcfg, lay, cfg.with_mode(m)) for m in _modes(cfg)]
    rows, counted = [r for r, _ in built], built[0][1]  # the split is the same for every mode
    if p.pack_scope == "step":  # the per-step row is the run's; the epoch rows stay for comparison
        for r in rows:
            r["selected"] = False
        rows.append(_step_row(cfg, preset, params, tcfg, lay))
    base = next((r for r in rows if r["mode"] == "padding"), None)
    epochs = cfg.spec.train.train_epochs
    for r in rows:
        comparable = base and base["steps"] and r["steps"]
        r["time_vs_padding"] = r["epoch_seconds"] / base["epoch_seconds"] if comparable else None
        if epochs is not None:  # as training counts them (epochs_to_iters), from epoch 0's plan
            whole, frac = int(epochs), epochs - int(epochs)
            r["train_steps"] = whole * r["steps"] + int(r["steps"] * frac)
            r["train_seconds"] = r["train_steps"] * r["step_seconds"]
    info = {"data_path": d.data_path if isinstance(d.data_path, str) else " ".join(map(str, d.data_path)),
            "num_conversations": counted.num_train_conversations, "tokens": counted.train_tokens,
            "valid_fraction": d.valid_fraction, "held_out_conversations": counted.num_valid_conversations,
            "document_mask": p.document_mask, "pad_attention": cfg.cluster.pad_attention, "overlong": p.overlong}
    return rows, info


@dataclass
class Memory:
    stages: list
    """Per pipeline stage (:func:`~megatron_pack.planning.memory.plan_memory`)."""
    alternatives: list
    """Peak GiB with sequence parallel / distributed optimizer / recomputation toggled."""
    cp_options: list
    proposed_cp: int | None

    @property
    def peak(self):
        return max(self.stages, key=lambda st: st.total)


@dataclass
class Plan:
    """A cluster plan; :meth:`to_json` is the JSON the planner writes and ``render`` prints."""

    cfg: PlanConfig
    preset: object
    gpu: object
    layout: Layout
    params: object
    memory: Memory
    timing: dict
    data: dict | None
    modes: list
    plan_seconds: float

    @property
    def fits(self) -> bool:
        return bool(self.memory.peak.total <= self.gpu.memory_gib)

    def to_json(self) -> dict:
        cfg, par, lay, params, peak = self.cfg, self.cfg.spec.parallel, self.layout, self.params, self.memory.peak
        published = PUBLISHED_PARAMETERS.get(self.preset.name)
        return {
            "model": self.preset.name,
            "config": cfg.to_json(),
            "layout": {"world_size": cfg.world_size, "tp": par.tensor_model_parallel_size,
                       "pp": par.pipeline_model_parallel_size, "cp": par.context_parallel_size,
                       "dp": lay.data_parallel_size, "num_microbatches": lay.num_microbatches,
                       "seq_length_padded": lay.padded_seq_length, "balance_batches": _balance_on(cfg, lay),
                       "layers_per_stage": self.preset.num_layers // par.pipeline_model_parallel_size},
            "gpu": dataclasses.asdict(self.gpu),
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
            "memory_per_gpu_gb": {k: v for k, v in peak.to_json().items()
                                  if k not in ("pp_rank", "parameters", "microbatches_in_flight")},
            "memory_peak_stage": peak.pp_rank,
            "memory_per_stage_gb": [st.to_json() for st in self.memory.stages],
            "memory_alternatives_gb": self.memory.alternatives,
            "gpu_memory_gb": self.gpu.memory_gib,
            "fits": self.fits,
            "cp_options_gb": self.memory.cp_options,
            "proposed_cp": self.memory.proposed_cp,
            "timing": self.timing,
            "data": self.data,
            "modes": self.modes,
            "warnings": list(lay.warnings),
            "unmodelled_flags": list(cfg.unmodelled_flags),
            "plan_seconds": self.plan_seconds,
        }


def _balance_on(cfg: PlanConfig, lay: Layout) -> bool:
    from megatron_pack.data.balance import balance_on

    return balance_on(cfg.spec.train.balance_batches, lay.data_parallel_size,
                      cfg.spec.parallel.pipeline_model_parallel_size)


def _memory(cfg: PlanConfig, preset, lay: Layout, params, gpu) -> Memory:
    stages = plan_memory(preset, _memory_config(cfg, lay), params)
    alternatives = []
    sp_options = (False, True) if cfg.spec.parallel.tensor_model_parallel_size > 1 else (False,)
    for sp in sp_options:
        for dist_opt in (False, True):
            row = {"sequence_parallel": sp, "use_distributed_optimizer": dist_opt}
            for rc in RECOMPUTE:
                mc = _memory_config(cfg, lay, sequence_parallel=sp, use_distributed_optimizer=dist_opt,
                                    recompute_granularity=rc)
                row[rc or "none"] = max(st.total for st in plan_memory(preset, mc, params))
            alternatives.append(row)

    def peak_at(c: PlanConfig) -> float:
        return max(st.total for st in plan_memory(preset, _memory_config(c, validate_layout(c)), params))

    options = cp_options(cfg, peak_at)
    return Memory(stages, alternatives, options, smallest_fitting_cp(options, gpu.memory_gib))


def _timing(cfg: PlanConfig, preset, gpu, lay: Layout, params, tcfg: TimingConfig, selected, est) -> dict:
    """The step time of the selected mode's plan (or of full sequences without a dataset), plus
    the K/V exchange context parallelism leaves exposed."""
    par, t = cfg.spec.parallel, cfg.spec.train
    m = lay.num_microbatches
    timing = {
        "gpu_peak_tflops": gpu.bf16_tflops, "mfu": cfg.cluster.mfu, "bubble": tcfg.bubble,
        "num_microbatches": m,
        "step_seconds": selected["step_seconds"] if selected else est.step_seconds,
        "model_flops_per_step": selected["model_flops_per_step"] if selected else est.model_flops_per_step,
        "basis": f"{selected['mode']} plan of {selected['data_path']}" if selected else
                 "full sequences, one document each (no dataset given)",
    }
    exchange = kv_exchange(preset, gpu, tp=par.tensor_model_parallel_size, cp=par.context_parallel_size,
                           pp=par.pipeline_model_parallel_size, seq_length=lay.padded_seq_length,
                           micro_batch_size=t.micro_batch_size, num_microbatches=m,
                           gpus_per_node=cfg.cluster.gpus_per_node)
    exchange["exposed_seconds_per_step"] = exposed_seconds(
        exchange, timing["step_seconds"], selected["attention_share"] if selected else est.attention_share)
    timing["cp_kv_exchange"] = exchange
    timing["step_seconds"] += exchange["exposed_seconds_per_step"]
    if selected and t.train_epochs is not None:
        timing["train_seconds"] = selected["train_seconds"]
    elif not selected and t.train_iters:
        timing["train_seconds"] = est.epoch_seconds
    return timing


def make_plan(cfg: PlanConfig, progress: bool = False) -> Plan:
    """The whole plan (see :meth:`Plan.to_json` for the JSON, ``render`` for the printed form)."""
    t0 = time.perf_counter()
    spec, par, t = cfg.spec, cfg.spec.parallel, cfg.spec.train
    preset = get_preset(spec.model.model)
    gpu = get_gpu(cfg.cluster.gpu)
    lay = validate_layout(cfg)  # before the model build: an illegal layout answers in well under a second
    from megatron_pack.planning.params import count_parameters  # imports Megatron-Core

    params = count_parameters(preset, tensor_model_parallel_size=par.tensor_model_parallel_size,
                              pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                              context_parallel_size=par.context_parallel_size, world_size=cfg.world_size,
                              vocab_size=_vocab(cfg, preset), progress=progress)
    memory = _memory(cfg, preset, lay, params, gpu)
    tcfg = TimingConfig(gpu=gpu, num_gpus=cfg.world_size, pp=par.pipeline_model_parallel_size,
                        num_microbatches=lay.num_microbatches, global_batch_size=t.global_batch_size,
                        seq_length=lay.padded_seq_length, mfu=cfg.cluster.mfu,
                        recompute_granularity=spec.model.recompute_granularity)
    est = None
    if spec.data.train_blend is not None:
        modes, data = _mode_rows(cfg, preset, params, tcfg, lay)
    else:
        modes, data = [], None
        est = estimate(preset, params.matmul_total, full_sequences((t.train_iters or 1) * t.global_batch_size,
                                                                   lay.padded_seq_length), tcfg)
    selected = next((r for r in modes if r["selected"]), None)
    if selected and selected["steps"] == 0:  # training stops on it (data.sampling.TrainStream): so does the plan
        raise CannotRunError(f"cannot run: an epoch of --pack-mode {selected['mode']} has {selected['num_sequences']} "
                             f"sequences, fewer than one global batch of {t.global_batch_size}; lower "
                             f"--global-batch-size or give more data")
    basis = dict(selected, data_path=data["data_path"]) if selected else None
    timing = _timing(cfg, preset, gpu, lay, params, tcfg, basis, est)
    return Plan(cfg, preset, gpu, lay, params, memory, timing, data, modes, time.perf_counter() - t0)
