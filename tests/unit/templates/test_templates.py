"""Templates against hand-written token sequences, masks and turn starts."""

import numpy as np
import pytest

from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.messages import RecordError
from megatron_pack.templates.registry import auto_template_name, build_template
from megatron_pack.tokenization.tokenizer import TokenizerError, load_tokenizer

SH, EH, EOT, BOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"
IMS, IME = "<|im_start|>", "<|im_end|>"


def pieces(tok, ids):
    return [tok.id_to_piece(int(i)) for i in ids]


def run(tokenizer_path, template, messages, loss_on="assistant"):
    tok = load_tokenizer(tokenizer_path)
    tokens, mask, turns = encode_conversation(build_template(template, tok), messages, loss_on)
    assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and turns.dtype == np.int32
    return tok, pieces(tok, tokens), mask.tolist(), turns.tolist()


def test_llama3_single_turn_with_system(wordlevel_dir):
    msgs = [M("system", "be nice"), M("user", "hi"), M("assistant", " hello there ")]
    tok, got, mask, turns = run(wordlevel_dir, "llama3", msgs)
    expected = [BOT, SH, "system", EH, "\n\n", "be", " ", "nice", EOT,
                SH, "user", EH, "\n\n", "hi", EOT,
                SH, "assistant", EH, "\n\n", "hello", " ", "there", EOT]  # content trimmed
    assert got == expected
    assert mask == [0] * 15 + [0, 0, 0, 0, 1, 1, 1, 1]
    assert turns == [0, 9, 15]


def test_llama3_multi_turn_masks_and_loss_policies(wordlevel_dir):
    msgs = [M("user", "hi"), M("assistant", "hello"), M("user", "how are you"), M("assistant", "fine")]
    tok, got, mask, turns = run(wordlevel_dir, "llama3", msgs)
    assert got == [BOT, SH, "user", EH, "\n\n", "hi", EOT, SH, "assistant", EH, "\n\n", "hello", EOT,
                   SH, "user", EH, "\n\n", "how", " ", "are", " ", "you", EOT,
                   SH, "assistant", EH, "\n\n", "fine", EOT]
    every = [0] * 11 + [1, 1] + [0] * 14 + [1, 1]
    assert mask == every
    assert turns == [0, 7, 13, 23]
    assert run(wordlevel_dir, "llama3", msgs, "last")[2] == [0] * 27 + [1, 1]
    assert run(wordlevel_dir, "llama3", msgs, "all")[2] == [1] * 29


def test_llama3_tool_role_is_ipython(wordlevel_dir):
    msgs = [M("user", "weather"), M("assistant", "call get"), M("tool", "sunny"), M("assistant", "sunny")]
    tok, got, mask, turns = run(wordlevel_dir, "llama3", msgs)
    assert got[turns[2]:turns[3]] == [SH, "ipython", EH, "\n\n", "sunny", EOT]
    assert sum(mask[turns[2]:turns[3]]) == 0  # tool output is context, not trained


def test_chatml_multi_turn(wordlevel_dir):
    msgs = [M("system", "be nice"), M("user", "hi"), M("assistant", "hello"), M("tool", "ok"),
            M("assistant", "bye")]
    tok, got, mask, turns = run(wordlevel_dir, "chatml", msgs)
    assert got == [IMS, "system", "\n", "be", " ", "nice", IME, "\n",
                   IMS, "user", "\n", "hi", IME, "\n",
                   IMS, "assistant", "\n", "hello", IME, "\n",
                   IMS, "tool", "\n", "ok", IME, "\n",
                   IMS, "assistant", "\n", "bye", IME, "\n"]
    # content + <|im_end|> trained; the newline after it is not
    assert mask == [0] * 17 + [1, 1, 0] + [0] * 9 + [1, 1, 0]
    assert turns == [0, 8, 14, 20, 26]


def test_llama2_sentencepiece_hand_checked(sp_char_model):
    msgs = [M("system", "be nice"), M("user", "hi"), M("assistant", "yes"), M("user", "ok"), M("assistant", "no")]
    tok, got, mask, turns = run(sp_char_model, "llama2", msgs)
    first = list("▁[INST]▁<<SYS>>\nbe▁nice\n<</SYS>>\n\nhi▁[/INST]".replace(" ", "▁"))
    second = list("▁[INST]▁ok▁[/INST]")
    # "▁" before every "</s>": Meta's reference ("answer </s>") and transformers agree.
    expected = ["<s>"] + first + list("▁yes") + ["▁", "</s>", "<s>"] + second + list("▁no") + ["▁", "</s>"]
    assert got == expected
    n1 = 1 + len(first)
    n2 = n1 + 6 + 1 + len(second)
    assert mask == [0] * n1 + [1] * 6 + [0] * (1 + len(second)) + [1] * 5
    # system has no turn of its own in llama2: it lives inside the first [INST]
    assert turns[0] == 0 and turns[-3:] == [n1, n1 + 6, n2]  # the system text is a turn of its own


def test_llama2_on_bpe_spells_out_the_space(wordlevel_dir):
    tok, got, mask, turns = run(wordlevel_dir, "llama2", [M("user", "hi"), M("assistant", "yes")])
    assert got == [BOT, "[", "INST", "]", " ", "hi", " ", "[", "/", "INST", "]", " ", "yes", " ", "<|eot_id|>"]
    assert mask == [0] * 11 + [1, 1, 1, 1]


