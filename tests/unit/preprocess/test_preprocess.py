"""End-to-end preprocessing: outputs, rejects, strictness, atomicity, determinism."""

import gzip
import json
import os

import numpy as np
import pytest

from megatron_pack.files.indexed import SFTIndexedDataset, dataset_exists, dataset_files
from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.preprocess.pipeline import PreprocessConfig, PreprocessError, preprocess
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.registry import build_template
from megatron_pack.tokenization.tokenizer import TokenizerError, load_tokenizer

GOOD = [
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello there"}]},
    {"conversations": [{"from": "human", "value": "what is two plus four"}, {"from": "gpt", "value": "six"},
                       {"from": "human", "value": "thanks"}, {"from": "gpt", "value": "bye"}]},
    {"instruction": "what is two plus four", "input": "", "output": "six"},
]
GOOD_MSGS = [
    [M("system", "be nice"), M("user", "hi"), M("assistant", "hello there")],
    [M("user", "what is two plus four"), M("assistant", "six"), M("user", "thanks"), M("assistant", "bye")],
    [M("user", "what is two plus four"), M("assistant", "six")],
]
# (raw line, reason): every bad-input case, one per line.
BAD = [
    (b'{"messages": [{"role": "user", "content": "hi"}', "malformed_json"),
    (b'{"messages": [{"role": "user", "content": "h\xff"}, {"role": "assistant", "content": "x"}]}', "invalid_utf8"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown_role"),
    (b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "missing_role"),
    (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty_content"),
    (b'{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}', "non_string_content"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn"),
    (b'{"text": "hi"}', "unknown_schema"),
]


def write_lines(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        for line in lines:
            f.write((json.dumps(line).encode() if isinstance(line, dict) else line) + b"\n")
    return str(path)


def mixed_lines():
    """GOOD records with BAD ones and a blank line in between."""
    lines = []
    for i, (raw, _) in enumerate(BAD):
        lines.append(GOOD[i % 3])
        lines.append(raw)
    lines.append(b"")
    return lines


def cfg(inputs, tok, prefix, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("plot", False)
    kw.setdefault("chat_template", "llama3")
    return PreprocessConfig(inputs=inputs, tokenizer=tok, output_prefix=str(prefix), **kw)


def test_an_empty_conversation_has_its_own_reason(wordlevel_dir, tmp_path):
    """``{"messages": []}`` is ``empty``, not ``no_assistant_turn`` (which a user-only chat keeps)."""
    lines = [b'{"messages": []}', b'{"conversations": []}', BAD[6][0], GOOD[0]]
    assert BAD[6][1] == "no_assistant_turn"
    s = preprocess(cfg([write_lines(tmp_path / "in.jsonl", lines)], wordlevel_dir, tmp_path / "out"))
    assert s["conversations"]["rejected_by_reason"] == {"empty": 2, "no_assistant_turn": 1}
    rejects = [json.loads(line) for line in open(tmp_path / "out_rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "empty"), (2, "empty"), (3, "no_assistant_turn")]
    assert "empty list" in rejects[0]["message"]


def test_writes_dataset_summary_rejects(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", mixed_lines())
    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "out", plot=True))
    c = s["conversations"]
    assert (c["read"], c["written"], c["rejected"]) == (16, 8, 8)
    assert c["rejected_by_reason"] == {reason: 1 for _, reason in BAD}
    assert c["by_schema"] == {"openai": 3, "sharegpt": 3, "alpaca": 2}

    # every good record, in input order, equals the template applied directly
    tmpl = build_template("llama3", load_tokenizer(wordlevel_dir))
    ds = SFTIndexedDataset(str(tmp_path / "out"))
    assert len(ds) == 8
    total = supervised = 0
    for i in range(8):
        tokens, mask, turns = encode_conversation(tmpl, GOOD_MSGS[i % 3])
        conv = ds[i]
        np.testing.assert_array_equal(conv.tokens, tokens)
        np.testing.assert_array_equal(conv.loss_mask, mask)
        np.testing.assert_array_equal(conv.turn_starts, turns)
        total += len(tokens)
        supervised += int(mask.sum())
    assert s["tokens"] == total and s["supervised_tokens"] == supervised
    assert s["length"]["max"] == int(ds.lengths.max())
    assert s["length"]["p50"] == float(np.percentile(ds.lengths, 50))

    # rejects name file, line and reason; line numbers are 1-based input lines
    rejects = [json.loads(line) for line in open(tmp_path / "out_rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2 * i + 2, reason) for i, (_, reason) in enumerate(BAD)]
    assert all(r["file"] == src and r["message"] for r in rejects)
    assert "\ufffd" in rejects[1]["record"]  # invalid UTF-8 kept readable
    with open(tmp_path / "out_lengths.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "out_summary.json")) == s
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_megatron_core_reads_the_output(wordlevel_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_lines(tmp_path / "in.jsonl", GOOD)
    preprocess(cfg([src], wordlevel_dir, tmp_path / "out"))
    tok_ds = IndexedDataset(str(tmp_path / "out"))
    mask_ds = IndexedDataset(str(tmp_path / "out_loss_mask"))
    assert len(tok_ds) == 3 and tok_ds.document_indices.tolist() == [0, 1, 2, 3]
    tmpl = build_template("llama3", load_tokenizer(wordlevel_dir))
    tokens, mask, _ = encode_conversation(tmpl, GOOD_MSGS[1])
    assert tok_ds[1].dtype == np.int32 and tok_ds[1].tolist() == tokens.tolist()
    assert mask_ds[1].dtype == np.uint8 and mask_ds[1].tolist() == mask.tolist()


def test_gzip_input_equals_plain(wordlevel_dir, tmp_path):
    plain = write_lines(tmp_path / "a.jsonl", GOOD)
    gz = write_lines(tmp_path / "a.jsonl.gz", GOOD)
    preprocess(cfg([plain], wordlevel_dir, tmp_path / "p"))
    preprocess(cfg([gz], wordlevel_dir, tmp_path / "g"))
    for a, b in zip(dataset_files(str(tmp_path / "p")), dataset_files(str(tmp_path / "g"))):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_deterministic_across_workers(bpe_dir, tmp_path):
    from megatron_pack.preprocess.sample import generate_conversations, write_jsonl

    src = write_jsonl(str(tmp_path / "s.jsonl"), generate_conversations(300, seed=3))
    with open(src, "ab") as f:
        f.write(BAD[0][0] + b"\n" + BAD[1][0] + b"\n")
    outs = []
    for workers, chunk in ((1, 512), (2, 17), (3, 64)):
        (tmp_path / f"w{workers}").mkdir()
        prefix = tmp_path / f"w{workers}" / "out"  # same name: the PNG title shows it
        preprocess(cfg([src], bpe_dir, prefix, workers=workers, chunk_size=chunk, plot=True,
                       max_seq_length=300, overlong="split-chat"))
        files = dataset_files(str(prefix)) + [f"{prefix}{s}" for s in ("_rejects.jsonl", "_lengths.png")]
        outs.append([open(p, "rb").read() for p in files])
        summary = json.load(open(f"{prefix}_summary.json"))
        reasons = summary["conversations"]["rejected_by_reason"]
        assert reasons["malformed_json"] == reasons["invalid_utf8"] == 1 and summary["overlong"]["split"] > 0
    assert outs[0] == outs[1] == outs[2]


def test_strict_stops_with_file_line_reason(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], GOOD[1], BAD[2][0], GOOD[2]])
    with pytest.raises(PreprocessError, match=r"in.jsonl:3: unknown_role: .*'wizard'"):
        preprocess(cfg([src], wordlevel_dir, tmp_path / "out", strict=True))
    assert not dataset_exists(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no temporary files left behind


def test_cli_exit_codes(wordlevel_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_sft", os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "preprocess_sft.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], BAD[0][0]])
    base = ["--input", src, "--tokenizer", wordlevel_dir, "--no-plot", "--no-progress"]
    assert cli.main(base + ["--output-prefix", str(tmp_path / "ok")]) == 0
    assert "read 2, written 1, rejected 1" in capsys.readouterr().out
    # 2: bad input or invocation (the bad record under --strict, a missing output directory)
    assert cli.main(base + ["--output-prefix", str(tmp_path / "st"), "--strict"]) == 2
    assert "in.jsonl:2: malformed_json" in capsys.readouterr().err
    assert cli.main(base + ["--output-prefix", str(tmp_path / "missing" / "x")]) == 2
    assert "output directory" in capsys.readouterr().err


def test_llama2_alternation_and_tool_rejects(sp_char_model, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "call"},
                      {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
    ])
    s = preprocess(cfg([src], sp_char_model, tmp_path / "out", chat_template="llama2"))
    assert s["conversations"]["rejected_by_reason"] == {"template_error": 2}
    assert len(SFTIndexedDataset(str(tmp_path / "out"))) == 1


@pytest.mark.parametrize("path_kind,match", [
    ("missing", "does not exist"),
    ("garbage_json", "not a HF tokenizer.json"),
    ("empty_dir", "neither tokenizer.json nor tokenizer.model"),
    ("text_file", "not a tokenizer"),
    ("garbage_model", "not a SentencePiece model"),
])
def test_bad_tokenizer_paths(tmp_path, path_kind, match):
    p = tmp_path / "tok"
    if path_kind == "garbage_json":
        p = tmp_path / "tokenizer.json"
        p.write_text('{"hello": 1}')
    elif path_kind == "empty_dir":
        p.mkdir()
    elif path_kind == "text_file":
        p = tmp_path / "vocab.txt"
        p.write_text("a b c")
    elif path_kind == "garbage_model":
        p = tmp_path / "x.model"
        p.write_bytes(b"\x00not a model")
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    with pytest.raises(TokenizerError, match=match):
        preprocess(cfg([src], str(p), tmp_path / "out"))


def test_bad_paths_and_flags(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    with pytest.raises(PreprocessError, match="output directory .* does not exist"):
        preprocess(cfg([src], wordlevel_dir, tmp_path / "nope" / "out"))
    with pytest.raises(PreprocessError, match="input file does not exist"):
        preprocess(cfg([str(tmp_path / "nope.jsonl")], wordlevel_dir, tmp_path / "out"))
    with pytest.raises(PreprocessError, match="--overlong"):
        cfg([src], wordlevel_dir, tmp_path / "out", overlong="wrap")


def test_no_usable_conversation_is_an_error(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [raw for raw, _ in BAD[:3]])
    with pytest.raises(PreprocessError, match=r"no usable conversation \(3 read"):
        preprocess(cfg([src], wordlevel_dir, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_rejects.jsonl"]  # rejects kept to explain why


def test_interrupted_run_leaves_nothing(wordlevel_dir, tmp_path, monkeypatch):
    from megatron_pack.preprocess import encode

    src = write_lines(tmp_path / "in.jsonl", GOOD * 4)
    calls = {"n": 0}
    original = encode.ChunkEncoder.__call__

    def flaky(self, lines):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, lines)

    monkeypatch.setattr(encode.ChunkEncoder, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg([src], wordlevel_dir, tmp_path / "out", chunk_size=2))
    assert os.listdir(tmp_path) == ["in.jsonl"]


LONG = {"messages": [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there how are you"},
    {"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"},
    {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "bye bye bye bye bye"},
]}
# llama3 lengths with the word-level tokenizer: BOS+system 9, exchange 1 = 6 + 14, exchange 2 =
# 14 + 6, exchange 3 = 6 + 14; total 69. A split piece is BOS+system (9) + its exchanges.


def test_overlong_policies(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [LONG, GOOD[2]])
    tok = load_tokenizer(wordlevel_dir)
    full, full_mask, full_turns = encode_conversation(build_template("llama3", tok),
                                                      [M(m["role"], m["content"]) for m in LONG["messages"]])
    assert len(full) == 69 and full_turns.tolist() == [0, 9, 15, 29, 43, 49, 55]

    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "t", max_seq_length=40, overlong="truncate"))
    ds = SFTIndexedDataset(str(tmp_path / "t"))
    assert ds.lengths.tolist() == [40, 21]
    np.testing.assert_array_equal(ds[0].tokens, full[:40])
    assert ds[0].turn_starts.tolist() == [0, 9, 15, 29]
    assert s["overlong"] == {"over_max_seq_length": 1, "truncated": 1}

    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "d", max_seq_length=40, overlong="drop"))
    assert s["conversations"]["rejected_by_reason"] == {"overlong": 1} and s["documents"] == 1

    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "s", max_seq_length=40, overlong="split-chat"))
    ds = SFTIndexedDataset(str(tmp_path / "s"))
    # 9 + 20 + 20 = 49 > 40: one exchange per piece, each re-rendered with BOS and system prompt
    assert ds.lengths.tolist() == [29, 29, 29, 21]
    bos, sh = tok.token_id("<|begin_of_text|>"), tok.token_id("<|start_header_id|>")
    for i, turns in enumerate(([0, 9, 15], [0, 9, 23], [0, 9, 15])):
        t = ds[i].tokens
        assert t[0] == bos and t[1] == sh and t[2] == tok.token_id("system")
        assert ds[i].turn_starts.tolist() == turns
        assert ds[i].loss_mask.sum() > 0
    np.testing.assert_array_equal(ds[1].tokens[9:], full[29:49])
    np.testing.assert_array_equal(ds[1].loss_mask[9:], full_mask[29:49])
    assert s["overlong"] == {"over_max_seq_length": 1, "split": 1, "split_pieces": 3}
    assert s["conversations"]["written"] == 2 and s["documents"] == 4

    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "s2", max_seq_length=50, overlong="split-chat"))
    ds2 = SFTIndexedDataset(str(tmp_path / "s2"))
    assert ds2.lengths.tolist() == [49, 29, 21]


