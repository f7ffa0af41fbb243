"""Context parallelism in a plan: the K/V exchange it costs and the smallest CP that fits.

Memory: :mod:`.memory` already divides a micro-batch's tokens (activations, logits) by CP.
Compute: the FLOPs of a step are split over all GPUs, CP ranks included (each holds the
load-balanced chunks 2 of 2*CP of every document, so causal work is even).

Communication, Transformer Engine's ring (``--cp-comm-type p2p``): each of CP-1 steps of a
layer's forward passes one K/V block (this rank's tokens, its TP share of the key/value
heads, bf16) to the next rank; the backward passes K/V again and dK/dV, so per layer and
micro-batch a rank sends::

    3 * (CP - 1) * 2 * (g * d / TP) * (micro_batch * S / CP) * 2 bytes

Megatron orders ranks TP fastest, then CP, so a CP group stays inside a node (NVLink, half
the catalogue's bidirectional figure per direction) while TP x CP <= GPUs per node, else it
crosses InfiniBand (``network_gbps``). TE overlaps each ring step with the attention of the
previous one, so only what exceeds the attention compute time is exposed.
"""

from __future__ import annotations

from megatron_pack.model.presets import LlamaPreset
from megatron_pack.planning.catalogue import GPUSpec


def kv_exchange(preset: LlamaPreset, gpu: GPUSpec, *, tp: int, cp: int, pp: int, seq_length: int,
                micro_batch_size: int, num_microbatches: int, gpus_per_node: int) -> dict:
    """Bytes a rank sends per step for the CP ring, over which link, and the seconds it takes."""
    if cp == 1:
        return {"cp": 1, "bytes_per_step": 0.0, "link": None, "link_gbps": None, "seconds_per_step": 0.0}
    gd = preset.num_query_groups * preset.kv_channels
    block = 2.0 * (gd / tp) * (micro_batch_size * seq_length / cp) * 2.0
    per_step = 3.0 * (cp - 1) * block * (preset.num_layers // pp) * num_microbatches
    intra = tp * cp <= gpus_per_node
    bw = gpu.nvlink_gbps / 2.0 if intra else gpu.network_gbps
    return {"cp": cp, "bytes_per_step": per_step, "link": "NVLink" if intra else "InfiniBand", "link_gbps": bw,
            "seconds_per_step": per_step / (bw * 1e9)}


def exposed_seconds(exchange: dict, step_seconds: float, attention_share: float) -> float:
    """What the overlap with attention compute cannot hide."""
    return max(0.0, exchange["seconds_per_step"] - attention_share * step_seconds)


def cp_candidates(cfg) -> list[int]:
    """CP sizes that keep the TP/PP and world of ``cfg`` (a PlanConfig) legal: CP divides
    world / (TP * PP), the batch still splits over DP, and --seq-length over 2*CP (x TP with SP)."""
    from megatron_pack.data.context_parallel import document_multiple

    par, t = cfg.spec.parallel, cfg.spec.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    out = []
    for cp in range(1, cfg.world_size // (tp * pp) + 1):
        if cfg.world_size % (tp * pp * cp):
            continue
        dp = cfg.world_size // (tp * pp * cp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            continue
        if cfg.spec.data.seq_length % document_multiple(cp, tp, par.sequence_parallel):
            continue
        out.append(cp)
    return out


def cp_options(cfg, peak_of) -> list[dict]:
    """Peak GiB per GPU at every legal CP (``peak_of(cfg_at_cp)`` returns it), smallest first."""
    return [{"cp": cp, "peak_gb": float(peak_of(cfg.with_cp(cp)))}
            for cp in cp_candidates(cfg)]


def smallest_fitting_cp(options: list[dict], memory_gib: float):
    return next((o["cp"] for o in options if o["peak_gb"] <= memory_gib), None)
