"""Layer-spec provider: the one place that looks at what is installed.

==========  =========================================  =====================================
backend     layers                                     packed (THD) attention
==========  =========================================  =====================================
``te``      Transformer Engine (fused norm+linear)     TE fused attention (cuDNN / flash)
``local``   Megatron-Core local (torch) layers         :class:`VarlenCoreAttention`, with CUDA
                                                       and fp16/bf16: flash-attn's varlen where
                                                       installed, else PyTorch's own varlen
                                                       (``torch.nn.attention.varlen``); PyTorch
                                                       SDPA per document otherwise
``auto``    ``te`` if transformer_engine imports and CUDA is available, else ``local``
==========  =========================================  =====================================

Context parallelism: TE attention takes the CP group and ``config.cp_comm_type`` (THD with
p2p or a2a); local layers use the ``torch`` kernel under CP, which all-gathers K/V over the CP
group (:mod:`megatron_pack.model.cp_attention`); the fused local kernels have no CP path.

Both route Megatron-Core's unfused THD RoPE through :mod:`megatron_pack.model.thd_rope` (the
same values, no ``cu_seqlens`` read on the host per layer). Both produce the same parameter
layout in checkpoints (the local spec maps its norms onto TE's fused names), so a run can
switch backends between save and load. Without apex the
local norms are :class:`megatron_pack.model.norm.TorchNorm`, which (unlike Megatron-Core's
torch norm) allows sequence parallelism. :func:`get_block_spec` adds the final norm and is
what :func:`megatron_pack.model.builder.build_model` passes to ``GPTModel``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKENDS = ("auto", "te", "local")


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False
    try:
        importlib.import_module(module)
    except Exception:  # installed but broken (ABI mismatch, missing CUDA libs): treat as absent
        return False
    return True


def te_available() -> bool:
    return torch.cuda.is_available() and _importable("transformer_engine")


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and _importable("flash_attn")


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``te`` or ``local``; a named backend is checked to be usable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise RuntimeError("backend 'te' needs transformer_engine and CUDA; use backend='local' or 'auto'")
    return backend


def torch_varlen_available() -> bool:
    """PyTorch's own FlashAttention-2 varlen (``torch.nn.attention.varlen``, torch >= 2.10) on CUDA."""
    return torch.cuda.is_available() and _importable("torch.nn.attention.varlen")


#: kernel -> what the run header calls it
KERNEL_NAMES = {"flash": "flash-attn varlen", "varlen": "PyTorch varlen_attn (FlashAttention-2)",
                "flex": "PyTorch flex_attention (document block mask)", "torch": "PyTorch SDPA per document"}


def attention_kernel(config) -> str:
    """Kernel for :class:`VarlenCoreAttention` in local layers. The fused ones need CUDA, 16-bit
    and no attention dropout: flash-attn where installed, else PyTorch's varlen; context
    parallelism takes ``torch`` (the one with the all-gather K/V path)."""
    half = bool(getattr(config, "bf16", False) or getattr(config, "fp16", False))
    if not half or int(getattr(config, "context_parallel_size", 1) or 1) > 1:
        return "torch"
    if flash_attn_available():
        return "flash"
    if torch_varlen_available() and not float(getattr(config, "attention_dropout", 0.0) or 0.0):
        return "varlen"
    return "torch"


#: TransformerConfig switches for fused kernels, named as the run header prints them (once, in
#: :func:`describe_fusions`); persist_layer_norm is named only when on (the presets keep it off).
FUSIONS = {"gradient_accumulation_fusion": "grad-accum", "apply_rope_fusion": "rope",
           "bias_activation_fusion": "bias-swiglu", "masked_softmax_fusion": "masked-softmax"}


