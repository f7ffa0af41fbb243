"""A global batch with no supervised token is logged and skipped, not a "lower --lr" abort."""

import math

import pytest
import torch

from megatron_pack.training.step import NonFiniteLossError, StepContext, train_step


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": 0.1}]
        self.steps = 0

    def zero_grad(self):
        pass

    def step(self):
        self.steps += 1
        return True, 1.0, None


class _Sched:
    def __init__(self):
        self.n = 0

    def step(self, increment):
        self.n += increment


class _Model:
    def zero_grad_buffer(self):
        pass


def _ctx(loss_sum, count):
    report = {"lm loss": torch.tensor([loss_sum, float(count)])}
    return StepContext(model=_Model(), optimizer=_Opt(), scheduler=_Sched(),
                       forward_backward=lambda **kw: [report], device=torch.device("cpu"), seq_length=8,
                       loss_owner=True, use_cuda=False)


def test_zero_supervised_tokens_skip_the_step():
    ctx = _ctx(0.0, 0)
    rec = train_step(ctx, [None], "token", 7)
    assert rec["skipped"] == 1 and rec["tokens"] == 0 and math.isnan(rec["lm loss"])
    assert "iteration 7: the global batch has no supervised token; step skipped" == rec["note"]
    assert ctx.optimizer.steps == 0 and ctx.scheduler.n == 0


def test_negative_controls_normal_step_and_real_nan():
    ctx = _ctx(6.0, 3)
    rec = train_step(ctx, [None], "token", 1)
    assert rec["lm loss"] == 2.0 and rec["skipped"] == 0 and ctx.optimizer.steps == 1 and ctx.scheduler.n == 1
    with pytest.raises(NonFiniteLossError, match="iteration 2: lm loss is nan over 3 supervised tokens"):
        train_step(_ctx(float("nan"), 3), [None], "token", 2)
