"""Runs that do not die on legitimate data, at preprocessing: every per-record failure is a
reject with file, line and reason; split-chat keeps each piece's final end-of-turn token."""

import json

import numpy as np

from megatron_pack.files.indexed import SFTIndexedDataset
from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.registry import build_template
from megatron_pack.tokenization.tokenizer import load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def _cfg(src, tok, prefix, **kw):
    return PreprocessConfig(inputs=[str(src)], tokenizer=tok, output_prefix=str(prefix), progress=False, plot=False,
                            chat_template="llama3", **kw)


def test_deep_nesting_and_huge_integers_are_rejects_not_crashes(wordlevel_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    deep = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads
    huge = b'{"messages": [{"role": "user", "content": "hi", "n": ' + b"9" * 5000 + b"}]}"  # ValueError
    nested_record = b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    src.write_bytes(b"\n".join([json.dumps(GOOD).encode(), deep, huge, nested_record,
                                json.dumps(GOOD).encode()]) + b"\n")
    s = preprocess(_cfg(src, wordlevel_dir, tmp_path / "o"))
    assert s["conversations"]["written"] == 2 and s["conversations"]["rejected"] == 3
    rejects = [json.loads(line) for line in open(tmp_path / "o_rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "malformed_json"), (3, "malformed_json"),
                                                           (4, "malformed_json")]
    assert "nested too deeply" in rejects[0]["message"] and "digits" in rejects[1]["message"]
    assert all(r["file"] == str(src) for r in rejects)


def test_any_unexpected_record_failure_is_a_reject(wordlevel_dir, tmp_path, monkeypatch):
    from megatron_pack.preprocess import encode

    real = encode.ChunkEncoder.parse

    def flaky(self, file, line, raw):
        if b"boom" in raw:
            raise MemoryError("simulated")
        return real(self, file, line, raw)

    monkeypatch.setattr(encode.ChunkEncoder, "parse", flaky)
    src = tmp_path / "in.jsonl"
    bad = dict(GOOD, note="boom")
    src.write_text("\n".join(json.dumps(r) for r in (GOOD, bad, GOOD)) + "\n")
    s = preprocess(_cfg(src, wordlevel_dir, tmp_path / "o", workers=1))
    assert s["conversations"]["rejected_by_reason"] == {"invalid_record": 1}
    rej = json.loads(open(tmp_path / "o_rejects.jsonl").readline())
    assert rej["line"] == 2 and rej["message"] == "MemoryError: simulated"


def test_split_chat_keeps_the_final_end_of_turn_token(wordlevel_dir, tmp_path):
    """No system prompt: the full render counts BOS in the first exchange, every re-rendered
    piece adds it again. A group estimated at exactly max_seq_length renders one token longer;
    it must give back an exchange, not be truncated (which cut its final <|eot_id|>)."""
    tok = load_tokenizer(wordlevel_dir)
    tmpl = build_template("llama3", tok)
    msgs = [("user", "hi"), ("assistant", "hello there how are you"), ("user", "what is two plus four"),
            ("assistant", "six"), ("user", "thanks"), ("assistant", "bye bye bye bye bye")]
    full, _, turns = encode_conversation(tmpl, [M(r, c) for r, c in msgs])
    ex = [int(turns[0]), int(turns[2]), int(turns[4]), len(full)]  # exchange bounds (user turns)
    max_len = ex[3] - ex[1]  # exchanges 2 + 3 by the full render's count: exactly the limit
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in msgs]}) + "\n")
    s = preprocess(_cfg(src, wordlevel_dir, tmp_path / "o", max_seq_length=max_len, overlong="split-chat"))
    ds = SFTIndexedDataset(str(tmp_path / "o"))
    eot = tok.token_id("<|eot_id|>")
    assert "pieces_truncated" not in s["overlong"]
    for i in range(len(ds)):
        assert ds[i].tokens[-1] == eot and len(ds[i].tokens) <= max_len, (i, ds[i].tokens[-3:])
    assert len(ds) == 3  # one exchange per piece once the re-added BOS is counted
    np.testing.assert_array_equal(ds[2].tokens[1:], full[ex[2]:])
