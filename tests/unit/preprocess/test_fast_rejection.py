"""A preprocess run whose every record is bad answers fast: the records are checked before
Megatron-Core's indexed writer is imported (it was imported first, seconds of CPU, for nothing).
The real CLI in a subprocess under ``python -X importtime``: no ``megatron.core`` module is
imported, exit status 2, one stderr line naming the file, the first bad line and its reason, and
no dataset, summary or temporary file left (the complete rejects file is kept: it is the
answer). Negative control: one good record among the bad ones does import Megatron-Core and
writes the dataset, so the import check sees imports when they happen."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(ROOT, "tools", "preprocess_sft.py")

BAD_LINES = [
    '{"messages": [{"role": "user", "content": "cut off"',
    json.dumps({"messages": []}),
    json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
]
GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def run(tmp_path, tokenizer, lines):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-X", "importtime", TOOL, "--input", str(src), "--tokenizer", tokenizer,
                           "--output-prefix", str(tmp_path / "out"), "--chat-template", "llama3", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    return proc, imported, said, src


def test_all_bad_records_are_refused_before_megatron_core_is_imported(wordlevel_dir, tmp_path):
    proc, imported, said, src = run(tmp_path, wordlevel_dir, BAD_LINES)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert imported and "megatron_pack.preprocess.pipeline" in imported  # importtime did report
    assert not [m for m in imported if m == "megatron.core" or m.startswith("megatron.core.")]
    assert len(said) == 1, said
    line = said[0]
    assert line.startswith("preprocess_sft.py: error: ") and str(src) in line
    assert f"{src}:1: malformed_json" in line  # the first bad record: file, line, reason
    assert "4 read" in line and "'empty': 1" in line and "'no_assistant_turn': 1" in line
    left = sorted(os.listdir(tmp_path))
    assert left == ["in.jsonl", "out_rejects.jsonl"], left
    rejects = [json.loads(r) for r in open(tmp_path / "out_rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (1, "malformed_json"), (2, "empty"), (3, "no_assistant_turn"), (4, "unknown_role")]


def test_negative_control_a_good_record_imports_megatron_core_and_writes(wordlevel_dir, tmp_path):
    proc, imported, said, _ = run(tmp_path, wordlevel_dir, BAD_LINES + [GOOD_LINE])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "megatron.core.datasets.indexed_dataset" in imported
    assert {"out.bin", "out.idx", "out_summary.json", "out_rejects.jsonl"} <= set(os.listdir(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
