"""Jinja path == transformers, per template family (published template strings, tiny tokenizers).

ids: ``apply_chat_template(tokenize=True)`` (HF's default with ``special_as_text=False``, and
``sanitize_control_tokens=True`` for our default). masks: transformers'
``return_assistant_tokens_mask`` on the same template with ``{% generation %}`` markers added
by hand around each assistant reply and its end token -- the ground truth. Negative controls:
a wrong template and a shifted mask must fail the same comparison.
"""

import json
import os

import numpy as np
import pytest

from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.preprocess.schema import normalize_record, record_tools
from megatron_pack.templates import builtin_templates as bt
from megatron_pack.templates.builtin_templates import LLAMA3_CHAT_TEMPLATE
from megatron_pack.templates.registry import build_template
from megatron_pack.tokenization.tiny_tokenizers import build_bpe_tokenizer
from megatron_pack.tokenization.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

EXTRA_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<|eom_id|>", "<|python_tag|>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & then",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_ID = {**CALL, "id": "abc123def"}

# family -> (template, marked template, tokenizer_config tokens)
QWEN_TOOL_BRANCH = QWEN_TOOL_MARKED = None


def _marked(name):
    if name == "llama3":
        src = LLAMA3_CHAT_TEMPLATE
        return src.replace(
            "{{ content }}",
            "{% if message['role'] == 'assistant' %}{{ content.split('<|end_header_id|>\n\n')[0] + "
            "'<|end_header_id|>\n\n' }}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
            "{% endgeneration %}{% else %}{{ content }}{% endif %}")
    if name == "llama3.1":
        src = bt.LLAMA31_CHAT_TEMPLATE
        a = src.index("{%- set tool_call = message.tool_calls[0].function %}")
        b = src.index('{%- elif message.role == "tool" or message.role == "ipython" %}')
        src = (
            src[:a] + "{%- set tool_call = message.tool_calls[0].function %}"
            "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% generation %}"
            "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}"
            '{{- tool_call.arguments | tojson }}{{- "}" }}{{- "<|eot_id|>" }}{% endgeneration %}\n    ' + src[b:]
        )
        return src.replace(
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
            "'<|eot_id|>' }}",
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{% if message.role == "
            "'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{% else %}{{- message['content'] | trim + '<|eot_id|>' }}{% endif %}",
        )
    if name == "qwen2.5":
        src = bt.QWEN25_CHAT_TEMPLATE
        a = src.index("        {{- '<|im_start|>' + message.role }}")
        b = src.index('    {%- elif message.role == "tool" %}')
        tool_branch = (
            "        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{%- if message.content %}"
            "{{- message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function "
            "is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{%- if message.content or not "
            "loop.first %}{{- '\\n' }}{%- endif %}{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}"
            "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
            "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
        )
        src = src[:a] + tool_branch + src[b:]
        return src.replace(
            "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
            "        {{- '<|im_start|>' + message.role + '\\n' }}{% if message.role == 'assistant' %}{% generation %}"
            "{{- message.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{- message.content + '<|im_end|>' }}"
            "{% endif %}{{- '\\n' }}",
        )
    if name == "mistral":
        return bt.MISTRAL_V03_CHAT_TEMPLATE.replace(
            '{{- " " + message["content"]|trim + eos_token}}',
            '{% generation %}{{- " " + message["content"]|trim + eos_token}}{% endgeneration %}',
        )
    if name == "llama2":
        return bt.LLAMA2_CHAT_TEMPLATE.replace(
            "{{ ' '  + content.strip() + ' ' + eos_token }}",
            "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}",
        )
    raise KeyError(name)


SOURCES = {
    "llama3": LLAMA3_CHAT_TEMPLATE,
    "llama3.1": bt.LLAMA31_CHAT_TEMPLATE,
    "qwen2.5": bt.QWEN25_CHAT_TEMPLATE,
    "mistral": bt.MISTRAL_V03_CHAT_TEMPLATE,
    "llama2": bt.LLAMA2_CHAT_TEMPLATE,
}
CONFIG = {
    "llama3": {},
    "llama3.1": {},
    "qwen2.5": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None},
}