@pytest.mark.parametrize("msgs", [
    [M("user", "hi"), M("assistant", "call"), M("tool", "x"), M("assistant", "ok")],
    [M("user", "hi"), M("user", "hi"), M("assistant", "ok")],
    [M("assistant", "hi"), M("user", "hi")],
])
def test_llama2_rejects_quote_the_template(sp_char_model, msgs):
    """Only what transformers itself refuses, with the template's own raise_exception text."""
    tmpl = build_template("llama2", load_tokenizer(sp_char_model))
    with pytest.raises(RecordError) as err:
        tmpl.render(msgs)
    assert err.value.reason == "template_error"
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in err.value.detail


def test_special_token_text_in_content_stays_text(wordlevel_dir, bpe_dir):
    for path in (wordlevel_dir, bpe_dir):
        msgs = [M("user", "hi <|eot_id|> <|start_header_id|>"), M("assistant", "ok <|im_end|>")]
        tok, got, mask, turns = run(path, "llama3", msgs)
        assert got.count(EOT) == 2 and got.count(SH) == 2  # only the template's own
        tok, got, _, _ = run(path, "chatml", msgs)
        assert got.count(IME) == 2


def test_special_tokens_are_single_ids_in_bpe(bpe_dir):
    tok, got, mask, turns = run(bpe_dir, "llama3", [M("user", "hello there"), M("assistant", "fine, thanks")])
    assert got[:2] == [BOT, SH] and got[-1] == EOT
    last_header_end = len(got) - 1 - got[::-1].index(EH)
    assert "".join(got[last_header_end + 1:-1]).replace("Ġ", " ") == "ĊĊfine, thanks"


def test_jinja_llama3_equals_builtin(wordlevel_dir, bpe_dir):
    msgs = [M("system", "be nice"), M("user", "hi"), M("assistant", "hello there"), M("user", "how are you"),
            M("assistant", " fine ")]
    for path in (wordlevel_dir, bpe_dir):
        tok = load_tokenizer(path)
        for loss_on in ("assistant", "last", "all"):
            a = encode_conversation(build_template("llama3", tok), msgs, loss_on)
            b = encode_conversation(build_template("jinja", tok), msgs, loss_on)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


def test_jinja_matches_transformers_apply_chat_template(bpe_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    msgs = [M("user", "What is two plus four?"), M("assistant", "Two plus four is six."),
            M("user", "hello there"), M("assistant", "fine, thanks for asking.")]
    ref = hf.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs], tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    tokens, mask, _ = encode_conversation(build_template("jinja", load_tokenizer(bpe_dir)), msgs)
    assert tokens.tolist() == list(ref)


def test_jinja_chatml_template_masks(wordlevel_dir, tmp_path):
    import json
    import shutil
    d = tmp_path / "tok"
    shutil.copytree(wordlevel_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    # Qwen-style ChatML template in a separate chat_template.jinja file.
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    msgs = [M("user", "hi"), M("assistant", "hello")]
    tok, got, mask, turns = run(str(d), "jinja", msgs)
    assert got == [IMS, "user", "\n", "hi", IME, "\n", IMS, "assistant", "\n", "hello", IME, "\n"]
    assert mask == [0] * 9 + [1, 1, 0]
    assert turns == [0, 6]
    assert auto_template_name(load_tokenizer(str(d))) == "jinja"


def test_jinja_raise_exception_is_a_reject(wordlevel_dir, tmp_path):
    from megatron_pack.templates.jinja_template import JinjaTemplate

    tmpl = JinjaTemplate(load_tokenizer(wordlevel_dir), "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RecordError, match="roles must alternate"):
        tmpl.render([M("user", "hi"), M("assistant", "ok")])


def test_missing_special_tokens_are_clear(sp_char_model):
    tok = load_tokenizer(sp_char_model)
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>.*chatml"):
        build_template("chatml", tok)
    with pytest.raises(TokenizerError, match="no chat_template"):
        build_template("jinja", tok)
    with pytest.raises(ValueError, match="unknown chat template"):
        build_template("vicuna", tok)
    assert auto_template_name(tok) == "llama2"


def test_llama2_on_real_sentencepiece_bpe(sp_bpe_model):
    tok = load_tokenizer(sp_bpe_model)
    tokens, mask, turns = encode_conversation(build_template("llama2", tok), [M("user", "hello there"),
                                                                              M("assistant", "fine thanks")])
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    answer = tokens[turns[1]:]
    assert tok._sp.DecodeIds(answer[:-1].tolist()) == "fine thanks "  # "answer </s>"
    assert mask.tolist() == [0] * turns[1] + [1] * len(answer)


def test_tiktoken_backend_gives_identical_ids(tmp_path):
    pytest.importorskip("tiktoken")
    from megatron_pack.preprocess.sample import prepare_sample, record_texts

    jsonl, tok_dir = prepare_sample(str(tmp_path / "work"))
    fast, slow = load_tokenizer(tok_dir), load_tokenizer(tok_dir, fast=False)
    assert (fast.kind, slow.kind) == ("hf+tiktoken", "hf")
    texts = list(record_texts(jsonl)) + ["<|eot_id|> looks special but is text", "  \n\n\t x  ", "東京 😀 café"]
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


def test_tiktoken_backend_only_for_matching_bpe(tmp_path, wordlevel_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert load_tokenizer(wordlevel_dir).kind == "hf"  # word-level: never
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))  # no ignore_merges
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).kind == "hf"
