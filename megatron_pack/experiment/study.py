"""The paper's question on your pretrained model: fine-tune with and without the document mask
under each packing mode, then measure time, quality and leakage (front door:
``python -m megatron_pack.experiment``, :mod:`.study_cli`).

Every setting is trained by :func:`.compare.run_setting` (same initial weights from one HF
import, same seed, same held-out set, the same epochs) and scored by :mod:`.study_scoring`:
held-out loss in transformers (each chat alone), a generation score on held-out QA prompts, and
for the leakage pair (:data:`.settings.LEAKAGE_PAIR`) the leakage on the same held-out rows.

Seeds: ``args.seed`` is the training seed (row order, random packing); the split, the QA prompts
and the leakage rows come from ``args.data_seed`` so every seed is scored on the same data and
the base model once. Each seed's finished settings are in ``OUT/study_seed{S}.json``; a rerun
skips them. Under torchrun every rank trains, rank 0 alone exports and scores while the others
wait in :class:`.rank_zero.RankZeroWork` (its own long timeout, not the process group's).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

from megatron_pack.experiment.study_data import portable
from megatron_pack.files.atomic import write_json_atomic

RANK = int(os.environ.get("RANK", "0"))
#: torchrun's variables, removed from a helper process that must not join the job
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def log(msg: str) -> None:
    if RANK == 0:
        print(msg, flush=True)


def base_config(args, info: dict, extra: list):
    """The training config every setting shares (the setting changes only the packing)."""
    from megatron_pack.training.cli import parse_args

    flags = ["--data-path", info["train"], "--valid-data-path", info["heldout"], "--valid-fraction", "0",
             "--tokenizer-model", args.model, "--pretrained-checkpoint", info["import"],
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.mbs),
             "--global-batch-size", str(args.gbs), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
             "--lr-warmup-fraction", "0.1", "--clip-grad", "1.0", "--log-interval", "1",
             "--train-epochs", str(args.epochs), "--seed", str(args.seed)]
    return parse_args(flags + extra)


def seed_state_path(out: str, seed: int) -> str:
    return os.path.join(out, f"study_seed{seed}.json")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def migrate_legacy(out: str) -> None:
    """A pre-seed ``study.json`` (one seed's state: it has ``rows``, not ``seeds``) becomes
    ``study_seed{S}.json``; its data seed was its seed."""
    path = os.path.join(out, "study.json")
    if not os.path.isfile(path):
        return
    state = read_json(path)
    if "rows" not in state or "seeds" in state:
        return
    seed = int(state["config"]["seed"])
    state["config"].setdefault("data_seed", seed)
    target = seed_state_path(out, seed)
    if os.path.exists(target):
        raise SystemExit(f"error: {path} is one seed's state but {target} exists too; move one away")
    write_json_atomic(state, target)
    os.remove(path)


def reuse_base(out: str, config: dict) -> dict | None:
    """The base model's scores from another seed of the same data (they do not depend on the
    training seed), so each seed does not re-score it."""
    for path in sorted(glob.glob(os.path.join(out, "study_seed*.json"))):
        other = read_json(path)
        c = other.get("config", {})
        same = all(c.get(k) == config.get(k) for k in ("model", "data_seed", "seq_length", "qa", "layers",
                                                       "leak_sequences", "heldout_docs"))
        if same and other.get("base"):
            return other["base"]
    return None


def export_hf(ckpt: str, hf: str) -> None:
    """The trained checkpoint as an HF directory (what is scored). With a group of several
    ranks up it runs in a fresh process: rank 0 alone must not load a dist checkpoint inside
    the job's group (a collective the others are not in)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
        code = ("import sys; from megatron_pack.convert import convert_megatron_to_hf as c; "
                "c(sys.argv[1], sys.argv[2], dtype='fp32', progress=False)")
        subprocess.run([sys.executable, "-c", code, ckpt, hf], env=env, check=True)
        return
    from megatron_pack.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, hf, dtype="fp32", progress=False)


def export_and_score(name: str, row: dict, hf: str, ckpt: str, ctx: dict) -> dict:
    """Rank 0's part of a setting: export (once), record the trained row, score it."""
    from megatron_pack.experiment.settings import LEAKAGE_PAIR
    from megatron_pack.experiment.study_scoring import score_model

    args, state, out = ctx["args"], ctx["state"], ctx["out"]
    if name not in state["trained"] or not os.path.isfile(os.path.join(hf, "config.json")):
        shutil.rmtree(hf, ignore_errors=True)
        export_hf(ckpt, hf)
        shutil.rmtree(ckpt, ignore_errors=True)  # optimizer state is GBs; the HF export is what is scored
        row["log_file"] = portable(row["log_file"], out)
        state["trained"][name] = row
        write_json_atomic(state, ctx["state_path"])
    nomask, mask = LEAKAGE_PAIR
    arrangements = {nomask: ("file order", "shuffled"), mask: ("shuffled",)}.get(name, ())
    row.update(score_model(hf, ctx["info"], args, leakage=arrangements, log=log))
    row["loadavg_1m"] = os.getloadavg()[0]  # timings are only comparable at similar machine load
    if not args.keep_hf:
        shutil.rmtree(hf, ignore_errors=True)
    state["rows"][name] = row
    write_json_atomic(state, ctx["state_path"])
    return row


