#!/usr/bin/env python
"""The paper's question on real pretrained weights: fine-tune with and without the document
mask under padding / greedy / random / bfd, then measure time, quality and leakage.

    bash scripts/fetch_small_model.sh                           # SmolLM2-135M-Instruct + chatterbot corpus
    python benchmarks/bench_real_model_study.py --preset small  # the reduced CPU table (5-33 min on 2 cores)
    python benchmarks/bench_real_model_study.py --preset small --seeds 1234 2 3 4 5  # the published table; the report
                                                                          # aggregates every seed present
    torchrun --nproc-per-node 8 benchmarks/bench_real_model_study.py --model /models/my-hf-dir \\
        --data-path /data/chat.jsonl --qa-path /data/qa.jsonl --preset full -- --tensor-model-parallel-size 2

Builds on ``megatron_pack.experiment``: every setting is trained by ``compare.run_setting``
(same initial weights from one HF import, same seed, same held-out set, the same epochs) and
tabulated by its Table-5/loss tables; leakage is ``experiment.leakage.analyze_sequences`` (the
core of ``tools/analyze_leakage.py``). Added here, per setting and for the base model:

- held-out loss of the exported HF model in transformers (each held-out chat alone, token-weighted
  over supervised tokens), beside the trainer's own evaluation;
- a generation score: greedy answers to held-out QA prompts, answer-contained and exact match;
- leakage before/after: base vs ``greedy/nomask`` vs ``greedy`` fine-tunes on the same packed
  held-out rows (attention on earlier documents by distance from the start, sink apart; loss
  contamination), and the neighbours effect: the same held-out chats packed in file order
  (same-topic neighbours) vs shuffled.

Seeds: ``--seed S`` is the training seed (row order, random packing); the train / held-out split,
the QA prompts and the leakage rows come from ``--data-seed`` (default 1234) so every seed is scored
on the same data and the base model is scored once. Each seed's finished settings are in
``OUT/study_seed{S}.json``; a rerun with the same seed skips them (``--max-minutes`` stops between
settings). A pre-seed ``OUT/study.json`` (one seed's state) is moved to ``study_seed{S}.json``.
The report (``bench_real_model_report.py``) aggregates every seed present into ``OUT/study.json``
(per setting mean / min / max / std over seeds), study.md, loss_vs_time.png, study_quality.png and
study_leakage.png. Under torchrun prepare once first (``--prepare-only``, one process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CACHE = os.environ.get("MEGATRON_PACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_pack")
DEFAULT_MODEL = os.environ.get("MEGATRON_PACK_SMALL_MODEL") or os.path.join(CACHE, "smollm2-135m-instruct")
DEFAULT_DATA = os.path.join(CACHE, "chatterbot-corpus-en", "train.jsonl")
DEFAULT_QA = os.path.join(CACHE, "chatterbot-corpus-en", "qa_heldout.jsonl")
#: Settings in run order: the leakage pair first (most informative if the budget runs out).
SETTINGS = ("greedy", "greedy/nomask", "padding", "bfd", "bfd/nomask", "random", "random/nomask")
PRESETS = {  # train chats, held-out chats, QA prompts, seq, micro, global batch, lr, epochs, layers
    "small": dict(train_docs=24, heldout_docs=16, qa=24, seq_length=512, mbs=1, gbs=1, lr=5e-5, epochs=1.0,
                  layers=[0, 5, 10, 15, 20, 25, 29], leak_sequences=2),
    "full": dict(train_docs=None, heldout_docs=128, qa=None, seq_length=1024, mbs=1, gbs=8, lr=2e-5, epochs=2.0,
                 layers=None, leak_sequences=16),
}
RANK = int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    if RANK == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------- data
def prepare(args, out: str) -> dict:
    """Seeded disjoint train / held-out chats (held-out kept in file order), preprocessed with
    the model's own template, plus the QA prompts. Idempotent."""
    ddir = os.path.join(out, "data")
    info_path = os.path.join(ddir, "prepared.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        if info.setdefault("data_seed", 1234) != args.data_seed:  # pre-seed files were prepared with 1234
            raise SystemExit(f"error: {info_path} was prepared with --data-seed {info['data_seed']}, not "
                             f"{args.data_seed}; use another --output-dir")
        return info
    from megatron_pack.preprocess.pipeline import PreprocessConfig, preprocess

    os.makedirs(ddir, exist_ok=True)
    lines = [ln for ln in open(args.data_path, encoding="utf-8") if ln.strip()]
    order = list(range(len(lines)))
    random.Random(args.data_seed).shuffle(order)
    n_held = min(args.heldout_docs, len(lines) // 2)
    held = sorted(order[:n_held])  # file order: same-category chats stay neighbours
    rest = order[n_held:]
    train = sorted(rest[:args.train_docs] if args.train_docs else rest)
    info = {"source": os.path.abspath(args.data_path), "data_seed": args.data_seed, "train_docs": len(train),
            "heldout_docs": len(held)}
    for name, idx in (("train", train), ("heldout", held)):
        path = os.path.join(ddir, name + ".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i] for i in idx)
        summary = preprocess(PreprocessConfig(inputs=[path], tokenizer=args.model, output_prefix=os.path.join(ddir, name),
                                              max_seq_length=args.seq_length, progress=False, plot=False))
        info[name + "_tokens"] = int(summary.get("tokens", 0)) if isinstance(summary, dict) else None
        info[name] = os.path.join(ddir, name)
    qa = [json.loads(ln) for ln in open(args.qa_path, encoding="utf-8") if ln.strip()] if args.qa_path else []
    info["qa"] = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
                  for r in qa[:args.qa] if len(r.get("messages", [])) >= 2]
    from megatron_pack.convert import convert_hf_to_megatron

    info["import"] = os.path.join(ddir, "import")
    if not os.path.isdir(info["import"]):
        convert_hf_to_megatron(args.model, info["import"], progress=False)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


# ---------------------------------------------------------------- scoring (rank 0, transformers)
def load_hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def heldout_loss(model, prefix: str) -> float:
    """Token-weighted loss over supervised targets, each held-out chat alone."""
    import torch

    from megatron_pack.files.indexed import SFTIndexedDataset

    data = SFTIndexedDataset(prefix)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            t, m = data.get_slice(i, 0, int(data.lengths[i]))
            ids = torch.as_tensor(t, dtype=torch.long)[None]
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:],
                                                    reduction="none")
            w = torch.as_tensor(m[1:], dtype=torch.bool)
            total += float(nll[w].sum())
            count += int(w.sum())
    return total / max(count, 1)


