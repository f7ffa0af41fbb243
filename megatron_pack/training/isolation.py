"""``--check-isolation``: prove, on the run's own layout and weights, that packed documents do
not see each other, before the first training step.

The same model (after ``--load`` / ``--pretrained-checkpoint``), layer backend and attention
kernel, dtype, TP / PP / CP / DP and sequence parallelism as the run; micro-batches from the
run's own packing plan (rows of at least three documents; built from its conversations when
the plan has none). Three checks (:mod:`~megatron_pack.training.isolation_checks`):
perturbation, backward and reference; on a difference, the pipeline stage and layer where it
first appears. Nothing of the run changes: no optimizer step, weights untouched, RNG streams
restored, the data stream not advanced (training afterwards is bit-identical to a run
without the flag).

    error  report; on a leak stop with exit status 1 (one-line reason)
    warn   report and train anyway
    only   report, then exit without training (0: isolated, 1: leak)

With ``--no-document-mask`` documents see each other by configuration: the report gives the
measured size of the effect and nothing fails.
"""

from __future__ import annotations

import os
import time

import torch

from megatron_pack.training.isolation_checks import MAX_REFERENCE_DOCS, AuditRun
from megatron_pack.training.isolation_probe import AuditEnv, LayerWatch, untouched_run
from megatron_pack.training.isolation_report import format_report, report_path
from megatron_pack.training.isolation_rows import audit_batches, plain_dataset, straddling
from megatron_pack.training.isolation_verdict import merge, reason, verdict

MODES = ("error", "warn", "only")


class IsolationLeakError(RuntimeError):
    """Packed documents see each other on this layout; the message says which check and where."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _rows_summary(batches: list, ds, cp: int, tp: int, sp: bool) -> dict:
    per_row = {}
    for ab in batches:
        for d in ab.docs:
            per_row[(id(ab), d.row)] = per_row.get((id(ab), d.row), 0) + 1
    built = any(ab.built for ab in batches)
    return {"micro_batches": len(batches), "rows": max(d.row for d in batches[0].docs) + 1,
            "row_length": ds.padded_length, "documents": sum(len(ab.docs) for ab in batches),
            "min_docs": min(per_row.values()), "max_docs": max(per_row.values()),
            "straddling": sum(straddling(ab, cp, tp, sp) for ab in batches),
            "reference_documents": min(MAX_REFERENCE_DOCS, sum(len(ab.docs) for ab in batches)),
            "origin": ("built from the split's conversations (no plan row holds 3 documents)" if built
                       else "rows of the training plan"), "source": [x for ab in batches for x in ab.source]}


def _gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def audit(env: AuditEnv, dataset, *, micro_batch_size: int, dp_rank: int, pp_rank: int, vocab_size: int,
          optimizer=None, tcfg=None) -> tuple:
    """Run the passes on this rank; returns (every rank's findings, every rank's rows summary or None,
    passes). Collective: every rank of the job calls it."""
    ds = plain_dataset(dataset)
    batches = audit_batches(dataset, micro_batch_size, dp_rank)
    with untouched_run(env.model, optimizer, tcfg), LayerWatch(env) as watch:
        run = AuditRun(env, watch, batches, vocab_size, max(1, ds.document_multiple))
        found = run.run_all()
        layers = watch.layer_numbers
    first_of_dp = env.tp_rank == 0 and env.cp_rank == 0 and pp_rank == 0
    rows = _rows_summary(batches, ds, env.cp_size, env.tp_size, env.sequence_parallel) if first_of_dp else None
    per_rank = _gather((found.max, found.sum, pp_rank, layers, rows))
    return per_rank, run.passes


def _combine_rows(rows: list) -> dict:
    rows = [r for r in rows if r is not None]
    out = dict(rows[0])
    for k in ("documents", "straddling", "reference_documents"):
        out[k] = sum(r[k] for r in rows)
    out["min_docs"], out["max_docs"] = min(r["min_docs"] for r in rows), max(r["max_docs"] for r in rows)
    return out


def check_isolation(config, st, model, optimizer, tcfg, ctx, dataset, vocab_size: int, bf16: bool, log,
                    backends: str = "") -> dict:
    """The audit as the training loop runs it: report on the logging rank, JSON beside --save /
    --log-file, :class:`IsolationLeakError` on a leak in ``error`` and ``only`` modes."""
    from megatron_pack.files.atomic import write_json_atomic

    mode = config.train.check_isolation
    t0 = time.perf_counter()
    tp_group = None
    if st.tp_size > 1:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    env = AuditEnv(model, ctx.forward_backward, st.device, ctx.seq_length, cp_group=ctx.cp_group,
                   tp_group=tp_group, sequence_parallel=config.parallel.sequence_parallel)
    per_rank, passes = audit(env, dataset, micro_batch_size=config.train.micro_batch_size, dp_rank=st.dp_rank,
                             pp_rank=st.pp_rank, vocab_size=vocab_size, optimizer=optimizer, tcfg=tcfg)
    best, sums, stage_of = merge([r[:4] for r in per_rank])
    mask = bool(plain_dataset(dataset).document_mask)
    report = verdict(best, sums, stage_of, "bf16" if bf16 else "fp32", mask)
    per_stage = sorted({sum(1 for s in stage_of.values() if s == p) for p in set(stage_of.values())})
    report.update(mode=mode, seconds=time.perf_counter() - t0, passes=passes,
                  rows=_combine_rows([r[4] for r in per_rank]),
                  layout={"tp": st.tp_size, "pp": st.pp_size, "cp": st.cp_size, "dp": st.dp_size,
                          "sequence_parallel": config.parallel.sequence_parallel, "dtype": "bf16" if bf16 else "fp32",
                          "document_mask": mask, "backends": backends, "layers_per_stage": per_stage})
    report["reason"] = reason(report)
    for line in format_report(report):
        log.print(line)
    lg = config.logging
    path = report_path(config.checkpoint.save, lg.log_file, lg.tensorboard_dir)
    if path and st.rank == st.world_size - 1:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json_atomic(report, path)
        log.print(f"> isolation report written to {path}")
    if report["leak"] and mode in ("error", "only"):
        raise IsolationLeakError(f"--check-isolation: {report['reason']}", report)
    return report
