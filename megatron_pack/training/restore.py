"""Where a run starts: a resumed checkpoint, an HF import, pretrained weights, or nothing."""

from __future__ import annotations

import dataclasses
import os

from megatron_pack.checkpoint.dist import is_dist_checkpoint, load_checkpoint, saved_run_config
from megatron_pack.config.spec import ConfigError, TrainConfig
from megatron_pack.data.sampling import DataPosition


def data_signature(config: TrainConfig) -> dict:
    """What the saved data position means; a resumed run must agree."""
    d, t = config.data, config.train
    sig = {"data_path": _abs(d.data_path, d.train_blend), "seq_length": d.seq_length,
           "pack_mode": d.packing.pack_mode, "document_mask": d.packing.document_mask, "overlong": d.packing.overlong,
           "valid_fraction": d.valid_fraction, "global_batch_size": t.global_batch_size, "seed": t.seed}
    if d.packing.pack_scope != "epoch":  # only when not the default, so older checkpoints keep resuming
        sig["pack_scope"] = d.packing.pack_scope
    if d.train_data_path is not None:  # only when given, so older checkpoints keep resuming
        sig["train_data_path"] = _abs(d.train_data_path, d.train_blend)
    return sig


def _abs(value, blend):
    """A prefix, or a blend's tokens (``blend``: the parsed value), with the prefixes made
    absolute (weights kept)."""
    if value is None or isinstance(value, str):
        return value and os.path.abspath(value)
    if blend.weights is None:
        return [os.path.abspath(p) for p in blend.prefixes]
    return [x for w, p in zip(blend.weights, blend.prefixes) for x in (round(w, 12), os.path.abspath(p))]


def architecture_record(preset, vocab_size: int) -> dict:
    """What run_config.json records of the network (every architecture field, vocabulary resolved)."""
    return preset.with_vocab(vocab_size).to_dict()


def check_architecture(saved: dict | None, preset, vocab_size: int, where: str) -> None:
    """Refuse a checkpoint whose recorded architecture differs from this run's, naming both values:
    the structural fields (:func:`megatron_pack.model.architecture.architecture_differences`, so new
    fields are compared as they are added) and the vocabulary (rows would be copied and the rest
    left zero)."""
    from megatron_pack.model.architecture import architecture_differences, architecture_from_dict

    if not saved:
        return
    rec = saved.get("architecture")
    if isinstance(rec, dict):
        try:
            diff = architecture_differences(architecture_from_dict(rec), preset)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: run_config.json records an unreadable architecture ({e})") from None
        if rec.get("vocab_size") is not None and rec["vocab_size"] != vocab_size:
            diff["vocab_size"] = (rec["vocab_size"], vocab_size)
    else:  # written before the record existed: the flags are all there is
        model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
        diff = {}
        if model.get("model") not in (None, preset.name):
            diff["name"] = (model["model"], preset.name)
        if model.get("vocab_size") and model["vocab_size"] != vocab_size:
            diff["vocab_size"] = (model["vocab_size"], vocab_size)
    if diff:
        flags = {"vocab_size": "--vocab-size/--tokenizer-model"}
        text = "; ".join(f"{k} {a!r} in the checkpoint, {b!r} now ({flags.get(k, '--model')})"
                         for k, (a, b) in diff.items())
        raise ConfigError(f"{where}: the checkpoint's architecture differs from this run's: {text}. "
                          "Use the settings it was trained with.")


def saved_document_multiple(saved: dict | None) -> int | None:
    """What the checkpoint's packing plan padded every document to: ``plan.document_multiple`` in
    its run_config.json, else (checkpoints from before it was recorded) the context-parallel rule
    applied to its recorded parallel sizes; None without a run_config.json."""
    from megatron_pack.data.context_parallel import document_multiple

    if not saved:
        return None
    plan = saved.get("plan") if isinstance(saved.get("plan"), dict) else {}
    if plan.get("document_multiple"):
        return int(plan["document_multiple"])
    par = saved.get("parallel") if isinstance(saved.get("parallel"), dict) else {}
    return document_multiple(
        int(par.get("context_parallel_size") or 1),
        int(par.get("tensor_model_parallel_size") or 1),
        bool(par.get("sequence_parallel")),
    )


def _layout(par: dict) -> str:
    text = f"--context-parallel-size {int(par.get('context_parallel_size') or 1)}"
    if par.get("sequence_parallel"):
        text += f" --tensor-model-parallel-size {int(par.get('tensor_model_parallel_size') or 1)} --sequence-parallel"
    return text


def check_plan(saved: dict | None, config: TrainConfig, document_multiple: int, where: str) -> None:
    """Refuse to resume on another packing plan. Documents are padded to a multiple of 2*CP
    (lcm with TP*CP under sequence parallel) and packed at the padded lengths, so another CP size
    means other sequences: the saved data position (a count of consumed sequences) would continue
    at the same step of a different plan, skipping some conversations and repeating others."""
    was = saved_document_multiple(saved)
    if was is None or was == document_multiple:
        return
    par = saved.get("parallel") if isinstance(saved.get("parallel"), dict) else {}
    now = dataclasses.asdict(config.parallel)
    fix = f"Resume with {_layout(par)} or --document-padding-multiple {was}"
    raise ConfigError(
        f"{where}: the checkpoint's packing plan pads every document to a multiple of {was} "
        f"({_layout(par)}), this run's to {document_multiple} ({_layout(now)}): its data position "
        f"counts sequences of the other plan. {fix}, or start a fresh --save from its weights "
        "with --pretrained-checkpoint."
    )


