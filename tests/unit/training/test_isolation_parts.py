"""The isolation audit's pieces without ranks: document spans, derived rows, verdict and report."""

import torch

from megatron_pack.data.collate import collate_thd
from megatron_pack.training.isolation_report import format_report
from megatron_pack.training.isolation_rows import (
    AuditBatch,
    alone,
    local_positions,
    perturbed,
    positions_restart,
    row_docs,
    straddling,
)
from megatron_pack.training.isolation_verdict import merge, reason, verdict


def _item(lengths, S, multiple=1):
    """A dataset-like row: documents of ``lengths`` (ids 10+), padded to ``multiple`` each (CP)."""
    import numpy as np

    from megatron_pack.data.packed_dataset import PackedSFTDataset

    ds = PackedSFTDataset.__new__(PackedSFTDataset)
    ds.padded_length, ds.pad_token_id, ds.document_mask = S, 0, True
    ds.document_multiple, ds.cu_seqlens_len = multiple, len(lengths) + 2
    toks = np.concatenate([np.full(n, 10 + i) for i, n in enumerate(lengths)])
    return ds.assemble(toks, np.ones(len(toks), np.float32), np.asarray(lengths))


def test_row_docs_follow_the_data_layout():
    assert [(d.start, d.end, d.pend) for d in row_docs([3, 2, 4], 1, 16, 1, True)] == [(16, 19, 19), (19, 21, 21),
                                                                                        (21, 25, 25)]
    # context parallel: every document padded to 4; mask off: real tokens back to back
    assert [(d.start, d.end, d.pend) for d in row_docs([3, 5], 0, 16, 4, True)] == [(0, 3, 4), (4, 9, 12)]
    assert [(d.start, d.end) for d in row_docs([3, 5], 0, 16, 4, False)] == [(0, 3), (3, 8)]


def test_perturbed_replaces_only_one_parity():
    ab = AuditBatch(collate_thd([_item([3, 2, 4], 12)]), row_docs([3, 2, 4], 0, 12, 1, True))
    p = perturbed(ab, 0, 256, seed=1)
    t0, t1 = ab.batch["tokens"][0], p.batch["tokens"][0]
    assert torch.equal(t0[3:5], t1[3:5]) and torch.equal(t0[9:], t1[9:])  # document 1 and padding kept
    assert not torch.equal(t0[:3], t1[:3]) and not torch.equal(t0[5:9], t1[5:9])
    assert torch.equal(p.batch["labels"], ab.batch["labels"])
    assert torch.equal(perturbed(ab, 0, 256, seed=1).batch["tokens"], t1.unsqueeze(0))  # private generator


def test_alone_puts_the_document_first_with_its_own_positions():
    ab = AuditBatch(collate_thd([_item([3, 5], 16, 4)]), row_docs([3, 5], 0, 16, 4, True))
    ref = alone(ab, ab.docs[1], 4)
    b = ref.batch
    assert b["tokens"][0, :5].tolist() == [11] * 5 and int(b["tokens"][0, 5:].abs().sum()) == 0
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert b["cu_seqlens"].tolist() == [0, 5, 5] and b["cu_seqlens_padded"].tolist() == [0, 8, 16]
    assert torch.equal(b["labels"][0, :5], ab.batch["labels"][0, 4:9])
    assert positions_restart(ab) == [] and positions_restart(ref) == []
    # CP 2: the document keeps its chunks on the same ranks (chunk 0 and 3 of 4 on rank 0)
    assert local_positions(b, 2, 0).tolist()[:4] == [0, 1, 6, 7]
    assert straddling(ab, 2, 1, False) == 2  # both documents have tokens on both CP ranks


def _found(**values):
    return [({k: (v, "doc") for k, v in values.items()}, {}, 0, [1, 2])]


def test_verdict_exact_pass_and_a_located_leak():
    clean = verdict(*merge(_found(**{"repeat/loss": 0.0, "reference/loss": 1e-7})), "fp32", True)
    assert clean["isolated"] and clean["deterministic"] and not clean["leak"]
    assert [c["tolerance"] for c in clean["checks"]] == [0.0, 0.0, 1e-4]
    leak = verdict(*merge(_found(**{"perturbation/loss": 0.3, "perturbation/layer/2": 0.5, "perturbation/scale/2": 1.0,
                                    "backward/layer/2": 0.1, "backward/layer/1": 0.2})), "fp32", True)
    assert leak["leak"] and not leak["checks"][0]["passed"] and leak["checks"][0]["layer"] == 2
    assert leak["checks"][1]["layer"] == 2  # the deepest layer a gradient crosses at
    leak.update(mode="error", seconds=1.0, passes=7)
    assert "pipeline stage 0, layer 2 of 2" in reason(leak)
    # the mask off: the same numbers are the effect, not a failure
    off = verdict(*merge(_found(**{"perturbation/loss": 0.3})), "fp32", False)
    assert off["by_configuration"] and not off["leak"] and not off["isolated"]


def test_report_fits_one_screen():
    rep = verdict(*merge(_found(**{"perturbation/loss": 0.3, "perturbation/layer/1": 1.0})), "bf16", True)
    rep.update(mode="warn", seconds=2.0, passes=7, reason=reason(rep),
               rows={"micro_batches": 1, "rows": 2, "row_length": 4096, "documents": 9, "min_docs": 3, "max_docs": 6,
                     "straddling": 2, "origin": "rows of the training plan"},
               layout={"tp": 2, "pp": 4, "cp": 2, "dp": 4, "sequence_parallel": True, "dtype": "bf16",
                       "document_mask": True, "backends": "", "layers_per_stage": [4]})
    lines = format_report(rep)
    assert len(lines) <= 12 and "LEAK" in lines[-1] and any("layer 1" in ln for ln in lines)


def test_a_leak_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    """``python -m megatron_pack.train --check-isolation error`` maps the audit's leak to exit 1."""
    from megatron_pack import train as front
    from megatron_pack.files.indexed import SFTDatasetWriter
    from megatron_pack.training import loop
    from megatron_pack.training.isolation import IsolationLeakError

    with SFTDatasetWriter(str(tmp_path / "sft")) as w:
        for n in (5, 6, 7, 8):
            w.add(list(range(1, n + 1)), [0] + [1] * (n - 1), [0, 1])

    def leak(config):
        assert config.train.check_isolation == "error"
        raise IsolationLeakError("--check-isolation: packed documents see each other: ...", {})

    monkeypatch.setattr(loop, "train", leak)
    rc = front.main(["--data-path", str(tmp_path / "sft"), "--train-iters", "1", "--global-batch-size", "1",
                     "--check-isolation", "error"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--check-isolation: packed documents see each other" in err[0]
