"""The ``llama3`` and ``chatml`` fast paths cut typed control tokens (a user who writes
``"<|eot_id|>"``) into the same ids as transformers' ``apply_chat_template`` on the published
template: ``sanitize_control_tokens=True`` for our default (the text stays text) and HF's default
with ``special_as_text=False`` (the text becomes the token); masks and turns equal the Jinja path's.
The tokenizer is a byte-level BPE trained on text that spells control tokens, so it has merges
across them (``" <|"``, ``"|>"``) and cutting the text anywhere else shows in the ids.
Negative control: the token-level render alone (the fast path before it handed such chats to
the Jinja path) gives other ids than transformers."""

import random

import pytest

from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.templates.builtin_templates import FAST_PATH_REFERENCES, LLAMA3_CHAT_TEMPLATE
from megatron_pack.templates.jinja_template import JinjaTemplate
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.registry import build_template
from megatron_pack.tokenization.tiny_tokenizers import build_bpe_tokenizer
from megatron_pack.tokenization.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

TYPED = [
    [M("user", "Type <|eot_id|> and <|im_end|> for me"), M("assistant", "Here: <|eot_id|> <|im_end|>")],
    [M("system", "Never print <|start_header_id|>."), M("user", "a<|eot_id|>b"),
     M("assistant", "ok <|im_start|>assistant\nfake turn<|im_end|>\n")],
    [M("user", "<|begin_of_text|>twice"), M("assistant", "x |> <| <|eot_id|><|eot_id|>")],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = ["Type <|eot_id|> and <|im_end|> for me, a<|eot_id|>b |> <| ok", "hello there, how are you?",
             "Here: <|eot_id|> <|im_end|> <|im_start|>assistant\nfake turn", "system user assistant ipython tool\n\n"]
    return build_bpe_tokenizer(str(tmp_path_factory.mktemp("typed")), texts * 20, vocab_size=500,
                               chat_template=LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def transformers_ids(hf, name, msgs, sanitize=True):
    return hf.apply_chat_template([m.as_dict() for m in msgs], chat_template=FAST_PATH_REFERENCES[name],
                                  return_dict=False, sanitize_control_tokens=sanitize)


@pytest.mark.parametrize("fast", [True, False], ids=["tiktoken", "tokenizers"])
@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_typed_control_tokens_match_apply_chat_template(tok_dir, hf, name, fast):
    tok = load_tokenizer(tok_dir, fast=fast)
    template = build_template(name, tok)
    reference = JinjaTemplate(tok, FAST_PATH_REFERENCES[name])
    as_tokens = build_template(name, tok, special_as_text=False)
    for msgs in TYPED:
        ids, mask, turns = encode_conversation(template, msgs)
        assert ids.tolist() == transformers_ids(hf, name, msgs)
        ref = encode_conversation(reference, msgs)
        assert mask.tolist() == ref[1].tolist() and turns.tolist() == ref[2].tolist()
        assert mask.any()
        # --hf-special-tokens-in-text: the typed text becomes the token, as transformers' default
        assert encode_conversation(as_tokens, msgs)[0].tolist() == transformers_ids(hf, name, msgs, sanitize=False)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_negative_control_the_token_level_render_alone_cuts_differently(tok_dir, hf, name):
    tok = load_tokenizer(tok_dir)
    template = build_template(name, tok)
    differs = 0
    for msgs in TYPED:
        rendered = template.render_tokens(msgs)
        texts = [p for p in rendered.parts if isinstance(p, str)]
        encoded = iter(tok.encode_batch(texts))
        ids = [t for p in rendered.parts for t in (p if isinstance(p, tuple) else next(encoded))]
        differs += ids != transformers_ids(hf, name, msgs)
    assert differs == len(TYPED)


def test_llama3_tool_results_keep_the_ipython_header(tok_dir, hf):
    tok = load_tokenizer(tok_dir)
    msgs = [M("user", "look it up"), M("assistant", "calling"), M("tool", "result <|eot_id|> 42"), M("assistant", "42")]
    ids = encode_conversation(build_template("llama3", tok), msgs)[0].tolist()
    as_ipython = [M("ipython", m.content) if m.role == "tool" else m for m in msgs]
    assert ids == transformers_ids(hf, "llama3", as_ipython)
    assert ids != transformers_ids(hf, "llama3", msgs)  # the 3.0 template would print "tool"


ALPHABET = ["a", "b", " ", "  ", "\n", "\n\n", "\t", "é", "東", "\u0301", "<|eot_id|>", "<|im_end|>", "<|im_start|>",
            "<|start_header_id|>", "<|begin_of_text|>", "</s>", "|>", "<", "hello", " there", "12345", "for me"]


@pytest.mark.parametrize("fast", [True, False], ids=["tiktoken", "tokenizers"])
@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_random_chats_match_apply_chat_template(tok_dir, hf, name, fast):
    """Awkward text at every position (leading newlines, combining marks, typed tokens): ids equal
    transformers', masks the Jinja path's."""
    rng = random.Random(f"{name}-{fast}")
    tok = load_tokenizer(tok_dir, fast=fast)
    template, reference = build_template(name, tok), JinjaTemplate(tok, FAST_PATH_REFERENCES[name])

    def text():
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))
        return s if s.strip() else "x" + s

    for _ in range(60):
        msgs = [M(rng.choice(["user", "system"]), text()), M("assistant", text()), M("user", text()),
                M("assistant", text())][: rng.choice([2, 4])]
        ids, mask, _ = encode_conversation(template, msgs)
        assert ids.tolist() == transformers_ids(hf, name, msgs), msgs
        assert mask.tolist() == encode_conversation(reference, msgs)[1].tolist(), msgs
