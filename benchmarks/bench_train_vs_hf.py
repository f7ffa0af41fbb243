"""Training throughput against what a user would run instead: the same HF model, the same
conversations and loss masks, through megatron_pack and through transformers / TRL.

    python benchmarks/bench_train_vs_hf.py                    # CPU, fp32, ~21M-param Llama, seq 512
    python benchmarks/bench_train_vs_hf.py --shape tiny --steps 3 --repeats 1   # smoke run
    python benchmarks/bench_train_vs_hf.py --device cuda --shape 1b --json out.json   # bf16, GPU

Settings (each in its own process, so peak memory is its own; rounds interleave the
settings so a shared machine's load falls on all of them alike; the best round is kept):

==================  ===========================================================================
``mp_padding``      megatron_pack, one conversation per row padded to ``--seq-length``
``mp_greedy``       megatron_pack, greedy packing, document mask
``mp_bfd``          megatron_pack, best-fit decreasing, document mask
``hf_pad_max``      transformers ``Trainer``, ``DataCollatorForSeq2Seq(padding="max_length")``
``hf_grouped``      ``Trainer`` with length grouping (``train_sampling_strategy="group_by_length"``,
                    transformers 5's name for ``group_by_length=True``), padding to the longest in the batch
``trl_packing``     TRL ``SFTTrainer(packing=True)`` (bfd, padding-free: one flattened row with
                    ``position_ids``; transformers turns them into a block-diagonal mask for SDPA)
==================  ===========================================================================

All use AdamW (beta2 0.95, eps 1e-8, no weight decay), a constant learning rate, clipping at
1.0, ``--global-batch-size`` rows per step (conversations for the padded settings, packed
sequences for the packing ones). The TRL row is checked before it is timed: the loss of its
first flattened batch must equal the loss of the same conversations one per padded row (a
path that leaks attention across conversations is reported as wrong, not timed as a winner).

Columns: real (non-padding) tokens/s = mean real tokens per step / median step time (data
loading included); padding = share of the token slots that were padding; peak memory = the
process's max RSS on CPU (libraries included), ``torch.cuda.max_memory_allocated`` on GPU;
loss = the training loss of the last step (each setting sees its own order of conversations,
so losses are comparable only roughly); ``vs best HF`` = tokens/s over the fastest correct
transformers/TRL setting. On CPU, real tokens per CPU-second (the process's CPU time of the
median step; with ``--threads 1`` a loaded machine inflates it far less than wall time) is
printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from megatron_pack.experiment.hf_baseline import conversations, padding_free_check

MP_SETTINGS = ("mp_padding", "mp_greedy", "mp_bfd")
HF_SETTINGS = ("hf_pad_max", "hf_grouped", "trl_packing")
SETTINGS = MP_SETTINGS + HF_SETTINGS


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


SHAPES = {
    "tiny": Shape(128, 2, 4, 2, 352, 2048),
    "cpu": Shape(512, 6, 8, 2, 1408, 8192),  # ~21M parameters
    "1b": Shape(2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B's shape
}


# --------------------------------------------------------------------------------------------
# The shared inputs: one HF model directory, one set of conversations, one import.
# --------------------------------------------------------------------------------------------




def prepare(args) -> dict:
    """Write the HF model, a tokenizer (TRL needs one), the conversations (JSON for HF, the
    indexed dataset for megatron_pack) and the megatron_pack import under ``args.workdir``."""
    import torch
    import transformers as tf

    from megatron_pack.convert import convert_hf_to_megatron
    from megatron_pack.files.indexed import SFTDatasetWriter

    s = SHAPES[args.shape]
    root = os.path.abspath(args.workdir)
    paths = {k: os.path.join(root, k) for k in ("hf", "import", "sft", "convs.json", "tokenizer")}
    if os.path.exists(os.path.join(root, "ready.json")):
        return json.load(open(os.path.join(root, "ready.json")))
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, intermediate_size=s.ffn, vocab_size=s.vocab,
                         max_position_embeddings=max(4096, args.seq_length), rope_theta=500000.0, rms_norm_eps=1e-5,
                         initializer_range=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    with torch.device("cuda" if args.device == "cuda" else "cpu"):  # a 1B init on the GPU takes seconds
        model = tf.LlamaForCausalLM(cfg).float()
    if args.shape == "1b":  # half the bytes to write and read; every setting loads the same values
        model = model.to(torch.bfloat16)
    model.save_pretrained(paths["hf"], safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the settings run in their own processes
    _write_tokenizer(paths["hf"], s.vocab)
    convs = conversations(args.conversations, args.seq_length, s.vocab, args.seed)
    with open(paths["convs.json"], "w") as f:
        json.dump(convs, f)
    with SFTDatasetWriter(paths["sft"]) as w:
        for c in convs:
            w.add(c["input_ids"], c["loss_mask"], c["turn_starts"])
    convert_hf_to_megatron(paths["hf"], paths["import"], progress=False)
    info = {**paths, "params": n_params, "real_tokens": sum(len(c["input_ids"]) for c in convs)}
    with open(os.path.join(root, "ready.json"), "w") as f:
        json.dump(info, f)
    return info


def _write_tokenizer(path: str, vocab: int) -> None:
    """A word-level tokenizer whose ids are the token ids (TRL reads the pad token from it)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# Workers: one setting, one process.
