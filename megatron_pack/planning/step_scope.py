"""The planner's row for ``--pack-scope step``: the padded run's steps, each packed on its own.

A step's rows vary (``R_k``), so its time does too: the ranks run ``R_k`` rounded up to a
multiple of ``DP x micro-batch`` (empty rows cost the dense FLOPs of a padded row) in
``M_k`` micro-batches each, paying 1F1B's bubble ``(PP - 1) / M_k``::

    step k seconds = (dense * R'_k + attention_k) * recompute / (GPUs * peak * MFU) * (1 + (PP-1)/M_k)

Same FLOP formulas as :mod:`megatron_pack.planning.step_time` (``CostModel``), summed per step.
"""

from __future__ import annotations

import numpy as np

from megatron_pack.data.balance import sequence_sum_sq
from megatron_pack.model.cost import CostModel
from megatron_pack.packing.step_scope import spread


def step_scope_row(ds, preset, matmul_params: int, tcfg, *, dp: int, micro_batch_size: int, padded_length: int,
                   document_mask: bool, pad_attention: bool) -> dict:
    """One ``_modes_table`` row (plus ``rows_per_step``) for ``ds``, the training split's
    :class:`~megatron_pack.data.step_dataset.StepPackedDataset` (built by ``build_datasets``)."""
    plan, rows = ds.plan, ds.rows_per_step()
    unit = dp * micro_batch_size
    run_rows = -(-rows // unit) * unit  # with the empty rows that even out the ranks
    cost = CostModel.from_architecture(preset, matmul_params=matmul_params)
    sq = np.zeros(plan.num_sequences) if pad_attention else sequence_sum_sq(plan, document_mask)
    if pad_attention:
        sq[:] = float(padded_length) ** 2
    attn = cost.attention_flops_per_sq * np.add.reduceat(sq, ds.step_offsets[:-1]) if rows.size else np.zeros(0)
    dense = cost.linear_flops_per_token * padded_length * run_rows
    model = dense + attn
    extra = {"full": model / 3.0, "selective": attn / 3.0}.get(tcfg.recompute_granularity, 0.0)
    micro = run_rows // unit
    bubble = (tcfg.pp - 1) / np.maximum(micro, 1)
    seconds = (model + extra) / (tcfg.num_gpus * tcfg.gpu.peak_flops * tcfg.mfu) * (1.0 + bubble)
    steps = int(rows.size)
    epoch_s = float(seconds.sum())
    real = int(plan.sequence_lengths().sum())
    return {"mode": "bfd per step", "scope": "step", "num_sequences": int(plan.num_sequences),
            "efficiency": float(plan.efficiency), "real_tokens": real, "steps": steps,
            "attention_sum_sq": float(sq.sum()),
            "attention_share": float(attn.sum() / model.sum()) if steps and model.sum() else 0.0,
            "model_flops_per_step": float(model.mean()) if steps else 0.0,
            "executed_flops_per_step": float((model + extra).mean()) if steps else 0.0,
            "step_seconds": epoch_s / steps if steps else 0.0, "epoch_seconds": epoch_s,
            "real_tokens_per_second_per_gpu": real / epoch_s / tcfg.num_gpus if epoch_s else 0.0,
            "rows_per_step": ds.rows_spread(), "micro_batches_per_step": spread(micro)}
