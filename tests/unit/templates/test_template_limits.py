"""Crafted templates cannot stall or blow up a run: a record over a bound is rejected with the
reason, a template that cannot compile is a one-line error. Each case runs in about a second."""

import time

import pytest

from megatron_pack.preprocess.encode import encode_conversation
from megatron_pack.templates.jinja_template import JinjaTemplate
from megatron_pack.templates.messages import Message as M
from megatron_pack.templates.messages import RecordError
from megatron_pack.tokenization.tokenizer import TokenizerError, load_tokenizer

pytest.importorskip("transformers")

OK = [M("user", "hi"), M("assistant", "hello")]


def tmpl(dir_, source, **kw):
    return JinjaTemplate(load_tokenizer(dir_), source, time_limit_s=kw.pop("t", 0.5), max_chars=kw.pop("n", 100_000))


@pytest.mark.parametrize("source,match", [
    ("{% set x = 'a' * 3000000000 %}{% for m in messages %}{{ m.content }}{% endfor %}", "'\\*' would build"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{{ 'ab' | center(10 ** 9) }}", "center"),
    ("{% for m in messages %}{{ m.content | tojson(indent=10**9) }}{% endfor %}", "tojson indent"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "'\\+' would build"),
])
def test_template_over_bounds_is_refused_quickly(wordlevel_dir, source, match):
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match=match):  # the one-message probe already hits the bound
        tmpl(wordlevel_dir, source)
    assert time.perf_counter() - t0 < 5


def test_record_over_bounds_is_a_reject_and_others_pass(wordlevel_dir):
    # Only long records blow up: output grows with the message length.
    src = "{% for m in messages %}{{ m.content * 1000 }}{% endfor %}"
    t = tmpl(wordlevel_dir, src)
    encode_conversation(t, OK)  # a short record is fine
    with pytest.raises(RecordError) as err:
        encode_conversation(t, [M("user", "x" * 200), M("assistant", "y")])
    assert err.value.reason == "template_limit" and "limit" in err.value.detail


def test_output_size_bound(wordlevel_dir):
    src = "{% for i in range(messages | length * 5000) %}{{ messages[0].content }}{% endfor %}"
    t = tmpl(wordlevel_dir, src, n=50_000)
    with pytest.raises(RecordError, match="exceeds 50,000 characters"):
        encode_conversation(t, [M("user", "hello world"), M("assistant", "y")] * 2)


def test_unparsable_template_is_one_line(wordlevel_dir):
    with pytest.raises(TokenizerError) as err:
        tmpl(wordlevel_dir, "{% for m in messages %}{{ m.content }")
    assert "\n" not in str(err.value) and "line 1" in str(err.value)


def test_ten_thousand_turns_render_in_linear_time(bpe_dir):
    """Rendering is two passes over the chat, not one per turn (the old incremental renderer
    took minutes on such a record)."""
    from megatron_pack.templates.builtin_templates import QWEN25_CHAT_TEMPLATE

    t = JinjaTemplate(load_tokenizer(bpe_dir), QWEN25_CHAT_TEMPLATE)
    msgs = [M("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(10_000)]
    t0 = time.perf_counter()
    ids, mask, turns = encode_conversation(t, msgs)
    assert time.perf_counter() - t0 < 30
    assert len(turns) >= 10_000 and mask.sum() > 0


def test_a_transformers_without_the_private_environment_fails_on_one_line(wordlevel_dir, monkeypatch):
    """jinja_env leans on transformers' private ``_compile_jinja_template``: a release without it
    is a one-line TokenizerError naming the version, not a traceback mid-run (negative control: with
    it, the same template builds)."""
    import sys
    import types

    import transformers

    tok = load_tokenizer(wordlevel_dir)
    assert JinjaTemplate(tok).template is not None
    monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", types.ModuleType("stub"))
    with pytest.raises(
        TokenizerError, match=f"transformers {transformers.__version__} has no .*_compile_jinja_template"
    ):
        JinjaTemplate(tok)