def _norm(s: str) -> str:
    import re

    s = re.sub(r"[^a-z0-9 ]", " ", s.lower())
    words = [w for w in s.split() if w not in ("the", "a", "an")]
    return " ".join(words)


def generation_score(model, tokenizer, qa: list, max_new_tokens: int = 24, batch: int = 16) -> dict:
    """Greedy answers to the QA prompts: answer-contained (normalized reference inside the
    normalized answer) and exact match."""
    import torch

    if not qa:
        return {"prompts": 0}
    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for a in range(0, len(qa), batch):
        chunk = qa[a:a + batch]
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in chunk]
        ids = [list(x["input_ids"] if isinstance(x, dict) else x) for x in ids]
        width = max(map(len, ids))
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
        att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    contained = [bool(_norm(q["answer"])) and _norm(q["answer"]) in _norm(g) for q, g in zip(qa, answers)]
    exact = [_norm(q["answer"]) == _norm(g) for q, g in zip(qa, answers)]
    return {"prompts": len(qa), "contained": sum(contained) / len(qa), "exact": sum(exact) / len(qa),
            "examples": [{"q": q["question"], "ref": q["answer"], "got": g} for q, g in zip(qa[:5], answers[:5])]}


def leakage_rows(prefix: str, seq_length: int, seed: int):
    """The held-out chats packed next-fit into rows of ``seq_length`` (room left for the
    doubled-separator variant): in file order (same-topic neighbours) and shuffled."""
    from megatron_pack.experiment.leakage_report import detect_separator
    from megatron_pack.files.indexed import SFTIndexedDataset

    data = SFTIndexedDataset(prefix)
    docs = [data.get_slice(i, 0, int(data.lengths[i])) for i in range(len(data))]

    def pack(order):
        rows, cur, used = [], [], 0
        for i in order:
            n = len(docs[i][0]) + 1
            if cur and used + n > seq_length:
                rows.append(cur)
                cur, used = [], 0
            cur.append(docs[i])
            used += n
        rows.append(cur)
        return [r for r in rows if len(r) >= 2]

    order = list(range(len(docs)))
    shuffled = order[:]
    random.Random(seed).shuffle(shuffled)
    return detect_separator(data), {"file order": pack(order), "shuffled": pack(shuffled)}


