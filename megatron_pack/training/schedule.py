"""Learning-rate schedule: Megatron-Core's ``OptimizerParamScheduler`` counted in steps.

Linear warmup from 0 to ``--lr`` over ``warmup`` steps, then ``--lr-decay-style`` down to
``--min-lr`` at the last step. Its ``state_dict`` goes into checkpoints.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_pack.training.config import OptimArgs, warmup_steps


def build_scheduler(optimizer, optim: OptimArgs, total_steps: int) -> OptimizerParamScheduler:
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
        # Resuming takes the schedule from the checkpoint, never from the command line.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