# --------------------------------------------------------------------------------------------


def _peak_memory(cuda: bool) -> float:
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _summary(step_s: list, real: list, slots: list, losses: list, cuda: bool, cpu_s: list = ()) -> dict:
    import numpy as np

    timed = slice(1, None) if len(step_s) > 1 else slice(None)  # the first step warms up
    med = float(np.median(step_s[timed]))
    extra = {}
    if len(cpu_s) == len(step_s) and not cuda:  # process CPU time: what a shared machine's load inflates least
        extra["tokens_per_cpu_s"] = float(np.mean(real[timed])) / float(np.median(cpu_s[timed]))
    return {**extra, "tokens_per_s": float(np.mean(real[timed])) / med, "step_s": med,
            "padding_fraction": 1.0 - sum(real) / max(1, sum(slots)), "real_tokens_per_step": float(np.mean(real)),
            "peak_memory_gib": _peak_memory(cuda), "loss": float(losses[-1]), "losses": [float(x) for x in losses],
            "steps": len(step_s)}


def run_megatron(setting: str, info: dict, args) -> dict:
    from megatron_pack.config.cli import parse_args
    from megatron_pack.training.loop import train

    mode = setting.split("_", 1)[1]
    cuda = args.device == "cuda"
    argv = ["--load", info["import"], "--data-path", info["sft"], "--seq-length", str(args.seq_length),
            "--pack-mode", mode, "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.steps),
            "--lr", str(args.lr), "--lr-decay-style", "constant", "--adam-beta2", "0.95", "--weight-decay", "0",
            "--clip-grad", "1.0", "--valid-fraction", "0", "--log-interval", str(10**6), "--seed", str(args.seed),
            "--bf16" if cuda else "--no-bf16"]
    from megatron_pack.training import loop

    cpu_s, step = [], loop.train_step

    def timed_step(*a, **kw):  # the loop's own step, with its process CPU time recorded
        t0 = time.process_time()
        out = step(*a, **kw)
        cpu_s.append(time.process_time() - t0)
        return out

    loop.train_step = timed_step
    res = train(parse_args(argv))
    h = res["history"]
    return _summary([r["seconds"] for r in h], [r["real tokens"] for r in h], [r["capacity"] for r in h],
                    [r["lm loss"] for r in h], cuda, cpu_s)


class _Counting:
    """Wraps a collator: records each batch's real tokens and token slots, in order."""

    def __init__(self, inner):
        self.inner, self.real, self.slots = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.real.append(sum(len(f["input_ids"]) for f in features))  # a packed example: its documents
        self.slots.append(batch["input_ids"].numel())
        return batch


def _hf_model(info: dict, args):
    import torch
    import transformers as tf

    cuda = args.device == "cuda"
    attn = "sdpa"
    if cuda:
        from megatron_pack.model.spec import flash_attn_available

        attn = "flash_attention_2" if flash_attn_available() else "sdpa"
    # fp32 weights under bf16 autocast on GPU (TrainingArguments(bf16=True)): fp32 master weights
    # and optimizer state, as megatron_pack's bf16 runs keep them
    model = tf.AutoModelForCausalLM.from_pretrained(info["hf"], dtype=torch.float32, attn_implementation=attn)
    if cuda:
        model = model.cuda()
    return model, attn


