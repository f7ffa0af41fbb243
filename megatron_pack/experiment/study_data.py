"""The study's data, prepared once under ``OUT/data``: seeded disjoint train / held-out chats
from one chat JSONL (held-out kept in file order), preprocessed with the model's own template,
the QA prompts of the generation score, and the model's Megatron import."""

from __future__ import annotations

import json
import os
import random


def split_chats(lines: list, heldout_docs: int, train_docs: int | None, data_seed: int) -> tuple[list, list]:
    """Line indices ``(train, held_out)``: a seeded draw, each sorted back into file order (so
    same-category chats stay neighbours in the held-out rows)."""
    order = list(range(len(lines)))
    random.Random(data_seed).shuffle(order)
    n_held = min(heldout_docs, len(lines) // 2)
    held = sorted(order[:n_held])
    rest = order[n_held:]
    return sorted(rest[:train_docs] if train_docs else rest), held


def read_qa(path: str | None, limit: int | None) -> list[dict]:
    """``{"question", "answer"}`` from the first two messages of each chat of ``path``."""
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        qa = [json.loads(ln) for ln in f if ln.strip()]
    return [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
            for r in qa[:limit] if len(r.get("messages", [])) >= 2]


def portable(path: str, out: str) -> str:
    """``path`` as a result file may record it: relative to ``out`` when inside it, ``~/...``
    inside the home directory, else its last two parts (no absolute path of this machine)."""
    path, out = os.path.abspath(path), os.path.abspath(out)
    if path == out or path.startswith(out + os.sep):
        return os.path.relpath(path, out)
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home):]
    return os.path.join(*path.split(os.sep)[-2:])


def prepare(args, out: str) -> dict:
    """The prepared data's record (``OUT/data/prepared.json``); idempotent. Paths in it are
    absolute (the runs read them); :func:`portable` writes them into results."""
    ddir = os.path.join(out, "data")
    info_path = os.path.join(ddir, "prepared.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.setdefault("data_seed", 1234) != args.data_seed:  # pre-seed files were prepared with 1234
            raise SystemExit(f"error: {info_path} was prepared with --data-seed {info['data_seed']}, not "
                             f"{args.data_seed}; use another --output-dir")
        return info
    from megatron_pack.convert import convert_hf_to_megatron
    from megatron_pack.files.atomic import write_json_atomic
    from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess

    os.makedirs(ddir, exist_ok=True)
    with open(args.data_path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    train, held = split_chats(lines, args.heldout_docs, args.train_docs, args.data_seed)
    info = {"source": os.path.abspath(args.data_path), "data_seed": args.data_seed, "train_docs": len(train),
            "heldout_docs": len(held)}
    for name, idx in (("train", train), ("heldout", held)):
        path = os.path.join(ddir, name + ".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i] for i in idx)
        summary = preprocess(PreprocessConfig(inputs=[path], tokenizer=args.model,
                                              output_prefix=os.path.join(ddir, name),
                                              max_seq_length=args.seq_length, progress=False, plot=False))
        info[name + "_tokens"] = int(summary.get("tokens", 0)) if isinstance(summary, dict) else None
        info[name] = os.path.join(ddir, name)
    info["qa"] = read_qa(args.qa_path, args.qa)
    info["import"] = os.path.join(ddir, "import")
    if not os.path.isdir(info["import"]):
        convert_hf_to_megatron(args.model, info["import"], progress=False)
    write_json_atomic(info, info_path)
    return info