def leakage_summary(res: dict) -> dict:
    """Layer-mean figures: right after the boundary (d=0, d=1), 128+ tokens in, the sink apart."""
    import numpy as np

    att = res["attention"]
    counts = np.asarray(att["tokens_per_bucket"], dtype=float)
    leak, sink = np.asarray(att["leak"], dtype=float), np.asarray(att["sink"], dtype=float)
    alone = np.asarray(att["alone_first"], dtype=float)
    far = [i for i, name in enumerate(att["buckets"]) if int(name.split("-")[0].lstrip(">=")) >= 128 and counts[i] > 0]

    def at(arr, idx):
        if not idx:
            return None
        w = counts[idx] / counts[idx].sum()
        return float(np.nanmean(arr[:, idx], axis=0) @ w)

    c = res["contamination"]["as-is"]
    return {"leak_d0": at(leak, [0]), "leak_d1": at(leak, [1]), "leak_d128+": at(leak, far),
            "sink_d0": at(sink, [0]), "sink_d128+": at(sink, far), "alone_first_d128+": at(alone, far),
            "uniform_d0": float(att["uniform"][0]) if counts[0] else None,
            "tokens_d128+": int(counts[far].sum()) if far else 0,
            "leak_overall": float(np.mean(att["leak_overall"])), "sink_overall": float(np.mean(att["sink_overall"])),
            "contamination_mean": c.get("mean"), "contamination_mean_abs": c.get("mean_abs"),
            "contamination_docs": c.get("documents", 0),
            "contamination_se": (float(np.std(c["values"], ddof=1) / np.sqrt(len(c["values"])))
                                 if len(c.get("values", [])) > 1 else None),
            "contamination_values": c.get("values", []),
            "contamination_removed": res["contamination"]["removed"].get("mean"),
            "contamination_doubled": res["contamination"]["doubled"].get("mean"),
            "by_bucket": {"buckets": att["buckets"], "counts": att["tokens_per_bucket"],
                          "leak": np.nanmean(leak, axis=0).tolist()}}


def score_model(hf_dir: str, info: dict, args, leakage=("file order", "shuffled"), mask_check: bool = False) -> dict:
    from transformers import AutoTokenizer

    from megatron_pack.experiment.leakage import analyze_sequences

    t0 = time.perf_counter()
    model = load_hf(hf_dir)
    tok = AutoTokenizer.from_pretrained(args.model)
    out = {"heldout_loss_hf": heldout_loss(model, info["heldout"]), "generation": generation_score(model, tok, info["qa"])}
    log(f"  held-out loss (HF, each chat alone) {out['heldout_loss_hf']:.4f}; answer-contained "
        f"{out['generation'].get('contained', float('nan')):.1%} of {out['generation']['prompts']}")
    if leakage:
        sep, rows = leakage_rows(info["heldout"], args.seq_length, args.data_seed)
        layers = args.layers or list(range(model.config.num_hidden_layers))
        out["leakage"] = {}
        for arrangement in leakage:
            seqs = rows[arrangement][:args.leak_sequences]
            res = analyze_sequences(model, seqs, sep, layers)
            out["leakage"][arrangement] = {**leakage_summary(res), "sequences": len(seqs),
                                           "documents": sum(map(len, seqs))}
            s = out["leakage"][arrangement]
            log(f"  leakage ({arrangement}, {len(seqs)} rows): leak d=0 {s['leak_d0']:.2%}, d>=128 "
                f"{(s['leak_d128+'] or 0):.2%}, sink d=0 {s['sink_d0']:.2%}; contamination {s['contamination_mean']:+.4f} nats")
        if mask_check:  # the measurement's own check: with the mask every figure is 0
            res = analyze_sequences(model, rows["shuffled"][:1], sep, layers[:2], document_mask=True)
            a = res["attention"]
            out["mask_check"] = {
                "attention_max": float(max(max(abs(x) for x in row if x == x) for row in a["leak"] + a["sink"])),
                "contamination_max_abs": max(c.get("max_abs", 0.0) for c in res["contamination"].values())}
            log(f"  with the document mask: {out['mask_check']}")
    out["score_seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- the study
def base_config(args, info: dict, extra: list):
    from megatron_pack.config.cli import parse_args

    flags = ["--data-path", info["train"], "--valid-data-path", info["heldout"], "--valid-fraction", "0",
             "--tokenizer-model", args.model, "--pretrained-checkpoint", info["import"],
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.mbs),
             "--global-batch-size", str(args.gbs), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
             "--lr-warmup-fraction", "0.1", "--clip-grad", "1.0", "--log-interval", "1",
             "--train-epochs", str(args.epochs), "--seed", str(args.seed)]
    return parse_args(flags + extra)


