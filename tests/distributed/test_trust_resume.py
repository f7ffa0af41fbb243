"""Resuming through the real entry point (one rank, gloo): another architecture, a changed lr
schedule, a corrupted shard and a second run on the same --save are refused with a one-line
error (exit 2); Megatron-LM's --use-checkpoint-opt_param-scheduler resumes and says so."""

import pytest
from _launch_train import BASE_ARGS, describe_failure, make_dataset, run_train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    prefix = make_dataset(str(tmp / "sft"), n=40)
    args = BASE_ARGS + ["--data-path", prefix, "--global-batch-size", "4", "--valid-fraction", "0"]
    ck = tmp / "ck"
    first = run_train(1, args + ["--train-iters", "2", "--save", str(ck), "--checkpoint-checksums"], tmp, name="first")
    assert first.returncodes == [0], describe_failure(first)
    assert (ck / "iter_0000002" / "checksums.json").is_file()
    return tmp, args, ck


def _error_line(res):
    return [line for line in res.output.splitlines() if line.startswith("error:") or ": error: " in line]


def test_refusals_name_both_values(saved):
    tmp, args, ck = saved
    vocab = run_train(1, [a if a != "256" else "512" for a in args] + ["--train-iters", "2", "--load", str(ck)],
                      tmp, name="vocab")
    assert vocab.returncodes == [2]
    assert "vocab_size 256 in the checkpoint, 512 now (--vocab-size" in _error_line(vocab)[0]
    longer = run_train(1, args + ["--train-iters", "4", "--load", str(ck)], tmp, name="longer")
    assert longer.returncodes == [2]
    assert "decay steps (--train-iters/--train-epochs): checkpoint 2, command line 4" in _error_line(longer)[0]
    kept = run_train(1, args + ["--train-iters", "4", "--load", str(ck), "--use-checkpoint-opt_param-scheduler"],
                     tmp, name="kept")
    assert kept.returncodes == [0], describe_failure(kept)
    assert "--use-checkpoint-opt_param-scheduler: keeping the checkpoint's lr schedule" in kept.output
    assert sorted(kept.steps) == [3, 4]


def test_flipped_shard_byte_refused_with_checksums(saved):
    tmp, args, ck = saved
    import shutil

    bad = tmp / "ck_flipped"
    shutil.copytree(ck, bad)
    shard = sorted((bad / "iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    res = run_train(1, args + ["--train-iters", "2", "--load", str(bad), "--checkpoint-checksums"], tmp, name="flip")
    assert res.returncodes == [2]
    assert f"{shard.name}: SHA-256" in _error_line(res)[0]


def test_second_run_on_the_same_save_is_refused(saved):
    from megatron_pack.checkpoint.integrity import SaveLock

    tmp, args, ck = saved
    lock = SaveLock(str(ck))  # the first run, still going
    try:
        res = run_train(1, args + ["--train-iters", "3", "--load", str(ck), "--save", str(ck),
                                   "--use-checkpoint-opt_param-scheduler"], tmp, name="locked")
    finally:
        lock.release()
    assert res.returncodes == [2]
    assert "in use by another run" in _error_line(res)[0]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_resume_on_another_packing_plan_is_refused(saved):
    """A checkpoint whose plan padded documents for CP 2 (faked: its run_config.json rewritten, the
    weights are CP-agnostic) is refused at CP 1 before any weight is read; the same checkpoint as
    saved (CP 1) resumes (``test_refusals_name_both_values``: ``kept``)."""
    import json
    import shutil

    tmp, args, ck = saved
    rc_path = ck / "iter_0000002" / "run_config.json"
    assert json.loads(rc_path.read_text())["plan"] == {"document_multiple": 1}  # recorded at save
    cp2 = tmp / "ck_cp2"
    shutil.copytree(ck, cp2)
    rc = json.loads(rc_path.read_text())
    rc["parallel"]["context_parallel_size"] = 2
    rc["plan"]["document_multiple"] = 4
    (cp2 / "iter_0000002" / "run_config.json").write_text(json.dumps(rc))
    res = run_train(1, args + ["--train-iters", "4", "--load", str(cp2), "--use-checkpoint-opt_param-scheduler"],
                    tmp, name="cp_plan")
    assert res.returncodes == [2], describe_failure(res)
    line = _error_line(res)
    assert len(line) == 1 and ("the checkpoint's packing plan pads every document to a multiple of 4 "
                               "(--context-parallel-size 2), this run's to 1 (--context-parallel-size 1)") in line[0]
    assert "Resume with --context-parallel-size 2" in line[0]
    assert not res.steps  # no step of the other plan ran


def test_checkpoint_without_run_config_is_refused(saved):
    """``run_config.json`` is what the architecture and packing-plan checks read: a checkpoint
    without it, resumed with another --document-padding-multiple, used to resume silently on the
    other plan. Refused on one line, before any step; with the file present the same flags are
    refused by the plan check (negative control: the file is what the check reads)."""
    import shutil

    tmp, args, ck = saved
    plan = ["--train-iters", "2", "--document-padding-multiple", "4"]
    present = run_train(1, args + plan + ["--load", str(ck)], tmp, name="rc_present")
    assert present.returncodes == [2] and "packing plan" in _error_line(present)[0], describe_failure(present)
    gone = tmp / "ck_no_rc"
    shutil.copytree(ck, gone)
    (gone / "iter_0000002" / "run_config.json").unlink()
    res = run_train(1, args + plan + ["--load", str(gone)], tmp, name="rc_missing")
    assert res.returncodes == [2], describe_failure(res)
    line = _error_line(res)
    assert len(line) == 1 and "iter_0000002/run_config.json: missing" in line[0]
    assert not res.steps