def conversations(family):
    """System / no system / empty system / tool turns / assistant first / unicode / code with runs
    of spaces / answers of one or two characters."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    s = lambda c: {"role": "system", "content": c}  # noqa: E731
    convs = [
        {"messages": [s("Be brief."), u("Hi there"), a("d"), u("and?"), a("t"), u("more"), a("id")]},
        {"messages": [u("Ünïcödé façade — 東京 😀?"), a("naïve café 😀"), u("x"), a("|>")]},
        {"messages": [s(""), u("code please"), a("def f(x):\n    return  x  *  2\n\n\n    # done   ")]},
        {"messages": [u("  padded  "), a("  spaced answer  ")]},
    ]
    if family not in ("llama2", "mistral"):
        convs.append({"messages": [a("I start."), u("ok"), a("ok")]})
    if family in ("llama3.1", "qwen2.5"):
        convs.append(
            {
                "messages": [
                    s("Use tools."),
                    u("Weather in Paris?"),
                    {"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "content": '{"temp": 21, "unit": "C"}'},
                    a("21 C."),
                ],
                "tools": TOOLS,
            }
        )
    if family in ("llama3", "qwen2.5", "llama3.1"):
        convs.append({"messages": [u("hi"), a("x"), {"role": "tool", "content": "result <b>"}, a("done")]})
    # Typed control tokens, special and not (Qwen's <tool_call> is a non-special added token).
    convs.append(
        {
            "messages": [
                u("typed <tool_call> and <|im_end|> and <|eot_id|> and </s>"),
                a("ok </tool_call><|eot_id|>[INST]"),
            ]
        }
    )
    if family == "mistral":
        convs.append({"messages": [s("Sys"), u("Weather?"), a("Let me check."), u("Paris")]})
    # Generated multi-turn chats (the sample generator: 1-6 exchanges, three schemas).
    from megatron_pack.preprocess.sample import generate_conversations

    for rec in generate_conversations(6, seed=7):
        convs.append({"messages": [m.as_dict() for m in normalize_record(rec)[1]]})
    return convs


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tokenizers import Tokenizer

    texts = [m["content"] for f in SOURCES for c in conversations(f) for m in c["messages"]]
    texts += ["system user assistant ipython tool Cutting Knowledge Date December Today Environment"] * 3
    base = build_bpe_tokenizer(
        str(tmp_path_factory.mktemp("fam") / "base"), texts * 4, vocab_size=600, chat_template=LLAMA3_CHAT_TEMPLATE
    )
    dirs = {}
    for fam in SOURCES:
        d = str(tmp_path_factory.mktemp(fam.replace(".", "_")))
        tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
        tok.add_special_tokens(EXTRA_SPECIALS)
        tok.add_tokens(["<tool_call>", "</tool_call>"])
        tok.save(os.path.join(d, "tokenizer.json"))
        cfg = json.load(open(os.path.join(base, "tokenizer_config.json")))
        cfg.pop("chat_template", None)
        for k, v in CONFIG[fam].items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        cfg["chat_template"] = SOURCES[fam]
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
        dirs[fam] = d
    return dirs


def ours(tok, fam, rec, special_as_text=True):
    name = "llama3" if fam == "llama3" else fam
    tmpl = build_template("jinja" if fam == "llama3" else name, tok, special_as_text=special_as_text)
    _, msgs = normalize_record(rec)
    return encode_conversation(tmpl, msgs, tools=record_tools(rec))


def check_family(tok_dir, fam, fast):
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir, fast=fast)
    marked = _marked(fam)
    for rec in conversations(fam):
        msgs, tools = rec["messages"], rec.get("tools")
        want = hf.apply_chat_template(msgs, tools=tools, chat_template=SOURCES[fam], return_dict=False)
        gt = hf.apply_chat_template(
            msgs, tools=tools, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
        )
        assert gt["input_ids"] == want  # the markers change no text
        ids, mask, turns = ours(tok, fam, rec, special_as_text=False)
        assert ids.tolist() == want, (fam, rec)
        assert mask.tolist() == gt["assistant_masks"], (fam, rec)
        assert mask.sum() > 0
        sanitized = hf.apply_chat_template(
            msgs, tools=tools, chat_template=SOURCES[fam], return_dict=False, sanitize_control_tokens=True
        )
        assert ours(tok, fam, rec)[0].tolist() == sanitized


@pytest.mark.parametrize("fam", list(SOURCES))
@pytest.mark.parametrize("fast", [True, False])
def test_ids_and_masks_equal_transformers(family_dirs, fam, fast):
    """Byte-level BPE tokenizer.json (Llama-3 / Qwen style), tiktoken fast path and tokenizers."""
    check_family(family_dirs[fam], fam, fast)


@pytest.fixture(scope="module")
def sentencepiece_json_dirs(tmp_path_factory):
    """SentencePiece-style tokenizer.json (Metaspace, a "▁" before every word, as Llama-2's and
    Mistral's HF files): encoding pieces separately adds a "▁" per message -- the old bug."""
    from tokenizers import SentencePieceBPETokenizer

    texts = [m["content"] for f in ("llama2", "mistral") for c in conversations(f) for m in c["messages"]]
    dirs = {}
    for fam in ("llama2", "mistral"):
        tok = SentencePieceBPETokenizer()
        tok.train_from_iterator(
            texts * 4 + ["[INST] <<SYS>> <</SYS>> [/INST]"] * 4,
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"] + EXTRA_SPECIALS[2:],
        )
        d = str(tmp_path_factory.mktemp("spjson_" + fam))
        tok.save(os.path.join(d, "tokenizer.json"))
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": SOURCES[fam],
            },
            open(os.path.join(d, "tokenizer_config.json"), "w"),
        )
        dirs[fam] = d
    return dirs


