"""Step and epoch time from model FLOPs, an assumed utilisation and the pipeline bubble.

FLOPs of one training sequence (forward + backward = 3 x forward), from
:class:`megatron_pack.model.cost.CostModel` (the formula the batch balancer uses too)::

    dense      6 * N_matmul * S                 every position of the S-token sequence,
                                                padding included (the sequence is computed
                                                whole); N_matmul = 2-D weights bar the input
                                                embedding, padded vocab (what is computed)
    attention  6 * L * a * d * sum_i s_i^2      QK^T and AV are 2*s^2*a*d each forward; the
                                                kernels are causal and skip the upper
                                                triangle, so we count half the square
                                                (Megatron's MFU formula counts the full
                                                square, 12 * L * h * s^2)

``s_i`` are the attention segments: with the document mask, each piece of the plan (one
sample or slice, its own cu_seqlens segment); without it, the real tokens of the whole
sequence (cu_seqlens = [0, real]); with ``pad_attention`` (a BSHD kernel over the padded
batch), S for every sequence. Without a dataset, every sequence is one S-token document.
The padding tail of a sequence (a segment of its own in the THD row) is left out here; the
batch balancer (:mod:`megatron_pack.data.balance`) counts it, since it decides per sequence.

Recompute executes more than the model FLOPs: full recompute one more forward (+1/3 of
everything), selective the attention forward (+1/3 of attention).

    step time = executed FLOPs per step / (GPUs * peak * MFU) * (1 + (PP - 1) / M)

M = micro-batches per step per pipeline; (PP - 1) / M is 1F1B's bubble. An epoch is
floor(sequences / global batch) steps: training drops the last partial batch. ``mfu`` is the
fraction of peak sustained while computing. The default 0.40 sits at the low end of what
Megatron-LM publishes for large GPT models on A100: 44-52% of peak for 1B-1T models
(Narayanan et al. 2021, arXiv 2104.04473, Table 1) and 41.5-56.3% MFU for 22B-1T with
sequence parallel + selective recompute (Korthikanti et al. 2022, arXiv 2205.05198,
Table 5). SFT's short packed documents and variable batches make the low end the honest
default; override it with a measured figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_pack.data.balance import sequence_sum_sq
from megatron_pack.model.cost import CostModel
from megatron_pack.model.presets import LlamaPreset
from megatron_pack.planning.catalogue import GPUSpec

DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class TimingConfig:
    gpu: GPUSpec
    num_gpus: int
    pp: int
    num_microbatches: int
    global_batch_size: int
    seq_length: int
    mfu: float = DEFAULT_MFU
    recompute_granularity: Optional[str] = None

    def __post_init__(self):
        if not 0.0 < self.mfu <= 1.0:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")

    @property
    def bubble(self) -> float:
        return (self.pp - 1) / self.num_microbatches


@dataclass(frozen=True)
class SequenceStats:
    """What the FLOP count needs from a packing plan."""

    num_sequences: int
    real_tokens: int
    sum_sq: float
    """sum over attention segments of length^2 (see module doc)."""


def plan_stats(plan, document_mask: bool = True, pad_attention: bool = False) -> SequenceStats:
    """:class:`SequenceStats` of a ``PackingPlan`` (or a blend's: real tokens are those of the
    sequences the epoch serves, not of every source plan it reads from)."""
    if pad_attention:
        sum_sq = float(plan.num_sequences) * plan.max_seq_length ** 2
    else:
        sum_sq = float(sequence_sum_sq(plan, document_mask).sum())
    return SequenceStats(int(plan.num_sequences), int(plan.sequence_lengths().sum()), sum_sq)


def full_sequences(num_sequences: int, seq_length: int) -> SequenceStats:
    """No dataset: every sequence one document of ``seq_length`` tokens."""
    return SequenceStats(num_sequences, num_sequences * seq_length, float(num_sequences) * seq_length ** 2)


@dataclass
class TimeEstimate:
    num_sequences: int
    steps: int
    model_flops_per_step: float
    executed_flops_per_step: float
    attention_share: float
    """attention FLOPs / model FLOPs"""
    step_seconds: float
    epoch_seconds: float
    real_tokens_per_second_per_gpu: float

    def to_json(self) -> dict:
        return asdict(self)


def estimate(preset: LlamaPreset, matmul_params: int, stats: SequenceStats, cfg: TimingConfig) -> TimeEstimate:
    """Time of one pass over ``stats``' sequences in steps of ``global_batch_size``."""
    n = max(stats.num_sequences, 1)
    cost = CostModel.from_architecture(preset, matmul_params=matmul_params)
    dense = cost.linear_flops_per_token * cfg.seq_length * n
    attn = cost.attention_flops_per_sq * stats.sum_sq
    model = dense + attn
    extra = {"full": model / 3.0, "selective": attn / 3.0}.get(cfg.recompute_granularity, 0.0)
    per_seq_model, per_seq_exec = model / n, (model + extra) / n
    step_model = per_seq_model * cfg.global_batch_size
    step_exec = per_seq_exec * cfg.global_batch_size
    step_s = step_exec / (cfg.num_gpus * cfg.gpu.peak_flops * cfg.mfu) * (1.0 + cfg.bubble)
    steps = stats.num_sequences // cfg.global_batch_size  # training drops the last partial batch
    epoch_s = steps * step_s
    return TimeEstimate(
        num_sequences=stats.num_sequences, steps=steps, model_flops_per_step=step_model,
        executed_flops_per_step=step_exec, attention_share=attn / model if model else 0.0,
        step_seconds=step_s, epoch_seconds=epoch_s,
        real_tokens_per_second_per_gpu=stats.real_tokens / n * cfg.global_batch_size / step_s / cfg.num_gpus,
    )
