"""preprocess with the tokenizer's own Jinja template (the ``auto`` default): records transformers
renders are kept (tools, empty or late system prompt, assistant first), the rest rejected with
the template's own words; over-long chats split and re-rendered through the same template."""

import json
import shutil

import pytest

from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_pack.templates.builtin_templates import MISTRAL_V03_CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")


def tokenizer_with(bpe_dir, tmp_path, template, **tokens):
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg.update(tokens, chat_template=template)
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    return str(d)


def run(tmp_path, tok, records, **kw):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    return preprocess(PreprocessConfig([str(src)], tok, str(tmp_path / "out"), progress=False, plot=False, **kw))


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def test_auto_uses_the_tokenizers_template_and_keeps_what_transformers_renders(bpe_dir, tmp_path):
    tok = tokenizer_with(bpe_dir, tmp_path, QWEN25_CHAT_TEMPLATE, eos_token="<|im_end|>")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    records = [
        {"messages": [S(""), U("hi"), A("hello")]},                      # empty system prompt
        {"messages": [U("hi"), A("ok"), S("late system"), U("again"), A("fine")]},
        {"messages": [A("I speak first"), U("ok"), A("ok")]},
        {"messages": [U("call f"), {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "42"}, A("It is 42.")], "tools": tools},
    ]
    s = run(tmp_path, tok, records)
    assert s["chat_template"] == "jinja"
    assert s["conversations"]["rejected"] == 0 and s["conversations"]["written"] == 4
    hf = transformers.AutoTokenizer.from_pretrained(tok)
    want = sum(len(hf.apply_chat_template(r["messages"], tools=r.get("tools"), return_dict=False)) for r in records)
    assert s["tokens"] == want


def test_template_refusals_quote_the_template(bpe_dir, tmp_path):
    tok = tokenizer_with(bpe_dir, tmp_path, MISTRAL_V03_CHAT_TEMPLATE)
    s = run(tmp_path, tok, [{"messages": [U("a"), U("b"), A("c")]}, {"messages": [U("a"), A("b")]}])
    assert s["conversations"]["rejected_by_reason"] == {"template_error": 1}
    reject = json.loads(open(str(tmp_path / "out") + "_rejects.jsonl").readline())
    assert reject["line"] == 1
    assert "conversation roles must alternate user/assistant/user/assistant/..." in reject["message"]


def test_split_chat_rerenders_pieces_with_the_template(bpe_dir, tmp_path):
    tok = tokenizer_with(bpe_dir, tmp_path, QWEN25_CHAT_TEMPLATE, eos_token="<|im_end|>")
    long = {"messages": [S("sys")] + [m for i in range(6) for m in (U(f"question {i} " * 20), A(f"answer {i} " * 20))]}
    s = run(tmp_path, tok, [long], max_seq_length=260, overlong="split-chat")
    assert s["overlong"]["split"] == 1 and s["documents"] >= 3
    assert s["length"]["max"] <= 260


def test_record_over_the_render_bound_is_rejected_and_the_run_goes_on(bpe_dir, tmp_path):
    slow = ("{% for m in messages %}{% for i in range(m.content | length * 20) %}{% for j in range(2000) %}"
            "{% endfor %}{% endfor %}{{ m.content }}{% endfor %}")
    tok = tokenizer_with(bpe_dir, tmp_path, slow)
    s = run(tmp_path, tok, [{"messages": [U("hi"), A("ok")]}, {"messages": [U("x" * 5000), A("ok")]},
                            {"messages": [U("yo"), A("ok")]}], template_time_limit_s=0.5)
    assert s["conversations"]["written"] == 2 and s["conversations"]["rejected_by_reason"] == {"template_limit": 1}


def test_strftime_now_is_the_runs_date(bpe_dir, tmp_path):
    tok = tokenizer_with(bpe_dir, tmp_path, "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{{ m.content }}"
                                            "{% endfor %}")
    s = run(tmp_path, tok, [{"messages": [U("hi"), A("ok")]}], template_date="2024-07-26")
    hf = transformers.AutoTokenizer.from_pretrained(tok)
    assert s["tokens"] == len(hf.encode("26 Jul 2024hiok", add_special_tokens=False))
    with pytest.raises(Exception, match="not YYYY-MM-DD"):
        run(tmp_path, tok, [{"messages": [U("hi"), A("ok")]}], template_date="yesterday")