@pytest.mark.parametrize("fam", ["llama2", "mistral"])
def test_sentencepiece_tokenizer_json_equals_transformers(sentencepiece_json_dirs, fam):
    check_family(sentencepiece_json_dirs[fam], fam, True)


def test_raw_sentencepiece_model_equals_meta_reference(sp_bpe_model):
    """A raw .model has no HF tokenizer.json; Meta's Llama-2 reference encodes each exchange
    ``[INST] prompt [/INST] answer `` with SentencePiece between BOS and EOS. Same ids here."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_bpe_model)
    tok = load_tokenizer(sp_bpe_model)
    system, pairs = "Be brief.", [("hello there", "fine thanks"), ("  and you? ", "d")]
    msgs = [{"role": "system", "content": system}]
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, mask, _ = ours(tok, "llama2", {"messages": msgs})
    want = []
    for i, (q, a) in enumerate(pairs):
        prompt = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}" if i == 0 else q
        want += [sp.bos_id()] + sp.Encode(f"[INST] {prompt.strip()} [/INST] {a.strip()} ") + [sp.eos_id()]
    assert ids.tolist() == want
    assert sp.DecodeIds([t for t, m in zip(ids.tolist(), mask.tolist()) if m and t != sp.eos_id()]).split() == [
        "fine",
        "thanks",
        "d",
    ]


def test_negative_controls(family_dirs):
    """The comparison can fail: another template, or a mask off by one token."""
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs["qwen2.5"])
    tok = load_tokenizer(family_dirs["qwen2.5"])
    rec = conversations("qwen2.5")[0]
    ids, mask, _ = ours(tok, "llama3.1", rec)
    assert ids.tolist() != hf.apply_chat_template(rec["messages"], chat_template=SOURCES["qwen2.5"], return_dict=False)
    ids, mask, _ = ours(tok, "qwen2.5", rec)
    gt = hf.apply_chat_template(
        rec["messages"], chat_template=_marked("qwen2.5"), return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    assert mask.tolist() == gt and np.roll(mask, 1).tolist() != gt


def test_special_token_text_stays_text_by_default(family_dirs):
    tok = load_tokenizer(family_dirs["llama3.1"])
    rec = {"messages": [{"role": "user", "content": "say <|eot_id|>"}, {"role": "assistant", "content": "<|eot_id|>"}]}
    eot = tok.token_id("<|eot_id|>")
    as_text = ours(tok, "llama3.1", rec)[0].tolist()
    as_hf = ours(tok, "llama3.1", rec, special_as_text=False)[0].tolist()
    assert as_text.count(eot) == 3 and as_hf.count(eot) == 5  # system, user, assistant ends (+2 typed)


@pytest.mark.parametrize("fast_path", ["llama3", "chatml"])
def test_fast_paths_equal_the_published_templates(family_dirs, fast_path):
    """The token-level built-ins are only a speed-up: ids, masks and turns equal the Jinja path
    rendering the published template they follow (negative control: another template differs)."""
    from megatron_pack.templates.builtin_templates import FAST_PATH_REFERENCES
    from megatron_pack.templates.jinja_template import JinjaTemplate

    tok = load_tokenizer(family_dirs["llama3"])
    reference = JinjaTemplate(tok, FAST_PATH_REFERENCES[fast_path])
    other = JinjaTemplate(tok, FAST_PATH_REFERENCES["chatml" if fast_path == "llama3" else "llama3"])
    for rec in conversations("llama3"):
        _, msgs = normalize_record(rec)
        if any(m.role == "tool" for m in msgs):
            continue  # the fast path names the tool role "ipython" (Llama 3.1+); Meta's 3.0 template has none
        for loss_on in ("assistant", "last"):
            fast = encode_conversation(build_template(fast_path, tok), msgs, loss_on)
            ref = encode_conversation(reference, msgs, loss_on)
            assert fast[0].tolist() == ref[0].tolist() and fast[1].tolist() == ref[1].tolist()
            assert encode_conversation(other, msgs, loss_on)[0].tolist() != fast[0].tolist()


@pytest.mark.parametrize("fam", ["llama3.1", "qwen2.5", "llama2"])
def test_print_only_shortcut_equals_verified_render(family_dirs, fam):
    """Published print-only templates skip the verifying second render; forcing it changes nothing."""
    from megatron_pack.templates.jinja_template import JinjaTemplate

    tok = load_tokenizer(family_dirs[fam])
    quick, checked = JinjaTemplate(tok, SOURCES[fam]), JinjaTemplate(tok, SOURCES[fam], verify=True)
    assert quick._unverified_roles is not None and checked._unverified_roles is None
    for rec in conversations(fam):
        _, msgs = normalize_record(rec)
        a = encode_conversation(quick, msgs, tools=record_tools(rec))
        b = encode_conversation(checked, msgs, tools=record_tools(rec))
        for x, y in zip(a, b):
            assert x.tolist() == y.tolist()


def test_generation_prompt_found_when_the_template_needs_a_system_message(family_dirs):
    """A template that refuses a lone user message still has its assistant header found (it is
    not trained), from a probe with a system message."""
    from megatron_pack.templates.jinja_template import JinjaTemplate

    src = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
        + bt.CHATML_CHAT_TEMPLATE
    )
    t = JinjaTemplate(load_tokenizer(family_dirs["qwen2.5"]), src)
    assert t.gen_prompt == "<|im_start|>assistant\n"


ALPHABET = [
    "a",
    "b",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "é",
    "東",
    "😀",
    "<|eot_id|>",
    "<|im_end|>",
    "</s>",
    "[INST]",
    "d",
    "id",
    "|>",
    "<",
    ">",
    "{",
    '"',
    "\\",
    "0",
    "12345",
    "<tool_call>",
]


def random_chats(fam, seed, n):
    """Random chats from awkward pieces: typed control tokens, quotes and backslashes (JSON),
    whitespace runs, short answers; tool calls with such arguments; assistant first."""
    import random

    rng = random.Random(seed)
    txt = lambda: "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12)))  # noqa: E731
    out = []
    while len(out) < n:
        msgs, tools = [], None
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": txt() if rng.random() < 0.8 else ""})
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": txt()}, {"role": "assistant", "content": txt()}]
            if fam in ("llama3.1", "qwen2.5") and rng.random() < 0.5:
                call = {
                    "type": "function",
                    "function": {"name": rng.choice(["get_weather", "f"]), "arguments": {"x": txt()}},
                }
                msgs += [
                    {"role": "assistant", "content": rng.choice(["", txt()]), "tool_calls": [call]},
                    {"role": "tool", "content": txt()},
                    {"role": "assistant", "content": txt()},
                ]
                tools = TOOLS
        if fam in ("llama3", "llama3.1", "qwen2.5") and rng.random() < 0.2:
            msgs.insert(0, {"role": "assistant", "content": txt()})
        if any(not m["content"].strip() and m["role"] != "system" and "tool_calls" not in m for m in msgs):
            continue  # whitespace-only text is rejected as empty_content by the schema
        out.append({"messages": msgs, **({"tools": tools} if tools else {})})
    return out


@pytest.mark.parametrize("fam", list(SOURCES))
def test_random_chats_equal_transformers(family_dirs, fam):
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs[fam])
    marked = _marked(fam)
    for fast in (True, False):
        tok = load_tokenizer(family_dirs[fam], fast=fast)
        for rec in random_chats(fam, seed=11, n=12):
            msgs, tools = rec["messages"], rec.get("tools")
            try:
                hf.apply_chat_template(msgs, tools=tools, chat_template=SOURCES[fam])
            except Exception:
                continue  # transformers refuses it (Mistral/Llama-2 alternation): so do we, tested elsewhere
            gt = hf.apply_chat_template(
                msgs, tools=tools, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask, _ = ours(tok, fam, rec, special_as_text=False)
            assert ids.tolist() == gt["input_ids"] and mask.tolist() == gt["assistant_masks"], (fam, fast, rec)
            sanitized = hf.apply_chat_template(
                msgs, tools=tools, chat_template=SOURCES[fam], return_dict=False, sanitize_control_tokens=True
            )
            assert ours(tok, fam, rec)[0].tolist() == sanitized, (fam, fast, rec)
