"""Memory per GPU: weights, gradients, optimizer state, activations, per pipeline stage.

Model state, bytes per parameter held by the rank (Megatron-Core DDP + Adam; the table
of Megatron-Core's distributed-optimizer guide)::

                          bf16 run                      fp32 run
    weights               2                             4
    grads (main_grad)     4  (accumulated in fp32)      4
    Adam master, m, v     12  (/ DP*CP distributed)     8  (/ DP*CP distributed)
    total                 18  or  6 + 12/(DP*CP)        16 or  8 + 8/(DP*CP)

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, section 4), redone for a Llama layer (RMSNorm,
GQA with g query groups of d channels, SwiGLU with ffn f, no dropout, no biases) in
bf16. Stored for backward, bytes per token per layer::

    attention  norm input 2h, QKV input 2h, Q K V 2(h + 2gd), proj input 2h  = 8h + 4gd
    MLP        norm input 2h, fc1 input 2h, fc1 out 4f (gate, up), fc2 in 2f = 4h + 6f
    total      12h + 4gd + 6f

Check against the paper's GPT layer (g*d = h, GELU MLP of 4h): 12h + 20h = 32h, their
34h less the two 1-byte-per-element dropout masks a Llama layer does not have.

With sequence parallel everything is split over TP (/t); without it the four "input" terms
of 2h (8h) are replicated on every TP rank and only 4h + 4gd + 6f is split. Packed (THD)
attention runs flash/cuDNN kernels that keep no s x s matrix, so Korthikanti's 5as/h
attention term is absent, and selective recompute (core attention only) saves nothing
more; ``flash_attention=False`` adds the 2*a*s/t bytes of a stored softmax, which
selective recompute removes. Full recompute (every layer) keeps only each layer's input
(2h, /t with SP) plus one layer's full activations while it is recomputed.

1F1B keeps ``min(PP - stage, num_microbatches)`` micro-batches in flight on a stage, so the
first stage holds PP of them (Korthikanti eq. 5: the whole model's worth of layers). The
last stage also holds the logits: bf16 output plus Megatron's fp32 vocab-parallel
cross-entropy copy, 6V/t bytes per token, for one micro-batch.

An ``overhead_gb`` allowance (CUDA context, NCCL buffers, allocator fragmentation) is
added; it is an assumption, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_pack.model.presets import LlamaPreset

GIB = float(2**30)
RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class MemoryConfig:
    tp: int
    pp: int
    cp: int
    dp: int
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    recompute_granularity: Optional[str]
    bf16: bool = True
    flash_attention: bool = True
    overhead_gb: float = 3.0

    def __post_init__(self):
        if self.recompute_granularity not in RECOMPUTE:
            raise ValueError(f"recompute_granularity must be one of {RECOMPUTE}, got {self.recompute_granularity!r}")


@dataclass
class StageMemory:
    """GiB on one GPU of a pipeline stage, by component."""

    pp_rank: int
    parameters: int
    microbatches_in_flight: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}


def state_bytes_per_param(cfg: MemoryConfig) -> dict:
    """Weights, grads, optimizer bytes per parameter this rank holds (see module table)."""
    weights = 2.0 if cfg.bf16 else 4.0
    grads = 4.0
    optim = 12.0 if cfg.bf16 else 8.0
    if cfg.use_distributed_optimizer:
        optim /= cfg.dp * cfg.cp  # Megatron shards over the data-parallel group with CP
    return {"weights": weights, "grads": grads, "optimizer": optim}


def layer_activation_bytes_per_token(preset: LlamaPreset, cfg: MemoryConfig, recompute: Optional[str]) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch (module docstring)."""
    h, f, t = preset.hidden_size, preset.ffn_hidden_size, cfg.tp
    gd = preset.num_query_groups * preset.kv_channels
    replicated = 8.0 * h
    split = 4.0 * h + 4.0 * gd + 6.0 * f
    per_token = (replicated + split) / t if cfg.sequence_parallel else replicated + split / t
    if not cfg.flash_attention and recompute is None:
        # softmax output, bf16, a/t heads, s_local keys per token (causal kernels store it all)
        per_token += 2.0 * preset.num_attention_heads * (cfg.seq_length / cfg.cp) / t
    if recompute == "full":
        return 2.0 * h / t if cfg.sequence_parallel else 2.0 * h
    return per_token


def stage_memory(preset: LlamaPreset, cfg: MemoryConfig, pp_rank: int, parameters: int, num_layers: int,
                 has_output_layer: bool, vocab_padded: int) -> StageMemory:
    b = state_bytes_per_param(cfg)
    tokens = cfg.micro_batch_size * cfg.seq_length / cfg.cp  # tokens of one micro-batch on this rank
    in_flight = min(cfg.pp - pp_rank, cfg.num_microbatches)
    stored = layer_activation_bytes_per_token(preset, cfg, cfg.recompute_granularity) * tokens * num_layers * in_flight
    if cfg.recompute_granularity == "full":
        # the layer being recomputed materialises its full activations once
        stored += layer_activation_bytes_per_token(preset, cfg, None) * tokens
    logits = 0.0
    if has_output_layer:
        t = cfg.tp
        norm_and_head_inputs = (4.0 * preset.hidden_size / t) if cfg.sequence_parallel else 4.0 * preset.hidden_size
        logits = tokens * (norm_and_head_inputs + 6.0 * vocab_padded / t)
    return StageMemory(
        pp_rank=pp_rank, parameters=parameters, microbatches_in_flight=in_flight,
        weights=parameters * b["weights"] / GIB, grads=parameters * b["grads"] / GIB,
        optimizer=parameters * b["optimizer"] / GIB, activations=stored / GIB, logits=logits / GIB,
        overhead=cfg.overhead_gb,
    )


def plan_memory(preset: LlamaPreset, cfg: MemoryConfig, params) -> list:
    """One :class:`StageMemory` per pipeline stage from a ``ParamReport`` (its largest TP rank)."""
    out = []
    for s in range(cfg.pp):
        r = max(params.stage_ranks(s), key=lambda x: x.parameters)
        out.append(stage_memory(preset, cfg, s, r.parameters, r.num_layers, r.has_output_layer,
                                params.padded_vocab_size))
    return out