def run_one(base, name: str, ctx: dict) -> None:
    """Train one setting (every rank) unless its export is already there, then rank 0 exports
    and scores it while the other ranks wait."""
    from megatron_pack.experiment.compare import run_setting
    from megatron_pack.experiment.settings import Setting

    args, state = ctx["args"], ctx["state"]
    safe = name.replace("/", "_").replace(":", "_")
    sdir = os.path.join(ctx["out"], f"seed{args.seed}")  # step logs, checkpoints, exports of this seed
    ckpt, hf = os.path.join(sdir, "ckpt", safe), os.path.join(sdir, "hf", safe)
    row = state["trained"].get(name)
    if row is None or not os.path.isfile(os.path.join(hf, "config.json")):  # else: trained, scoring was cut short
        if RANK == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
            os.makedirs(os.path.join(sdir, "runs"), exist_ok=True)  # run_setting writes its step log there
        ctx["work"].run(lambda: None)  # every rank sees the cleared checkpoint directory
        row = run_setting(base, Setting.parse(name), sdir, args.evals_per_run, save=ckpt)
        state["trained"].pop(name, None)
    ctx["work"].run(export_and_score, name, dict(row), hf, ckpt, ctx)


def study_config(args, extra: list, out: str) -> dict:
    """The state's record of the flags: paths as :func:`.study_data.portable` writes them."""
    config = {k: v for k, v in vars(args).items() if k not in ("train_flags", "seeds")} | {"train_flags": extra}
    for k in ("model", "data_path", "qa_path", "output_dir"):
        if config.get(k):
            config[k] = portable(config[k], out)
    return config


def score_base(state: dict, ctx: dict) -> None:
    """Rank 0: the base model's scores, reused from another seed of the same data if there."""
    from megatron_pack.experiment.study_scoring import score_model

    if "base" in state:
        return
    reused = reuse_base(ctx["out"], state["config"])
    if reused is not None:
        log("=== base model: scores reused from another seed of the same data ===")
        state["base"] = reused
    else:
        log("=== base model (before fine-tuning) ===")
        state["base"] = score_model(ctx["args"].model, ctx["info"], ctx["args"], with_mask_check=ctx["args"].mask_check,
                                    log=log)
    write_json_atomic(state, ctx["state_path"])


def run_seed(args, ctx: dict, extra: list, t0: float) -> bool:
    """Every setting of one training seed (``args.seed``), resuming from its state file;
    False once ``--max-minutes`` stopped it. Collective: every rank calls it."""
    from megatron_pack.experiment.settings import run_order

    out, info = ctx["out"], ctx["info"]
    state_path = seed_state_path(out, args.seed)
    state = read_json(state_path) if os.path.isfile(state_path) else {"rows": {}}
    state.setdefault("trained", {})
    state["config"] = study_config(args, extra, out)
    state["prepared"] = {k: (portable(v, out) if k in ("source", "train", "heldout", "import") else v)
                         for k, v in info.items() if k != "qa"}
    ctx.update(args=args, state=state, state_path=state_path)
    ctx["work"].run(score_base, state, ctx)
    base = base_config(args, info, extra)
    for name in run_order(args.settings):
        if name in state["rows"]:
            log(f"=== {name}: done (in {state_path}), skipped ===")
            continue
        if args.max_minutes and (time.perf_counter() - t0) / 60 > args.max_minutes:
            log(f"=== --max-minutes {args.max_minutes} reached: {name} and later not run; rerun to continue ===")
            return False
        log(f"\n=== {name} ({(time.perf_counter() - t0) / 60:.1f} min elapsed) ===")
        run_one(base, name, ctx)
    return True


def run_study(args, extra: list, info: dict, out: str, t0: float) -> None:
    """Every seed of ``args.seeds`` inside one process group (rank 0 writes every file)."""
    from megatron_pack.experiment.compare import one_process_group
    from megatron_pack.experiment.rank_zero import RankZeroWork

    args.seed = args.seeds[0]
    with one_process_group(base_config(args, info, extra)):
        ctx = {"out": out, "info": info, "work": RankZeroWork(args.rank0_wait_minutes)}
        try:
            for seed in args.seeds:
                args.seed = seed
                if not run_seed(args, ctx, extra, t0):
                    break
        finally:
            ctx["work"].close()
