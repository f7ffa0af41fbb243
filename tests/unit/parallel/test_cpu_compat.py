"""The CPU redirection is active only without CUDA and leaves no trace after disable()."""

import pytest
import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import _get_current_function_mode_stack

from megatron_pack.parallel import cpu_compat

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirection itself")


def snapshot():
    return {
        "current_device": torch.cuda.current_device,
        "synchronize": torch.cuda.synchronize,
        "manual_seed": torch.cuda.manual_seed,
        "tracker": mcore_random._CUDA_RNG_STATE_TRACKER,
        "tracker_initialized": mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "initialize_rng_tracker": mcore_random.initialize_rng_tracker,
        "modes": list(_get_current_function_mode_stack()),
    }


@pytest.fixture
def clean():
    assert not cpu_compat.is_enabled(), "another test left the redirection on"
    before = snapshot()
    yield before
    cpu_compat.disable()
    after = snapshot()
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] is before[name] or after[name] == before[name], f"{name} not restored"


def test_inactive_with_cuda(monkeypatch, clean):
    """With CUDA available (simulated), enable() patches nothing and installs no mode."""
    real_cuda = torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.enable() is False
    assert not cpu_compat.is_enabled()
    now = snapshot()
    for name, value in clean.items():
        assert now[name] is value or now[name] == value, f"{name} changed although CUDA is available"
    if not real_cuda:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.empty(1, device="cuda")  # nothing redirects cuda tensors


@no_cuda
def test_enable_redirects_and_disable_restores(clean):
    assert cpu_compat.enable() is True
    assert cpu_compat.enable() is True  # idempotent
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"  # Megatron's grad-clipping assert
    torch.cuda.synchronize()
    assert isinstance(mcore_random.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker)
    # a forced re-initialisation keeps a CPU tracker
    mcore_random.initialize_rng_tracker(force_reset=True)
    assert isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, cpu_compat.CpuRNGStatesTracker)
    mcore_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    assert set(mcore_random.get_cuda_rng_tracker().get_states()) >= {"model-parallel-rng", "data-parallel-rng"}

    cpu_compat.disable()
    assert not cpu_compat.is_enabled()
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.empty(1, device="cuda")


def test_tracker_streams():
    tr = cpu_compat.CpuRNGStatesTracker()
    tr.add("a", 11)
    with pytest.raises(Exception, match="seed 11 already exists"):
        tr.add("b", 11)
    with pytest.raises(Exception, match="already exists"):
        tr.add("a", 12)
    with pytest.raises(Exception, match="is not added"):
        with tr.fork("zzz"):
            pass
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with tr.fork("a"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    with tr.fork("a"):
        second = torch.rand(4)
    torch.manual_seed(11)
    expected = torch.rand(8)
    assert torch.equal(torch.cat([first, second]), expected)  # the tracked stream continues


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Like Megatron's sequence-parallel linear: backward allocates on current_device()."""

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        buf = torch.empty(grad.shape, dtype=grad.dtype, device=torch.cuda.current_device())
        return buf.copy_(grad) * 3


@no_cuda
def test_backward_passes_stay_redirected(clean):
    cpu_compat.enable()
    x = torch.ones(4, requires_grad=True)
    _AllocatesOnCudaInBackward.apply(x).sum().backward()  # Tensor.backward
    assert x.grad.tolist() == [3.0] * 4
    y = torch.ones(2, requires_grad=True)
    out = _AllocatesOnCudaInBackward.apply(y) ** 2
    torch.autograd.backward(out, grad_tensors=torch.tensor([1.0, 2.0]), retain_graph=True)  # the schedule's call
    assert y.grad.tolist() == [18.0, 36.0]
    torch.autograd.backward([out.sum()])
    assert y.grad.tolist() == [36.0, 54.0]
