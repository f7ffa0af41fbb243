"""Run Megatron-Core 0.16 on CPU (gloo): redirect its few hard-coded CUDA calls.

Megatron-Core assumes a GPU in a handful of places: the model-parallel RNG tracker keeps
CUDA generator states, some tensors are created with ``device="cuda"`` or
``torch.cuda.current_device()``, and a few paths call ``.cuda()`` or
``torch.cuda.synchronize()``. Without CUDA those calls fail, so ``enable()`` points
them at the CPU. It is a no-op whenever CUDA is available, so GPU runs use Megatron-Core
untouched. Everything lives in this module; nothing else in the project patches torch
or Megatron-Core.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_ORIGINALS: dict = {}
_MODE: TorchFunctionMode | None = None


class CpuRNGStatesTracker:
    """Drop-in for Megatron-Core's ``CudaRNGStatesTracker`` keeping CPU generator states.

    The tracked streams (data-parallel, tensor-parallel, expert) keep their meaning: forking
    swaps the CPU generator state in, runs the block and swaps it back.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _is_cuda_spec(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # torch.cuda.current_device() style ordinal
        return True
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"``/ordinal arguments and ``.cuda()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_in_mode(self, func, args, kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts ``grad.type() == 'torch.cuda.FloatTensor'`` before clipping.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if _is_cuda_spec(kwargs.get("device")):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_spec(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def _backward_in_mode(mode, func, args, kwargs):
    """Run a backward pass with the redirection still on the mode stack.

    Since torch 2.13 ``backward()`` dispatches through torch-function modes, and a mode is off
    the stack while it handles a call, so the whole backward pass would run unredirected;
    Megatron-Core's sequence-parallel backward allocates on ``torch.cuda.current_device()``.
    """
    p = inspect.signature(func).bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    if a.get("inputs") is not None or a.get("grad_variables") is not None:
        return func(*args, **kwargs)  # rare forms: plain call (redirection off during backward)
    tensors, grads = (a["self"], a["gradient"]) if func is torch.Tensor.backward else (a["tensors"], a["grad_tensors"])
    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    grads = torch.autograd._make_grads(tensors, torch.autograd._tensor_or_tensors_to_tuple(grads, len(tensors)),
                                       is_grads_batched=False)
    retain = a["retain_graph"] if a["retain_graph"] is not None else a["create_graph"]
    with mode:
        torch.autograd.graph._engine_run_backward(tensors, grads, retain, a["create_graph"], (),
                                                  allow_unreachable=True, accumulate_grad=True)


def is_enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Install the CPU redirection if CUDA is unavailable. Returns whether it is active."""
    global _ENABLED
    if torch.cuda.is_available() or _ENABLED:
        return _ENABLED
    from megatron.core.tensor_parallel import random as mcore_random

    # Through _patch so disable() puts Megatron's own tracker (or its absence) back.
    _patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    _patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch(mcore_random, "initialize_rng_tracker", _keep_cpu_tracker(mcore_random.initialize_rng_tracker))
    _patch(torch.cuda, "current_device", lambda: 0)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "manual_seed", lambda *a, **k: None)
    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _ENABLED = True
    return True


def _keep_cpu_tracker(initialize_rng_tracker):
    """Megatron may ask for a forced re-creation of the tracker; keep it on the CPU."""

    @functools.wraps(initialize_rng_tracker)
    def wrapper(*args, **kwargs):
        from megatron.core.tensor_parallel import random as mcore_random

        if kwargs.get("force_reset") or not mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    return wrapper


def _patch(owner, name, value):
    _ORIGINALS.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def disable():
    """Undo ``enable()`` (tests use this to check the redirection is self-contained)."""
    global _ENABLED, _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    for (owner, name), value in _ORIGINALS.items():
        setattr(owner, name, value)
    _ORIGINALS.clear()
    _ENABLED = False