def save_state(state: dict, path: str) -> None:
    from megatron_pack.files.atomic import write_json_atomic

    write_json_atomic(state, path)


def seed_state_path(out: str, seed: int) -> str:
    return os.path.join(out, f"study_seed{seed}.json")


def migrate_legacy(out: str) -> None:
    """A pre-seed ``study.json`` (one seed's state: it has ``rows``, not ``seeds``) becomes
    ``study_seed{S}.json``; its data seed was its seed."""
    path = os.path.join(out, "study.json")
    if not os.path.isfile(path):
        return
    state = json.load(open(path))
    if "rows" not in state or "seeds" in state:
        return
    seed = int(state["config"]["seed"])
    state["config"].setdefault("data_seed", seed)
    target = seed_state_path(out, seed)
    if os.path.exists(target):
        raise SystemExit(f"error: {path} is one seed's state but {target} exists too; move one away")
    save_state(state, target)
    os.remove(path)


def reuse_base(out: str, args) -> dict | None:
    """The base model's scores from another seed of the same data (they do not depend on the
    training seed), so each seed does not re-score it."""
    import glob

    for path in sorted(glob.glob(os.path.join(out, "study_seed*.json"))):
        other = json.load(open(path))
        c = other.get("config", {})
        same = all(c.get(k) == getattr(args, k) for k in ("model", "data_seed", "seq_length", "qa", "layers",
                                                           "leak_sequences", "heldout_docs"))
        if same and other.get("base"):
            return other["base"]
    return None


