"""The distributed optimizer's empty state is filled through Megatron-Core's own initialiser
before a load, and a release without that initialiser is refused by name instead of failing
later inside the optimizer's ``state_dict``."""

from types import SimpleNamespace

import pytest
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_pack.checkpoint.mcore_shim import fill_empty_optimizer_state


def _fake_distributed(state: dict, calls: list):
    opt = DistributedOptimizer.__new__(DistributedOptimizer)  # no model needed: only the state is read
    opt.optimizer = SimpleNamespace(state=state)
    opt.__dict__["_init_optimizer_states_with_dummy_values"] = lambda: calls.append("filled")
    return opt


def test_an_empty_distributed_state_is_filled_and_a_full_one_left_alone():
    calls = []
    chained = SimpleNamespace(chained_optimizers=[_fake_distributed({}, calls), _fake_distributed({"p": 1}, calls)])
    fill_empty_optimizer_state(chained)
    assert calls == ["filled"]


def test_a_plain_optimizer_is_left_alone():
    calls = []
    plain = SimpleNamespace(optimizer=SimpleNamespace(state={}),
                            _init_optimizer_states_with_dummy_values=lambda: calls.append(1))
    fill_empty_optimizer_state(plain)
    assert calls == []  # control: only Megatron's distributed optimizer needs (and has) the initialiser


def test_a_release_without_the_initialiser_is_refused_by_name(monkeypatch):
    monkeypatch.delattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values")
    opt = DistributedOptimizer.__new__(DistributedOptimizer)
    opt.optimizer = SimpleNamespace(state={})
    with pytest.raises(RuntimeError, match=r"megatron-core .*_init_optimizer_states_with_dummy_values.*mcore_shim"):
        fill_empty_optimizer_state(opt)
