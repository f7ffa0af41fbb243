"""One rank of the isolation-audit tests (started by ``launcher.launch`` with ``--worker``-style
arguments): runs ``train(config)`` with ``--check-isolation only`` for several cases in one
process (one start-up), each with an optional control patched in, and writes every case's
report to ``rank{r}.json``.

Cases: ``NAME:LAYOUT[:CONTROL]``, LAYOUT as in ``_worker.parse_layout`` (``tp2``, ``pp4``,
``tp2pp2``, ``cp2``, ``dp2``, ``tp2sp``); CONTROL one of

  bridge     the attention of pipeline stage 2 ignores the first document boundary
             (Megatron-Bridge #2952: middle stages without cu_seqlens)
  cp_pad     context parallel attention ignores the padded per-document boundaries
             (the row is attended as one sequence)
  positions  RoPE positions do not restart per document (they run on over the row)
  nomask     --no-document-mask (documents see each other by configuration)
  padding    --pack-mode padding (no plan row holds 3 documents: rows built from conversations)
  mbs1       --micro-batch-size 1 (with 2 rows per micro-batch TP 2 shards fall on the row boundary)
  train      no audit: two training steps (reference for ``train_warn``)
  train_warn ``--check-isolation warn`` then the same two training steps
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import launcher  # noqa: E402
from _worker import parse_layout  # noqa: E402

from megatron_pack.parallel import destroy_distributed, initialize_distributed  # noqa: E402


@contextlib.contextmanager
def patched(control: str):
    """The control's bug, patched in for one case."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_pack.model import thd_rope
    from megatron_pack.model.attention import VarlenCoreAttention

    saved = VarlenCoreAttention.forward, rope_utils._apply_rotary_pos_emb_thd, thd_rope.apply_rotary_pos_emb_thd
    orig_forward, orig_rope = saved[0], saved[2]

    def bridge(self, q, k, v, mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None and ps.get_pipeline_model_parallel_rank() == 2:
            cu = packed_seq_params.cu_seqlens_q
            cu = torch.cat([cu[:1], cu[2:]])  # the first boundary forgotten
            packed_seq_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                max_seqlen_q=int(cu[-1]), max_seqlen_kv=int(cu[-1]))
        return orig_forward(self, q, k, v, mask, attn_mask_type, attention_bias, packed_seq_params)

    def cp_pad(self, q, k, v, mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q_padded is not None:
            whole = packed_seq_params.cu_seqlens_q_padded[[0, -1]]
            cu = packed_seq_params.cu_seqlens_q
            packed_seq_params = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                cu_seqlens_q_padded=whole, cu_seqlens_kv_padded=whole, max_seqlen_q=int(whole[-1]),
                max_seqlen_kv=int(whole[-1]), cp_group=packed_seq_params.cp_group)
        return orig_forward(self, q, k, v, mask, attn_mask_type, attention_bias, packed_seq_params)

    def no_restart(t, cu_seqlens, freqs, *args, **kwargs):
        # positions run on over the whole row: freqs for every position (Megatron's offsets case)
        total = int(cu_seqlens[-1])
        every = torch.arange(total, device=freqs.device, dtype=freqs.dtype).view(-1, 1, 1, 1) * freqs[1:2]
        return orig_rope(t, cu_seqlens, every, *args, **kwargs)

    if control == "bridge":
        VarlenCoreAttention.forward = bridge
    elif control == "cp_pad":
        VarlenCoreAttention.forward = cp_pad
    elif control == "positions":
        # the spec provider installs thd_rope's function at every model build: patch what it installs
        thd_rope.apply_rotary_pos_emb_thd = rope_utils._apply_rotary_pos_emb_thd = no_restart
    try:
        yield
    finally:
        VarlenCoreAttention.forward, rope_utils._apply_rotary_pos_emb_thd, thd_rope.apply_rotary_pos_emb_thd = saved


def case_args(base: list, layout: str, control: str, workdir: str) -> list:
    tp, pp, sp, cp = parse_layout(layout)
    args = base + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                   "--context-parallel-size", str(cp), "--log-file", os.path.join(workdir, "log.jsonl")]
    if sp:
        args.append("--sequence-parallel")
    if control == "nomask":
        args.append("--no-document-mask")
    if control == "padding":  # one conversation per row: the audit builds its rows
        args += ["--pack-mode", "padding"]
    if control == "mbs1":  # one row per micro-batch: sequence-parallel shards cut documents
        args += ["--micro-batch-size", "1"]
    if control == "train":
        return args
    return args + ["--check-isolation", "warn" if control == "train_warn" else "only"]


def run_case(base: list, spec: str, out_dir: str) -> dict:
    from megatron_pack.config.cli import parse_args
    from megatron_pack.training.isolation import IsolationLeakError
    from megatron_pack.training.loop import train

    name, layout, control = (spec.split(":") + ["none"])[:3]
    workdir = os.path.join(out_dir, name)
    os.makedirs(workdir, exist_ok=True)
    config = parse_args(case_args(base, layout, control, workdir))
    with patched(control):
        try:
            res = train(config)
        except IsolationLeakError as e:
            return {"rc": 1, "message": str(e), "report": e.report}
    keep = ("exit_reason", "iteration", "data_position")
    return {"rc": 0, "report": res.get("isolation"), **{k: res[k] for k in keep},
            "history": [{k: r[k] for k in ("lm loss", "grad norm")} for r in res["history"]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    args = ap.parse_args()
    base = ["--data-path", args.data, "--model", args.model, "--vocab-size", "256", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2", "--lr", "3e-3",
            "--valid-fraction", "0", "--data-cache-path", os.path.join(os.path.dirname(args.data), "plans"),
            "--init-method-std", "0.1", "--seed", "7"]
    initialize_distributed()  # the process group outlives every case's train()
    rank = torch.distributed.get_rank()
    results = {}
    for spec in args.cases.split(","):
        results[spec.split(":")[0]] = run_case(base, spec, args.out)
    destroy_distributed()
    launcher.write_rank_result(args.out, rank, results)


if __name__ == "__main__":
    sys.exit(main())
