"""Weights & Biases beside TensorBoard (Megatron-LM's --wandb-* flags), offline: a 2-rank blended
run logs the same scalars to both (loss per source, tokens/s, imbalance, padding fraction), read
back from the offline run file and the TensorBoard event file."""

import glob
import json
import struct

import numpy as np
import pytest
from _launch_train import BASE_ARGS, describe_failure, make_dataset, run_train, shared_dataset

wandb = pytest.importorskip("wandb")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def wandb_history(run_file: str) -> dict:
    """``{step: {key: value}}`` from an offline ``run-*.wandb`` file: LevelDB-log blocks of
    protobuf ``Record``s (wandb's own format; wandb 0.31 ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, hdr, pos, buf, out = 32768, 7, 7, b"", {}
    while pos + hdr <= len(data):
        if block - pos % block < hdr:  # the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + hdr])
        chunk, pos = data[pos + hdr:pos + hdr + length], pos + hdr + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, LAST ends it
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                out.setdefault(row.pop("_step"), {}).update(row)
    return out


def test_wandb_gets_the_tensorboard_scalars(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network; files only
    a = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("wandb")
    b = make_dataset(str(tmp / "b"), n=80, seed=1)
    args = BASE_ARGS + ["--data-path", "0.6", a, "0.4", b, "--train-iters", "3", "--eval-interval", "2",
                        "--tensorboard-dir", str(tmp / "tb"), "--wandb-project", "megatron-pack-test",
                        "--wandb-exp-name", "tiny-blend", "--wandb-save-dir", str(tmp / "wb")]
    res = run_train(2, args, tmp, name="wandb", timeout=240)
    assert res.returncodes == [0, 0], describe_failure(res)

    (run_file,) = glob.glob(str(tmp / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    wb = wandb_history(run_file)
    ea = event_accumulator.EventAccumulator(str(tmp / "tb"))
    ea.Reload()
    tb = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    for tag in ("lm-loss", "lm-loss/sft", "lm-loss/b", "real-tokens-per-s", "padding-fraction", "compute-imbalance",
                "learning-rate", "lm-loss-validation"):
        assert tag in tb, sorted(tb)
    assert sorted(tb["lm-loss"]) == [1, 2, 3] and sorted(tb["lm-loss-validation"]) == [2, 3]
    for tag, series in tb.items():  # every TensorBoard scalar, the same value at the same step in wandb
        for step, value in series.items():
            assert np.float32(wb[step][tag]) == np.float32(value), (tag, step, wb[step][tag], value)
    assert {k for row in wb.values() for k in row if not k.startswith("_")} == set(tb)  # nothing more, nothing less
    # and both are the step log's figures (the JSON lines), so they are the run's, not a copy of a copy
    for step, rec in res.steps.items():
        assert wb[step]["lm-loss"] == pytest.approx(rec["lm loss"], rel=1e-12)
        assert wb[step]["lm-loss/b"] == pytest.approx(rec["source lm loss"]["b"], rel=1e-12)
        assert wb[step]["compute-imbalance"] == pytest.approx(rec["compute imbalance"], rel=1e-12)
    # negative control: the per-source losses are two different series, not one written twice
    assert [wb[s]["lm-loss/sft"] for s in (1, 2, 3)] != [wb[s]["lm-loss/b"] for s in (1, 2, 3)]