def _training_args(args, **extra) -> dict:
    """Keyword arguments of TrainingArguments (and SFTConfig): the optimizer megatron_pack runs."""
    cuda = args.device == "cuda"
    return dict(
        output_dir=os.path.join(args.workdir, "hf_out"), per_device_train_batch_size=args.global_batch_size,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
        remove_unused_columns=False, **extra)


def _timing_callback():
    import transformers as tf

    class StepTimes(tf.TrainerCallback):
        def __init__(self):
            self.t, self.cpu, self.losses = [], [], []

        def on_train_begin(self, a, state, control, **kw):
            self._sync()
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, a, state, control, **kw):
            self._sync()
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        @staticmethod
        def _sync():
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    return StepTimes()


def _sampling(tf, grouped: bool) -> dict:
    """Length grouping in this transformers' words (5.x: ``train_sampling_strategy``; before: ``group_by_length``)."""
    import inspect

    if "train_sampling_strategy" in inspect.signature(tf.TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def run_hf(setting: str, info: dict, args) -> dict:
    """``hf_pad_max`` / ``hf_grouped``: transformers' Trainer over the conversations."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(info["hf"])
    convs = json.load(open(info["convs.json"]))
    rows = [{"input_ids": c["input_ids"],
             "labels": [t if m else -100 for t, m in zip(c["input_ids"], c["loss_mask"])]} for c in convs]
    pad = dict(padding="max_length", max_length=args.seq_length) if setting == "hf_pad_max" else dict(padding="longest")
    collator = _Counting(tf.DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, **pad))
    model, attn = _hf_model(info, args)
    times = _timing_callback()
    trainer = tf.Trainer(model=model, args=tf.TrainingArguments(**_training_args(
                         args, **_sampling(tf, setting == "hf_grouped"))),
                         train_dataset=rows, data_collator=collator, callbacks=[times])
    trainer.train()
    step_s = [b - a for a, b in zip(times.t[:-1], times.t[1:])]
    cpu_s = [b - a for a, b in zip(times.cpu[:-1], times.cpu[1:])]
    n = len(step_s)
    return {**_summary(step_s, collator.real[:n], collator.slots[:n], times.losses, args.device == "cuda", cpu_s),
            "attention": attn}


def run_trl(setting: str, info: dict, args) -> dict:
    """TRL's SFTTrainer with bfd packing (padding-free), after checking its first batch."""
    import datasets
    import transformers as tf
    from trl import SFTConfig, SFTTrainer

    tok = tf.AutoTokenizer.from_pretrained(info["hf"])
    convs = json.load(open(info["convs.json"]))
    ds = datasets.Dataset.from_list(
        [{"input_ids": c["input_ids"], "labels": [t if m else -100 for t, m in zip(c["input_ids"], c["loss_mask"])]}
         for c in convs])
    model, attn = _hf_model(info, args)
    cfg = SFTConfig(**_training_args(args, packing=True, packing_strategy="bfd", max_length=args.seq_length))
    times = _timing_callback()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[times])
    check = padding_free_check(model, next(iter(trainer.get_train_dataloader())))
    if not check["correct"]:
        return {"skipped": f"SFTTrainer's padding-free batch loss {check['packed']:.6f} != the same conversations "
                           f"padded {check['padded']:.6f} ({attn}): attention crosses conversations", **check}
    collator = _Counting(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    step_s = [b - a for a, b in zip(times.t[:-1], times.t[1:])]
    cpu_s = [b - a for a, b in zip(times.cpu[:-1], times.cpu[1:])]
    n = len(step_s)
    return {**_summary(step_s, collator.real[:n], collator.slots[:n], times.losses, args.device == "cuda", cpu_s),
            "attention": attn, **check}




def worker(setting: str, args) -> dict:
    import torch

    info = json.load(open(os.path.join(args.workdir, "ready.json")))
    if args.device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    if setting in MP_SETTINGS:
        return run_megatron(setting, info, args)
    if setting == "trl_packing":
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except ImportError as e:
            return {"skipped": f"{e.name} not installed"}
        return run_trl(setting, info, args)
    return run_hf(setting, info, args)


# --------------------------------------------------------------------------------------------
# Parent: prepare once, run every setting in rounds, print and write the table.
# --------------------------------------------------------------------------------------------


def _worker_argv(args, setting: str) -> list:
    keep = ["--shape", args.shape, "--device", args.device, "--seq-length", str(args.seq_length),
            "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed), "--workdir", args.workdir,
            "--conversations", str(args.conversations), "--threads", str(args.threads)]
    return [sys.executable, os.path.abspath(__file__), *keep, "--worker", setting]


def _missing_modules(setting: str) -> list:
    import importlib.util

    need = ("trl", "datasets") if setting == "trl_packing" else ()
    return [m for m in need if importlib.util.find_spec(m) is None]


def run_all(args) -> dict:
    deadline = time.monotonic() + args.budget_s if args.budget_s else None  # preparing counts too
    info = prepare(args)
    best: dict = {}
    for rnd in range(args.repeats):
        for setting in args.settings:
            if deadline is not None and time.monotonic() > deadline:
                best.setdefault(setting, {"skipped": "time budget spent"})
                continue
            missing = _missing_modules(setting)
            if missing:  # said without starting a process
                best.setdefault(setting, {"skipped": f"{', '.join(missing)} not installed"})
                continue
            env = dict(os.environ, MEGATRON_PACK_QUIET="1", PYTHONWARNINGS="ignore",
                       **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
            left = (deadline - time.monotonic()) if deadline is not None else args.timeout_s
            t0 = time.monotonic()
            try:
                p = subprocess.run(_worker_argv(args, setting), capture_output=True, text=True, env=env,
                                   timeout=max(10.0, min(args.timeout_s, left)))
            except subprocess.TimeoutExpired:
                best.setdefault(setting, {"skipped": "timed out"})
                print(f"  round {rnd + 1} {setting:>12}: timed out", flush=True)
                continue
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                r = {"skipped": f"failed (exit {p.returncode}): {(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
            else:
                r = json.loads(line[-1][len("RESULT "):])
            r["wall_s"] = time.monotonic() - t0
            if "skipped" in r:
                print(f"  round {rnd + 1} {setting:>12}: {r['skipped']}", flush=True)
                best.setdefault(setting, r)
                continue
            print(
                f"  round {rnd + 1} {setting:>12}: {r['tokens_per_s']:,.0f} real tokens/s, "
                f"{r['step_s'] * 1000:.0f} ms/step, padding {r['padding_fraction']:.1%}, "
                f"loss {r['loss']:.3f}"
                + (f", {r['tokens_per_cpu_s']:,.0f} per CPU-s" if "tokens_per_cpu_s" in r else "")
                + f" ({r['wall_s']:.0f} s)",
                flush=True,
            )
            if "tokens_per_s" not in best.get(setting, {}) or r["tokens_per_s"] > best[setting]["tokens_per_s"]:
                best[setting] = r
    rows = [{"setting": s, **best[s]} for s in args.settings if s in best]
    hf = [r for r in rows if r["setting"] in HF_SETTINGS and "tokens_per_s" in r]
    top = max(hf, key=lambda r: r["tokens_per_s"]) if hf else None
    for r in rows:
        if "tokens_per_s" in r and top:
            r["vs_best_hf"] = r["tokens_per_s"] / top["tokens_per_s"]
        if "tokens_per_cpu_s" in r and top and "tokens_per_cpu_s" in top:
            r["vs_best_hf_cpu"] = r["tokens_per_cpu_s"] / top["tokens_per_cpu_s"]
    if args.device == "cuda":
        _add_mfu(rows, info, args)
    return {
        "shape": asdict(SHAPES[args.shape]),
        "shape_name": args.shape,
        "params": info["params"],
        "device": args.device,
        "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "steps": args.steps,
        "best_hf": top and top["setting"],
        "rows": rows,
    }


def _add_mfu(rows: list, info: dict, args) -> None:
    """Model FLOPs utilisation on real tokens against the GPU's bf16 peak
    (:mod:`megatron_pack.planning.mfu`: the documents' own causal attention, counted once)."""
    import torch

    from megatron_pack.model.cost import CostModel
    from megatron_pack.model.hf_architecture import load_hf_architecture
    from megatron_pack.planning.catalogue import gpu_from_device_name
    from megatron_pack.planning.mfu import flops_per_real_token, mfu

    gpu = gpu_from_device_name(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    if gpu is None:
        return
    convs = json.load(open(info["convs.json"]))
    per_token = flops_per_real_token(
        CostModel.from_architecture(load_hf_architecture(info["hf"])), [len(c["input_ids"]) for c in convs]
    )
    for r in rows:
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], per_token, gpu.peak_flops)


def format_table(report: dict) -> str:
    heads = ["setting", "real tokens/s", "ms/step", "padding", "peak memory", f"loss @{report['steps']}", "vs best HF"]
    if any("mfu" in r for r in report["rows"]):
        heads.insert(2, "MFU")
    if any("tokens_per_cpu_s" in r for r in report["rows"]):
        heads.insert(2, "real tokens/CPU-s")
    cells = []
    for r in report["rows"]:
        if "tokens_per_s" not in r:
            cells.append([r["setting"], f"not run: {r.get('skipped')}"] + [""] * (len(heads) - 2))
            continue
        c = [
            r["setting"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s'] * 1000:,.0f}",
            f"{r['padding_fraction']:.1%}",
            f"{r['peak_memory_gib']:.2f} GiB",
            f"{r['loss']:.3f}",
            f"{r.get('vs_best_hf', float('nan')):.2f}x",
        ]
        if "MFU" in heads:
            c.insert(2, f"{r['mfu']:.1%}" if "mfu" in r else "")
        if "real tokens/CPU-s" in heads:
            c.insert(2, f"{r['tokens_per_cpu_s']:,.0f}" if "tokens_per_cpu_s" in r else "")
        cells.append(c)
    line = lambda xs: "| " + " | ".join(xs) + " |"  # noqa: E731
    return "\n".join(
        [
            line(heads),
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(heads))) + "|",
            *(line(c) for c in cells),
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seq-length", type=int, default=None, help="default 512 (cpu, tiny), 2048 (1b)")
    p.add_argument("--global-batch-size", type=int, default=8, help="rows per step")
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="megatron_pack (default: global on GPU, 4 on CPU)"
    )
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per setting (the first is not timed)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the settings; the fastest round is kept")
    p.add_argument("--conversations", type=int, default=1200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--workdir", default=None, help="default outputs/bench_train_vs_hf/<shape>-<seq>")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting settings after this many seconds")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per setting")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per setting (0: torch's default); 1 keeps a loaded machine's figures steadier",
    )
    p.add_argument("--json")
    p.add_argument("--markdown", help="also write the table (with the run's settings) to this file")
    p.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq_length is None:
        args.seq_length = 2048 if args.shape == "1b" else 512
    if args.micro_batch_size is None:
        args.micro_batch_size = args.global_batch_size if args.device == "cuda" else min(4, args.global_batch_size)
    if args.global_batch_size % args.micro_batch_size:
        p.error(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size}"
        )
    if args.workdir is None:
        args.workdir = os.path.join("outputs", "bench_train_vs_hf", f"{args.shape}-{args.seq_length}-{args.device}")
    args.workdir = os.path.abspath(args.workdir)
    os.environ.setdefault("MEGATRON_PACK_QUIET", "1")
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()  # Megatron-Core's TE/Apex import warnings, in the workers and the converting parent
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    import torch

    load = os.getloadavg()
    print(
        f"bench_train_vs_hf: shape {args.shape}, {args.device}, seq {args.seq_length}, {args.global_batch_size} rows "
        f"per step (micro {args.micro_batch_size}), {args.steps} steps x {args.repeats} rounds, torch threads "
        f"{args.threads or torch.get_num_threads()}, load average {load[0]:.2f}",
        flush=True,
    )
    report = run_all(args)
    report["load_before"], report["load_after"] = load, os.getloadavg()
    print(f"{report['params'] / 1e6:.1f}M parameters; load average after {report['load_after'][0]:.2f}")
    print(format_table(report))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                f"# megatron_pack vs transformers / TRL: {report['params'] / 1e6:.0f}M parameters, "
                f"{args.device}, seq {args.seq_length}, {args.global_batch_size} rows per step\n\n"
                f"load average {load[0]:.2f} before, {report['load_after'][0]:.2f} after\n\n"
                + format_table(report)
                + "\n"
            )
    if args.json:
        from megatron_pack.files.atomic import write_json_atomic

        write_json_atomic(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