def _schedule_hook(ck, scheduler, load_dir: str, log):
    from megatron_pack.training.schedule import schedule_changes

    def check(saved: dict) -> None:
        changes = schedule_changes(scheduler, saved)
        if not changes:
            return
        desc = "; ".join(f"{k}: checkpoint {a}, command line {b}" for k, (a, b) in changes.items())
        if ck.override_opt_param_scheduler:
            log.print(
                f"> --override-opt_param-scheduler: the command line's lr schedule replaces the checkpoint's ({desc})"
            )
        elif ck.use_checkpoint_opt_param_scheduler:
            log.print(
                f"> --use-checkpoint-opt_param-scheduler: keeping the checkpoint's lr schedule ({desc}); "
                "steps past its decay steps run at its minimum learning rate"
            )
        else:
            raise ConfigError(
                f"--load {load_dir}: the lr schedule differs from the checkpoint's ({desc}). "
                "Pass --override-opt_param-scheduler to use the command line's, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's (Megatron-LM's rule)."
            )

    return check


def restore(
    config: TrainConfig,
    model,
    optimizer,
    scheduler,
    *,
    preset,
    vocab_size: int,
    signature: dict,
    log,
    document_multiple: int = 1,
) -> tuple[int, DataPosition]:
    """Apply ``--load`` / ``--pretrained-checkpoint``; returns ``(iteration, data position)``.
    ``document_multiple``: what this run's training plan pads every document to."""
    iteration, position = 0, DataPosition()
    ck = config.checkpoint
    resumed = False
    if ck.load:
        from megatron_pack.checkpoint.imported import resolve_finetune_load, start_from_import

        # --load IMPORT (tools/convert_checkpoint.py hf-to-megatron) starts a fine-tune from the
        # HF weights the first time; once --save holds a checkpoint the same flags resume it.
        load_dir, is_import = resolve_finetune_load(ck.load, ck.save)
        if is_import:
            start_from_import(load_dir, model, optimizer, preset=preset, vocab_size=vocab_size)
            log.print(f"> fine-tuning from imported weights {load_dir} (fresh optimizer, iteration 0)")
            resumed = True
        else:
            loaded = load_checkpoint(
                load_dir,
                model,
                optimizer,
                scheduler,
                verify_checksums=ck.checkpoint_checksums,
                check_run_config=lambda rc, path: (
                    check_architecture(rc, preset, vocab_size, f"--load {path}"),
                    check_plan(rc, config, document_multiple, f"--load {path}"),
                ),
                check_scheduler=_schedule_hook(ck, scheduler, load_dir, log),
            )
            if loaded is not None:
                saved_sig = loaded["extra"].get("data_signature", {})
                diff = {k: (saved_sig.get(k), v) for k, v in signature.items() if saved_sig.get(k) != v}
                if diff:
                    raise ConfigError(
                        f"--load {load_dir}: the checkpoint's data setup differs (saved, now): {diff}; "
                        "its data position would be meaningless. Use the same settings, a fresh --save, "
                        "or --pretrained-checkpoint for weights only."
                    )
                iteration = loaded["iteration"]
                position = DataPosition.from_state_dict(loaded["data"])
                resumed = True
                log.print(
                    f"> resumed from {loaded['path']} at iteration {iteration} (epoch {position.epoch}, "
                    f"consumed samples {position.consumed_samples})"
                )
            else:
                log.print(f"> --load {load_dir}: no checkpoint there, starting fresh")
    if ck.pretrained_checkpoint and not resumed:
        from megatron_pack.checkpoint.dist_reader import load_model_from_dist_checkpoint
        from megatron_pack.checkpoint.imported import is_imported_checkpoint, start_from_import

        if is_imported_checkpoint(ck.pretrained_checkpoint):
            start_from_import(ck.pretrained_checkpoint, model, optimizer, preset=preset, vocab_size=vocab_size)
        else:  # a megatron_pack training checkpoint: weights only, at any TP/PP
            from megatron_pack.checkpoint.iterations import resolve_iteration_dir

            d = resolve_iteration_dir(ck.pretrained_checkpoint)
            rc = saved_run_config(d, required=is_dist_checkpoint(d))
            check_architecture(rc, preset, vocab_size, f"--pretrained-checkpoint {d}")
            load_model_from_dist_checkpoint(d, model)
            if hasattr(optimizer, "reload_model_params"):
                optimizer.reload_model_params()  # bf16: refresh the fp32 main copies
        log.print(f"> initial weights from {ck.pretrained_checkpoint} (fresh optimizer, iteration 0)")
    return iteration, position
