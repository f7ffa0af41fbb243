"""Learning-rate schedule: Megatron-Core's ``OptimizerParamScheduler`` counted in steps.

Linear warmup from 0 to ``--lr`` over ``warmup`` steps, then ``--lr-decay-style`` down to
``--min-lr`` at the last step. Its ``state_dict`` goes into checkpoints.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_pack.config.spec import OptimArgs, warmup_steps


def build_scheduler(optimizer, optim: OptimArgs, total_steps: int, *, override: bool = False,
                    use_checkpoint: bool = False) -> OptimizerParamScheduler:
    warm = warmup_steps(optim, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warm,
        # Megatron decays over [warmup, decay_steps]; decay_steps > warmup keeps it well defined.
        lr_decay_steps=max(total_steps, warm + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # Megatron-LM's rule on resume: --override-opt_param-scheduler takes these values,
        # --use-checkpoint-opt_param-scheduler the checkpoint's; with neither a change is refused
        # (schedule_changes + training.restore, before Megatron's assert).
        use_checkpoint_opt_param_scheduler=use_checkpoint,
        override_opt_param_scheduler=override,
    )


# (attribute of OptimizerParamScheduler, key in its state_dict, words) -- what Megatron-Core's
# load_state_dict checks with _check_and_set.
_SCHEDULE_FIELDS = (("max_lr", "max_lr", "learning rate (--lr)"), ("min_lr", "min_lr", "minimum learning rate"),
                    ("lr_warmup_steps", "lr_warmup_steps", "warmup steps"),
                    ("lr_decay_steps", "lr_decay_steps", "decay steps (--train-iters/--train-epochs)"),
                    ("lr_decay_style", "lr_decay_style", "decay style"),
                    ("start_wd", "start_wd", "weight decay"), ("wd_incr_steps", "wd_incr_steps",
                                                                "weight-decay steps"))


def schedule_changes(scheduler: OptimizerParamScheduler, saved: dict) -> dict:
    """``{words: (checkpoint value, command-line value)}`` for every schedule setting that differs."""
    out = {}
    for attr, key, words in _SCHEDULE_FIELDS:
        if key in saved and saved[key] != getattr(scheduler, attr):
            out[words] = (saved[key], getattr(scheduler, attr))
    return out
