"""Preprocessing writes the same bytes as the recorded runs (the guard for refactors of the
tokenizers / templates / preprocess packages).

Four runs of the real CLI (``tools/preprocess_sft.py``, one subprocess each, fixed arguments,
relative paths so the summary is path-free): the built-in sample through the ``llama3`` fast path
and through the tokenizer's own Jinja template, and a mixed file (sample records, typed control
tokens, tool calls, bad records) through a tokenizer directory's ``chat_template.jinja`` with
``{% generation %}`` markers (encoded by ``tokenizers``, not tiktoken) and through
``--chat-template qwen2.5``. Every output file (``.bin``/``.idx`` of tokens, loss mask and turns,
summary, rejects) is hashed. ``--no-plot``: the histogram is drawn from the lengths the ``.idx``
already pins, by matplotlib's renderer.

The sample tokenizer is trained here by ``tokenizers``; its hash is recorded too, so a different
``tokenizers`` release reads as "fixture changed", not as a behaviour change. Re-record (after a
deliberate change, saying why in the commit) with
``python tests/unit/preprocess/test_outputs_unchanged.py --record``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(ROOT, "tools", "preprocess_sft.py")
ASSET = os.path.join(ROOT, "megatron_pack", "assets", "sample_chat.jsonl")

GEN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
EXTRA_LINES = [
    json.dumps({"messages": [U("Type <|im_end|> and <|eot_id|> for me"), A("Here: <|im_end|> <|eot_id|> done")]}),
    json.dumps(
        {
            "messages": [
                {"role": "system", "content": "Use tools."},
                U("call f"),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
                },
                {"role": "tool", "content": "42"},
                A("It is 42."),
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        }
    ),
    '{"messages": [{"role": "user", "content": "cut off"',
    json.dumps({"messages": [{"role": "wizard", "content": "x"}, A("y")]}),
    json.dumps({"messages": [U("only a question")]}),
    "",
    json.dumps({"conversations": [{"from": "human", "value": "long " * 700}, {"from": "gpt", "value": "ok " * 50}]}),
]

#: name -> (input, tokenizer, extra CLI arguments)
RUNS = {
    "sample_fast": (
        "sample.jsonl",
        "tok",
        ["--chat-template", "llama3", "--max-seq-length", "1024", "--overlong", "split-chat"],
    ),
    "sample_auto": ("sample.jsonl", "tok", ["--max-seq-length", "768", "--loss-on", "last"]),
    "mixed_dir_template": (
        "mixed.jsonl",
        "tok_gen",
        ["--max-seq-length", "900", "--overlong", "drop", "--no-fast-tokenizer"],
    ),
    "mixed_qwen": (
        "mixed.jsonl",
        "tok",
        [
            "--chat-template",
            "qwen2.5",
            "--template-date",
            "2024-07-26",
            "--max-seq-length",
            "512",
            "--overlong",
            "split-chat",
        ],
    ),
}

RECORDED_TOKENIZER = "0382193634abc130f61430644ca86f9b446e2b09f1f96a34e550810a4044506d"
RECORDED = {
    "sample_fast": {
        "data.bin": "57357e0ce51dc77c769844ba9c9afb48926856b028357c73a472e369c93310d9",
        "data.idx": "f049278a03d385da0fa57161dd613fe5126f1c093fbc41c5955b9c4a9c9dec79",
        "data_loss_mask.bin": "4d16ea271dc54b1fe23be0841ddac1336d77b1edfda4deff4e7cbcf1c211faee",
        "data_loss_mask.idx": "0327b50bf18b6797da5e1a01c7cb13120714c315b18d94125b029429dd58209e",
        "data_rejects.jsonl": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "data_summary.json": "d8ca7fafa275acf5622af54caf8d9164e2cca7b9a10ce2a6e7347ff2ea093f9c",
        "data_turns.bin": "d6a48c76c189b82220b96f0c5df0572e1b9226ad410288fe4eede01b6e57e45e",
        "data_turns.idx": "fbe7890340c5056b551a0add3c2b219f2286fba4bffacdd9f13689dfc01822c2",
    },
    "sample_auto": {
        "data.bin": "864b8f47d91959b908f3abd6b71a165d31de5abd3f24063e6e236e0bd31555e0",
        "data.idx": "7528c0d6838fbd9723a79187f30d7ced3b13e5d9795cc79e1f1c5491cc1c75e1",
        "data_loss_mask.bin": "7c297fb73abbf4ba3087bd25e1562f5c0517cb003138d1a7ac516e2ad1711113",
        "data_loss_mask.idx": "41b34de79b99effcc1533c17d55719a78969c222edfa0c335102fa2c979910c3",
        "data_rejects.jsonl": "f43cc0f078eea79a31f713af73bb4a018cc2ba36a35c96346ac969ea708854e3",
        "data_summary.json": "3c83340398fe8f1853a9948b4c43a274934b3d82d3eaa68aa3ee269aa14cfeb5",
        "data_turns.bin": "af27ba5b3095d4036946dd55a8bb7e7582dbbaf423745fb8f37f4bf3a127bbd4",
        "data_turns.idx": "2a330e3e2043ba6fcf01d735566e9f6378cec1ed953f62f41eb06dca7a3fc9ee",
    },
    "mixed_dir_template": {
        "data.bin": "b258e14e7f1a7b6a550a8213340689705d13da35f433ad0aabd0143da12689b2",
        "data.idx": "741c76fec4554a57e63471a7601fbeb823073973180b5f6f03c701933548e99e",
        "data_loss_mask.bin": "f300dd63f23629535d3e49d96dbd8206815854e3e9b84ff737c47b616133bae1",
        "data_loss_mask.idx": "cc988b59bb5f1b8cbb7a78cb368d013f80af1cada6ec2cd87c3276a17da7cc7d",
        "data_rejects.jsonl": "5a01450ed974b26cce887ebccea070663d15149141e3cb209cd7323e6e7da5e3",
        "data_summary.json": "55268bf96fda7b365c6836b432534b1d10948ebce70c4d3d94eac9e0562be200",
        "data_turns.bin": "3629403a215907d2a38a4b44d02484b45f5e1543a59d7a446a28db27b0c44afd",
        "data_turns.idx": "50c54a721e5790985753337f289cc6ba2a35a3247d0860325988529dc1b21201",
    },
    "mixed_qwen": {
        "data.bin": "2211ac2f8509b951e4b0e3848823db1814fa2ada32bf399d151a5b86ffac3efe",
        "data.idx": "c6d891707f1c2c9520bb257b9c939cc994e237b3c2323de8bd4b5096a1a2694a",
        "data_loss_mask.bin": "a31ccea40ced11ae14e3223b2a02e9dd76da82e55dd0d74487e351008a637f40",
        "data_loss_mask.idx": "14d8d2e96dd65ea80e0d8fe81d25bf84310f622579be261b41c03b1134dcae99",
        "data_rejects.jsonl": "e4a13522b52f38c04e9810fb4680ad0e56d3bb518a6e0b35f9ebe978336d1e58",
        "data_summary.json": "4080bb69c3c40f308bf2c4ced8703573bb7c6bf489471476af9a4f76d6057abc",
        "data_turns.bin": "0b859b36b222a1f516808f1633b2eee29875492a5694f926146dec8349f5993b",
        "data_turns.idx": "350dbd87205cfbc41e97b7cebefe6efb7f7796d2354e78521aeed5493a37d6fd",
    },
}


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare_inputs(work: str) -> str:
    """sample.jsonl, mixed.jsonl, tok/ (the sample tokenizer), tok_gen/ (same, own template)."""
    from megatron_pack.preprocess.sample import prepare_sample

    _, tok = prepare_sample(os.path.join(work, "sample_build"))
    shutil.copyfile(ASSET, os.path.join(work, "sample.jsonl"))
    with open(ASSET, encoding="utf-8") as f:
        head = [next(f).rstrip("\n") for _ in range(120)]
    with open(os.path.join(work, "mixed.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(head[:60] + EXTRA_LINES + head[60:]) + "\n")
    shutil.copytree(tok, os.path.join(work, "tok"), dirs_exist_ok=True)
    gen = os.path.join(work, "tok_gen")
    shutil.copytree(tok, gen, dirs_exist_ok=True)
    cfg_path = os.path.join(gen, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("chat_template", None)
    cfg["eos_token"] = "<|im_end|>"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    with open(os.path.join(gen, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(GEN_TEMPLATE)
    return _sha(os.path.join(tok, "tokenizer.json"))


def run_cli(work: str, name: str, patch: str = "") -> dict:
    """Run ``name`` through the CLI in ``work``; {output file: sha256}. ``patch``: Python run
    before the tool (the negative control)."""
    src, tok, extra = RUNS[name]
    out_dir = os.path.join(work, "out", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    args = [
        "--input",
        src,
        "--tokenizer",
        tok,
        "--output-prefix",
        f"out/{name}/data",
        "--no-plot",
        "--no-progress",
        *extra,
    ]
    if patch:
        boot = (
            f"import runpy, sys; sys.path.insert(0, {ROOT!r}); {patch}; sys.argv = [{TOOL!r}] + sys.argv[1:]; "
            f"runpy.run_path({TOOL!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", boot, *args]
    else:
        cmd = [sys.executable, TOOL, *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return {f: _sha(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("unchanged"))
    tok_sha = prepare_inputs(work)
    if tok_sha != RECORDED_TOKENIZER:
        import tokenizers

        pytest.fail(
            f"the sample tokenizer trained by tokenizers {tokenizers.__version__} differs from the recorded "
            f"one ({tok_sha[:12]} != {str(RECORDED_TOKENIZER)[:12]}): the fixture changed, not the code; "
            f"re-record with --record on the old code first"
        )
    return work


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_match_the_recorded_hashes(work, name):
    got = run_cli(work, name)
    assert set(got) == set(RECORDED[name]), "a different set of output files"
    assert {f: h for f, h in got.items() if RECORDED[name][f] != h} == {}


# The end-of-turn token of llama3 replies left untrained: one rule, a few bytes of the loss mask.
_EOT_UNTRAINED = (
    "import megatron_pack.templates.fast_paths as T; _r = T.Llama3Template.render\n"
    "def render(self, messages, tools=None):\n"
    "    out = _r(self, messages, tools)\n"
    "    out.trained = [t and p != self.eot for t, p in zip(out.trained, out.parts)]\n"
    "    return out\n"
    "T.Llama3Template.render = render"
)


@pytest.mark.slow
def test_negative_control_a_changed_end_of_turn_rule_is_caught(work):
    got = run_cli(work, "sample_fast", patch="exec(" + repr(_EOT_UNTRAINED) + ")")
    changed = sorted(f for f, h in got.items() if RECORDED["sample_fast"][f] != h)
    assert changed == ["data_loss_mask.bin", "data_summary.json"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as d:
        record = {"tokenizer": prepare_inputs(d), "runs": {n: run_cli(d, n) for n in RUNS}}
    print(json.dumps(record, indent=1))
