"""Preprocessing's single commit point: the summary, written last, names the files it vouches
for; readers refuse a dataset its summary does not match; stale temp files go; a failed run
leaves an older dataset's files alone."""

import json
import subprocess
import sys

import pytest

from megatron_pack.preprocess.pipeline import PreprocessConfig, PreprocessError, preprocess
from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset
from megatron_pack.files.indexed_check import DatasetError

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


def test_crash_before_the_summary_leaves_no_stale_summary(wordlevel_dir, tmp_path, monkeypatch):
    from megatron_pack.preprocess import pipeline as P

    _run(tmp_path, wordlevel_dir, [GOOD])

    def killed(*a, **k):
        raise KeyboardInterrupt("SIGKILL stand-in")

    monkeypatch.setattr(P, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, wordlevel_dir, [GOOD, OTHER, GOOD])
    assert not (tmp_path / "out_summary.json").exists()  # the old one cannot vouch for the new files
    assert len(SFTIndexedDataset(str(tmp_path / "out"))) == 3  # the complete new dataset, validated on open


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