def describe(config, backend: str = "auto", optimizer: str = "adam") -> str:
    """The run header's one statement of what runs: layers, packed-attention kernel, norm,
    apex, optimizer kernel (the class Megatron-Core picks for ``optimizer``, adam or sgd) and
    fused kernels (in place of the libraries' import-time warnings, which
    :mod:`megatron_pack.quiet` filters)."""
    resolved = resolve_backend(backend)
    cp = int(getattr(config, "context_parallel_size", 1) or 1)
    if resolved == "te":
        parts = ["layers: Transformer Engine", "attention: TE fused (THD)"
                 + (f", CP {cp} {getattr(config, 'cp_comm_type', None) or 'p2p'}" if cp > 1 else "")]
    else:
        kernel = attention_kernel(config)
        parts = ["layers: Megatron-Core local",
                 "attention: " + KERNEL_NAMES[kernel]
                 + (f", CP {cp} all-gather K/V" if cp > 1 else "")]
        norm = get_layer_spec(config, resolved).submodules.input_layernorm
        parts.append(f"norm: {getattr(norm, '__name__', norm)}")
    parts.append("apex: " + ("yes" if _importable("apex.normalization") else "no"))
    try:
        from megatron.core.optimizer import SGD, Adam

        cls = SGD if optimizer == "sgd" else Adam
        parts.append(f"optimizer: {cls.__module__.split('.')[0]} {cls.__name__}")
    except ImportError:  # pragma: no cover - Megatron-Core always provides one
        pass
    parts.append(describe_fusions(config))
    return "; ".join(parts)


def get_layer_spec(config, backend: str = "auto"):
    """``ModuleSpec`` of one GPT decoder layer for ``config`` (a ``TransformerConfig``)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_pack.model import thd_rope

    thd_rope.install()  # unfused THD RoPE without a host sync per layer (same values as Megatron's)
    resolved = resolve_backend(backend)
    if resolved == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_pack.model.attention import VarlenCoreAttention
    from megatron_pack.model.norm import TorchNorm

    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    attn = spec.submodules.self_attention.submodules
    attn.core_attention = ModuleSpec(module=VarlenCoreAttention, params={"kernel": attention_kernel(config)})
    layer = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, name) is WrappedTorchNorm:  # no apex: use the norm that allows sequence parallel
            setattr(layer, name, TorchNorm)
    return spec


def get_block_spec(config, backend: str = "auto", vp_stage: int | None = None):
    """``TransformerBlockSubmodules`` for this pipeline stage: its layers plus the final norm.

    GPTModel would otherwise pick the final norm itself (apex or Megatron's torch norm, which
    refuses sequence parallelism); here it matches the layers' backend.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    resolved = resolve_backend(backend)
    layer = get_layer_spec(config, resolved)
    if resolved == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megatron_pack.model.norm import TorchNorm

        norm = layer.submodules.input_layernorm
        final_norm = TorchNorm if norm in (TorchNorm, WrappedTorchNorm) else norm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


# --------------------------------------------------------------------------------------------
# Fused kernels: chosen here, once, from what is installed (the presets leave them off).
# --------------------------------------------------------------------------------------------

#: TransformerConfig switch -> why it is on or what it needs.
FUSION_NEEDS = {
    "gradient_accumulation_fusion": "CUDA + apex's fused_weight_gradient_mlp_cuda (Megatron's output layer "
                                    "uses it even with TE layers)",
    "apply_rope_fusion": "CUDA + Transformer Engine's fused RoPE (THD included)",
    "bias_activation_fusion": "CUDA (Megatron's jit-fused SwiGLU)",
    "masked_softmax_fusion": "CUDA + apex's scaled_masked_softmax_cuda (used only by Megatron's own "
                             "DotProductAttention; TE and flash attention fuse their softmax anyway)",
}


def _te_fused_rope() -> bool:
    if not te_available():
        return False
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except Exception:
        return False
    return rope_utils.fused_apply_rotary_pos_emb is not None or rope_utils.fused_apply_rotary_pos_emb_thd is not None


def choose_fusions(use_cuda: bool | None = None) -> dict:
    """``TransformerConfig`` fusion switches for this machine: every one off without CUDA, each
    on where its kernel imports (see :data:`FUSION_NEEDS`). Passed by the training setup as
    overrides of :func:`megatron_pack.model.presets.transformer_config`."""
    cuda = torch.cuda.is_available() if use_cuda is None else bool(use_cuda)
    return {
        "gradient_accumulation_fusion": cuda and _importable("fused_weight_gradient_mlp_cuda"),
        "apply_rope_fusion": cuda and _te_fused_rope(),
        "bias_activation_fusion": cuda,
        "masked_softmax_fusion": cuda and _importable("scaled_masked_softmax_cuda"),
    }


def describe_fusions(config) -> str:
    """The header's one ``fusions:`` entry: each fusion switch of ``config`` on or off."""
    parts = [f"{name} {'on' if getattr(config, key, False) else 'off'}" for key, name in FUSIONS.items()]
    if getattr(config, "persist_layer_norm", False):
        parts.append("persistent-layernorm on")
    return "fusions: " + ", ".join(parts)
