"""Meta's tiktoken ``tokenizer.model`` (Llama-3 ``original/``): detected, loaded with the Llama-3
special tokens, same text ids as the equivalent tokenizer.json; a broken one refused with the line."""

import base64
import json
import os

import pytest

from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.registry import build_template
from megatron_pack.tokenization.tiktoken_model import TiktokenModelTokenizer, is_tiktoken_model
from megatron_pack.tokenization.tokenizer import TokenizerError, _byte_decoder, load_tokenizer

pytest.importorskip("tiktoken")


def write_tiktoken_model(bpe_dir, path):
    """Meta's format from a byte-level BPE tokenizer.json: ranks in id order, renumbered 0..n-1."""
    spec = json.load(open(os.path.join(bpe_dir, "tokenizer.json"), encoding="utf-8"))
    added = {t["content"] for t in spec["added_tokens"]}
    dec = _byte_decoder()
    vocab = sorted((i, tok) for tok, i in spec["model"]["vocab"].items() if tok not in added)
    with open(path, "w") as f:
        for rank, (_, tok) in enumerate(vocab):
            f.write(base64.b64encode(bytes(dec[c] for c in tok)).decode() + f" {rank}\n")
    return {hf_id: rank for rank, (hf_id, _) in enumerate(vocab)}


def test_loaded_with_llama3_specials_and_same_ids(bpe_dir, tmp_path):
    path = str(tmp_path / "tokenizer.model")
    to_rank = write_tiktoken_model(bpe_dir, path)
    assert is_tiktoken_model(path)
    tok = load_tokenizer(path)
    assert isinstance(tok, TiktokenModelTokenizer)
    n = len(to_rank)
    assert tok.vocab_size == n + 256
    assert (tok.token_id("<|begin_of_text|>"), tok.token_id("<|start_header_id|>"), tok.token_id("<|eot_id|>")) == (
        n, n + 6, n + 9)
    hf = load_tokenizer(bpe_dir, fast=False)
    texts = ["Hello, world! It's 2024.", "  def f(x):\n\treturn x  ", "naïve café 東京 😀", "<|eot_id|> is text"]
    assert tok.encode_batch(texts) == [[to_rank[i] for i in ids] for ids in hf.encode_batch(texts)]
    # A whole chat through the Llama-3 template: the same text, the Jinja path agreeing with the fast path.
    msgs = [M("system", "be brief"), M("user", "hi <|eot_id|>"), M("assistant", "d")]
    a = encode_conversation(build_template("llama3", tok), msgs)
    b = encode_conversation(build_template("llama3.1", tok), msgs)
    assert a[0][-2:].tolist() == [tok.encode("d")[0], n + 9] and a[1][-2:].tolist() == [1, 1]
    assert b[0][-2:].tolist() == a[0][-2:].tolist() and b[1][-2:].tolist() == [1, 1]
    assert a[0].tolist().count(n + 9) == 3 and b[0].tolist().count(n + 9) == 3  # typed <|eot_id|> stays text


def test_directory_with_original_tokenizer_model(bpe_dir, tmp_path):
    d = tmp_path / "original"
    d.mkdir()
    write_tiktoken_model(bpe_dir, str(d / "tokenizer.model"))
    assert load_tokenizer(str(d)).kind == "tiktoken-model"


def test_broken_tiktoken_file_names_the_line(bpe_dir, tmp_path):
    path = tmp_path / "tokenizer.model"
    write_tiktoken_model(bpe_dir, str(path))
    lines = path.read_text().splitlines()
    lines[20] = "not base64!"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenizerError, match=r"tokenizer.model:21: not a valid tiktoken BPE line"):
        load_tokenizer(str(path))


def test_neither_format_is_refused(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(range(256)) * 4)
    assert not is_tiktoken_model(str(path))
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(str(path))


def test_without_tiktoken_it_is_refused_with_what_it_is_and_how_to_convert(bpe_dir, tmp_path, monkeypatch):
    import sys

    path = str(tmp_path / "tokenizer.model")
    write_tiktoken_model(bpe_dir, path)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    msg = str(err.value)
    assert "Meta tiktoken BPE file" in msg and "convert_llama_weights_to_hf" in msg and "\n" not in msg
