"""What a chat template may allocate is bounded, not only what it outputs: a template that builds
a huge string it never prints (``''.zfill(2**31)`` once rendered at 2 GB RSS and was accepted) is
a ``template_limit`` reject, refused before the string exists. Measured in a subprocess under an
address-space limit of 800 MB (the script itself needs ~75 MB resident, ~400 MB of address space)."""

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

ADDRESS_SPACE = 800 << 20
# 2^28 characters (268 MB): fits the limit, so only a bound on building it refuses it.
N = 2 ** 28
BUILDERS = {
    "zfill": f"''.zfill({N})",
    "ljust": f"'a'.ljust({N})",
    "center method": f"'a'.center({N})",
    "format width": "'{:>%d}'.format(1)" % N,
    "nested format width": "'{:>{w}}'.format(1, w=%d)" % N,
    "replace": "('a' * 20000).replace('a', 'b' * 20000)",
    "join method": "('a' * 20000).join('b' * 20000)",
    "join filter": "('b' * 20000) | join('a' * 20000)",
    "batch fill": f"[1] | batch({N}, 'x') | list",
    "expandtabs": "('\\t' * 100).expandtabs(%d)" % (N // 100),
}
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from megatron_pack.preprocess.encode import encode_conversation
    from megatron_pack.templates.jinja_template import JinjaTemplate
    from megatron_pack.templates.messages import Message as M, RecordError
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    tok, out = load_tokenizer(sys.argv[1]), {}
    short, long = [M("user", "hi"), M("assistant", "ok")], [M("user", "hi"), M("assistant", "ok")] * 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, expr in json.loads(sys.argv[2]).items():
        # the bomb only for records of more than two messages: the template itself is accepted
        src = ("{% if messages | length > 2 %}{% set x = " + expr + " %}{% endif %}"
               "{% for m in messages %}{{ m.content }}{% endfor %}")
        t = JinjaTemplate(tok, src)
        encode_conversation(t, short)
        try:
            encode_conversation(t, long)
            out[name] = "accepted"
        except RecordError as e:
            out[name] = e.reason + ": " + e.detail
    out["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps(out))
""")


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_template_allocations_bounded_before_they_happen(wordlevel_dir):
    res = subprocess.run([sys.executable, "-c", SCRIPT, wordlevel_dir, json.dumps(BUILDERS)], capture_output=True,
                         text=True, preexec_fn=_limited, timeout=120, env={**os.environ})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in BUILDERS:
        assert out[name].startswith("template_limit: ") and "would build" in out[name], (name, out[name])
    assert out["rss_growth_kb"] < 100_000, out  # nothing near the 268 MB string was allocated


def test_the_same_methods_within_bounds_render_as_transformers_does(wordlevel_dir):
    """Negative control: the intercepted methods and filters still compute what Jinja computes."""
    from megatron_pack.templates.jinja_env import bounded_environment, compile_template, render_bounded

    src = ("{{ 'a'.zfill(5) }}|{{ '{:>5}'.format('x') }}|{{ '{:>{w}}'.format('y', w=3) }}|{{ 'x' ~ 'y' }}|"
           "{{ ['a', 'b'] | join(', ') }}|{{ 'ab'.replace('a', 'cc') }}|{{ '-'.join(['a', 'b']) }}|"
           "{{ [1, 2, 3] | batch(2, 0) | list }}|{{ 'ab'.center(6) }}|{{ 'a\\tb'.expandtabs(4) }}")
    want = "0000a|    x|  y|xy|a, b|ccb|a-b|[[1, 2], [3, 0]]|  ab  |a   b"
    assert render_bounded(compile_template(src, bounded_environment()), 10_000, 5.0) == want
    import jinja2.sandbox

    assert jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(src).render() == want
