"""Preprocessing's single commit point: the summary, written last, names the files it vouches
for; readers refuse a dataset its summary does not match; stale temp files go; a failed run
leaves an older dataset's files alone."""

import json
import os
import subprocess
import sys

import pytest

from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset
from megatron_pack.files.indexed_check import DatasetError, preprocessing_finished
from megatron_pack.preprocess.pipeline import PreprocessConfig, PreprocessError, preprocess

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
OTHER = {"messages": [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"}]}


def _run(tmp_path, tok, records, prefix="out"):
    src = tmp_path / f"in_{len(records)}.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=tok, output_prefix=str(tmp_path / prefix),
                                       progress=False, plot=False, chat_template="llama3"))


def test_summary_vouches_for_its_dataset_and_a_swapped_dataset_is_refused(wordlevel_dir, tmp_path):
    s = _run(tmp_path, wordlevel_dir, [GOOD, OTHER])
    assert set(s["files"]) == {"out.bin", "out.idx", "out_loss_mask.bin", "out_loss_mask.idx", "out_turns.bin",
                               "out_turns.idx"}
    assert len(SFTIndexedDataset(str(tmp_path / "out"))) == 2  # negative control: matching summary opens
    with SFTDatasetWriter(str(tmp_path / "out")) as w:  # another dataset renamed in, the old summary kept
        w.add([1, 2, 3], [0, 1, 1], [0])
    with pytest.raises(DatasetError, match=r"out_summary.json: vouches for out.bin as .* different preprocessing"):
        SFTIndexedDataset(str(tmp_path / "out"))


def test_a_run_interrupted_at_any_step_of_the_commit_is_refused_until_rerun(wordlevel_dir, tmp_path, monkeypatch):
    """Every file operation of the commit (``SFTDatasetWriter.close``) is, in turn, where the run
    dies (an exception standing in for SIGKILL): the prefix then holds the old dataset with its
    own summary (interrupted before anything changed) or is refused on open, naming the
    interrupted run -- never the new dataset without its summary, which main accepted. A rerun
    commits."""
    import os

    from megatron_pack.files.indexed import SFTDatasetWriter

    _run(tmp_path, wordlevel_dir, [GOOD])
    ops, state = [], {"armed": False, "fail_at": None}

    def hooked(real):
        def op(*a, **k):
            if state["armed"]:
                if len(ops) == state["fail_at"]:
                    raise KeyboardInterrupt("SIGKILL stand-in")
                ops.append((real.__name__, os.path.basename(str(a[-1]))))
            return real(*a, **k)
        return op

    real_close = SFTDatasetWriter.close

    def close(self, *a, **k):
        state["armed"] = True
        try:
            return real_close(self, *a, **k)
        finally:
            state["armed"] = False

    monkeypatch.setattr(os, "replace", hooked(os.replace))
    monkeypatch.setattr(os, "remove", hooked(os.remove))
    monkeypatch.setattr(SFTDatasetWriter, "close", close)
    _run(tmp_path, wordlevel_dir, [GOOD, OTHER], prefix="count")  # the commit's steps, counted on a fresh prefix
    steps = list(ops)
    assert steps[0] == ("replace", "count_summary.json") and steps[-1] == ("replace", "count_summary.json")
    assert len(steps) == 9  # incomplete summary, 6 parts and the rejects renamed in, the summary (nothing old)
    outcomes = []
    for k in range(len(steps) + 6):  # + the 6 removals of the old parts at "out"
        ops.clear()
        state["fail_at"] = k
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, wordlevel_dir, [GOOD, OTHER, GOOD])
        try:
            outcomes.append(len(SFTIndexedDataset(str(tmp_path / "out"))))
        except (DatasetError, FileNotFoundError) as e:
            assert "out_summary.json: preprocessing into" in str(e) and "did not finish" in str(e)
            outcomes.append("refused")
    assert outcomes == [1] + ["refused"] * (len(steps) + 5)  # the old dataset (1 conversation), then refused
    assert not preprocessing_finished(str(tmp_path / "out"))  # the demo and the study redo such a run
    state["fail_at"] = None
    _run(tmp_path, wordlevel_dir, [GOOD, OTHER, GOOD])
    assert len(SFTIndexedDataset(str(tmp_path / "out"))) == 3 and preprocessing_finished(str(tmp_path / "out"))
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # aborted runs' temporaries removed


def test_a_loss_mask_from_another_run_is_refused(wordlevel_dir, tmp_path):
    """The same records preprocessed twice, ``--loss-on all`` for the second: copying its mask over
    the first one's (same size) used to train on the wrong targets. The summary now records the
    mask's SHA-256; an older summary without it is checked by its supervised-token count."""
    import shutil

    from megatron_pack.preprocess.pipeline import PreprocessConfig

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, OTHER, GOOD]))
    for prefix, loss_on in (("a", "assistant"), ("b", "all")):
        preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=wordlevel_dir, output_prefix=str(tmp_path / prefix),
                                    progress=False, plot=False, chat_template="llama3", loss_on=loss_on))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert len(SFTIndexedDataset(a)) == 3  # negative control: the untouched dataset opens
    assert os.path.getsize(a + "_loss_mask.bin") == os.path.getsize(b + "_loss_mask.bin")
    shutil.copyfile(b + "_loss_mask.bin", a + "_loss_mask.bin")
    with pytest.raises(DatasetError, match=r"a_summary.json: says \d+ supervised tokens, .*a_loss_mask.bin marks "
                                           r"\d+: the loss mask comes from another preprocessing run"):
        SFTIndexedDataset(a)
    summary = json.load(open(a + "_summary.json"))  # a summary from before the mask was hashed
    del summary["files"]["a_loss_mask.bin"]["sha256"]
    json.dump(summary, open(a + "_summary.json", "w"))
    with pytest.raises(DatasetError, match=r"marks \d+: the loss mask comes from another"):
        SFTIndexedDataset(a)
    del summary["supervised_tokens"]  # nothing left that describes the mask's content: sizes only
    json.dump(summary, open(a + "_summary.json", "w"))
    assert len(SFTIndexedDataset(a)) == 3


def test_stale_temp_files_of_dead_runs_are_removed(wordlevel_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f"out.tmp-{dead_pid}_loss_mask.bin", tmp_path / f"out_rejects.jsonl.tmp-{dead_pid}"]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a run in progress
    live = tmp_path / f"out.tmp-{other.pid}.bin"
    try:
        for p in stale + [live]:
            p.write_bytes(b"partial")
        _run(tmp_path, wordlevel_dir, [GOOD])
        assert not any(p.exists() for p in stale) and live.exists()
    finally:
        other.kill()
        other.wait()


def test_failed_run_keeps_the_older_datasets_rejects(wordlevel_dir, tmp_path):
    _run(tmp_path, wordlevel_dir, [GOOD, "not json"])
    before = (tmp_path / "out_rejects.jsonl").read_text()
    with pytest.raises(PreprocessError, match=r"no usable conversation .* all rejects in .*out_rejects.failed.jsonl"):
        _run(tmp_path, wordlevel_dir, ["{bad", "also bad"])
    assert (tmp_path / "out_rejects.jsonl").read_text() == before
    assert len((tmp_path / "out_rejects.failed.jsonl").read_text().splitlines()) == 2
    assert len(SFTIndexedDataset(str(tmp_path / "out"))) == 1  # the old dataset and summary still agree