def run_one(base, name: str, out: str, info: dict, args, state: dict, state_path: str) -> dict:
    from megatron_pack.convert import convert_megatron_to_hf
    from megatron_pack.experiment.compare import run_setting
    from megatron_pack.experiment.settings import Setting

    setting = Setting.parse(name)
    safe = name.replace("/", "_").replace(":", "_")
    out = os.path.join(out, f"seed{args.seed}")  # step logs, checkpoints, exports of this seed
    ckpt, hf = os.path.join(out, "ckpt", safe), os.path.join(out, "hf", safe)
    row = state["trained"].get(name)
    if row is None or not os.path.isfile(os.path.join(hf, "config.json")):  # else: trained, scoring was cut short
        shutil.rmtree(ckpt, ignore_errors=True)
        os.makedirs(os.path.join(out, "runs"), exist_ok=True)  # run_setting writes its step log there
        row = run_setting(base, setting, out, args.evals_per_run, save=ckpt)
        if RANK != 0:
            return row
        shutil.rmtree(hf, ignore_errors=True)
        convert_megatron_to_hf(ckpt, hf, dtype="fp32", progress=False)
        shutil.rmtree(ckpt, ignore_errors=True)  # optimizer state is GBs; the HF export is what is scored
        state["trained"][name] = row
        save_state(state, state_path)
    arrangements = {"greedy/nomask": ("file order", "shuffled"), "greedy": ("shuffled",)}.get(name, ())
    row.update(score_model(hf, info, args, leakage=arrangements))
    row["loadavg_1m"] = os.getloadavg()[0]  # timings are only comparable at similar machine load
    if not args.keep_hf:
        shutil.rmtree(hf, ignore_errors=True)
    return row


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model directory (Llama / Mistral / Qwen2)")
    p.add_argument("--data-path", default=DEFAULT_DATA, help="chat JSONL (train and held-out chats are drawn from it)")
    p.add_argument("--qa-path", default=DEFAULT_QA, help="chat JSONL of question/answer pairs for the generation score")
    p.add_argument("--output-dir", default=os.path.join("outputs", "real_model_study"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--train-docs", type=int, default=None)
    p.add_argument("--heldout-docs", type=int, default=None)
    p.add_argument("--qa", type=int, default=None, help="QA prompts scored")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--evals-per-run", type=int, default=0, help="trainer evaluations before the final one")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[1234],
                   help="training seed(s) (row order, random packing), run one after another")
    p.add_argument("--data-seed", type=int, default=1234,
                   help="train / held-out split and leakage rows; keep it fixed across --seed repeats")
    p.add_argument("--max-minutes", type=float, default=None, help="start no setting after this (rerun resumes)")
    p.add_argument("--keep-hf", action="store_true", help="keep each fine-tune's HF export")
    p.add_argument("--no-mask-check", dest="mask_check", action="store_false")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then training flags for every run")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for flag, path in (("--model", os.path.join(args.model, "config.json")), ("--data-path", args.data_path)):
        if not os.path.isfile(path):
            p.error(f"{flag} {path}: not found (bash scripts/fetch_small_model.sh fetches the defaults)")
    if args.qa_path and not os.path.isfile(args.qa_path):
        p.error(f"--qa-path {args.qa_path}: not found")
    return args


def run_seed(args, out: str, info: dict, extra: list, t0: float) -> bool:
    """Every setting of one training seed (``args.seed``), resuming from its state file;
    False once ``--max-minutes`` stopped it."""
    state_path = seed_state_path(out, args.seed)
    state = json.load(open(state_path)) if os.path.isfile(state_path) else {"rows": {}}
    state.setdefault("trained", {})
    state["config"] = {k: v for k, v in vars(args).items() if k not in ("train_flags", "seeds")} | {"train_flags": extra}
    state["prepared"] = {k: v for k, v in info.items() if k != "qa"}
    if "base" not in state and RANK == 0 and (reused := reuse_base(out, args)) is not None:
        log("=== base model: scores reused from another seed of the same data ===")
        state["base"] = reused
        save_state(state, state_path)
    if "base" not in state and RANK == 0:
        log("=== base model (before fine-tuning) ===")
        state["base"] = score_model(args.model, info, args, mask_check=args.mask_check)
        save_state(state, state_path)
    base = base_config(args, info, extra)
    for name in args.settings:
        if name in state["rows"]:
            log(f"=== {name}: done (in {state_path}), skipped ===")
            continue
        if args.max_minutes and (time.perf_counter() - t0) / 60 > args.max_minutes:
            log(f"=== --max-minutes {args.max_minutes} reached: {name} and later not run; rerun to continue ===")
            return False
        log(f"\n=== {name} ({(time.perf_counter() - t0) / 60:.1f} min elapsed) ===")
        row = run_one(base, name, out, info, args, state, state_path)
        if RANK == 0:
            state["rows"][name] = row
            save_state(state, state_path)
    return True


def main(argv=None) -> int:
    args = parse(argv)
    extra = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    out = os.path.abspath(args.output_dir)
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not os.path.isfile(os.path.join(out, "data", "prepared.json")):
        print("error: under torchrun run once with --prepare-only first (one process)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = prepare(args, out)
    if args.prepare_only:
        log(json.dumps({k: v for k, v in info.items() if k != "qa"}, indent=1))
        return 0
    if RANK == 0:
        migrate_legacy(out)
    for seed in args.seeds:
        args.seed = seed
        if not run_seed(args, out, info, extra, t0):
            break
    if RANK == 0:
        from bench_real_model_report import report_dir

        md = report_dir(out)
        print(md)
        done = ", ".join(os.path.basename(seed_state_path(out, seed)) for seed in args.seeds)
        print(f"\nwrote {done}; study.json (all seeds), study.md and the PNGs under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