def test_truncation_without_trained_tokens_is_rejected(wordlevel_dir, tmp_path):
    rec = {"messages": [{"role": "user", "content": "hi " * 30}, {"role": "assistant", "content": "ok"}]}
    src = write_lines(tmp_path / "in.jsonl", [rec, GOOD[2]])
    s = preprocess(cfg([src], wordlevel_dir, tmp_path / "o", max_seq_length=20, strict=True))
    assert s["conversations"]["rejected_by_reason"] == {"overlong_unsupervised": 1}


def test_loss_on_last_and_all(wordlevel_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[1]])
    tmpl = build_template("llama3", load_tokenizer(wordlevel_dir))
    for loss_on in ("last", "all"):
        s = preprocess(cfg([src], wordlevel_dir, tmp_path / loss_on, loss_on=loss_on))
        _, mask, _ = encode_conversation(tmpl, GOOD_MSGS[1], loss_on)
        ds = SFTIndexedDataset(str(tmp_path / loss_on))  # keep it alive: items are views of its mmap
        np.testing.assert_array_equal(ds[0].loss_mask, mask)
        assert s["supervised_tokens"] == int(mask.sum())
    assert s["supervised_fraction"] == 1.0


def test_sample_runs_end_to_end(tmp_path):
    from megatron_pack.preprocess.sample import prepare_sample

    jsonl, tok_dir = prepare_sample(str(tmp_path / "work"))
    assert os.path.getsize(jsonl) < 1_500_000
    s = preprocess(PreprocessConfig([jsonl], tok_dir, str(tmp_path / "sample"), progress=False, plot=False))
    assert s["chat_template"] == "jinja" and s["conversations"]["rejected"] == 0
    assert s["conversations"]["read"] >= 300
    assert set(s["conversations"]["by_schema"]) == {"openai", "sharegpt", "alpaca"}
    assert 15 <= s["length"]["min"] and s["length"]["max"] <= 1600
    # the tokenizer is cached while the sample is unchanged
    mtime = os.path.getmtime(os.path.join(tok_dir, "tokenizer.json"))
    assert prepare_sample(str(tmp_path / "work"))[1] == tok_dir
    assert os.path.getmtime(os.path.join(tok_dir, "tokenizer.json")) == mtime
