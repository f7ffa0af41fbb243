"""PyTorch's own packed-attention kernels without a GPU: the portable ``varlen_attn`` call against
stand-ins with each release's signature, flex_attention's document mask on CPU, and the spec's
kernel choice (which picks the fused kernel on CUDA + 16-bit without TE)."""

import math
import warnings

import pytest
import torch

from megatron_pack.model import fused_varlen as FV
from megatron_pack.model import get_preset, transformer_config
from megatron_pack.model import spec as spec_mod
from megatron_pack.model.attention import KERNELS, torch_varlen

CU = [0, 17, 40, 41, 64]


def qkv(hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(CU[-1], h, d, generator=g) for h in (hq, hkv, hkv)]


def _doc_attention(q, k, v, cu, causal, scale):
    """What a correct varlen kernel computes (K/V heads must already match q's) for ``CU``."""
    assert torch.equal(cu.as_subclass(torch.Tensor), torch.tensor(CU, dtype=torch.int32))
    assert k.size(1) == q.size(1), "the caller must repeat K/V heads for a kernel without enable_gqa"
    outs = []
    for a, b in zip(CU[:-1], CU[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        s = qs @ ks.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def fake_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    return _doc_attention(query, key, value, cu_seq_q, is_causal, query.size(-1) ** -0.5)


def fake_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)):
    causal = window_size == (-1, 0)  # as torch does: a list would silently mean "not causal"
    return _doc_attention(query, key, value, cu_seq_q, causal, scale or query.size(-1) ** -0.5)


def fake_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if key.size(1) != query.size(1):
        assert enable_gqa, "GQA without enable_gqa"
        rep = query.size(1) // key.size(1)
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    return fake_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.mark.parametrize("fake", [fake_2_10, fake_2_11, fake_2_13])
@pytest.mark.parametrize("causal", [True, False])
def test_portable_call_matches_per_document_attention(fake, causal):
    q, k, v = qkv()
    cu = torch.tensor(CU, dtype=torch.int32)
    scale = 0.3  # not 1/sqrt(d): the 2.10 stand-in has no scale keyword, so q must be pre-scaled
    out = FV.varlen_call(fake, q, k, v, cu, 23, causal=causal, scale=scale)
    ref = torch_varlen(q, k, v, cu, 23, causal=causal, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_negative_control_a_kernel_that_ignores_causal_differs():
    """A stand-in that drops the causal request must fail the same comparison."""
    def no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        return fake_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa=enable_gqa)

    q, k, v = qkv()
    cu = torch.tensor(CU, dtype=torch.int32)
    out = FV.varlen_call(no_causal, q, k, v, cu, 23, causal=True, scale=16 ** -0.5)
    ref = torch_varlen(q, k, v, cu, 23, causal=True, scale=16 ** -0.5)
    assert (out - ref).abs().max() > 0.1


def test_a_kernel_without_any_causal_keyword_is_refused():
    def bare(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError("must not be called")

    q, k, v = qkv(hq=2)
    with pytest.raises(RuntimeError, match="neither window_size nor is_causal"):
        FV.varlen_call(bare, q, k, v, torch.tensor(CU, dtype=torch.int32), 23, causal=True, scale=0.25)


def test_varlen_kernel_refuses_dropout_and_casts_cu_to_int32(monkeypatch):
    seen = {}

    def spy(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        seen.update(dtype=cu_seq_q.dtype, max=(max_q, max_k), gqa=enable_gqa, window=window_size)
        return query

    monkeypatch.setattr(FV, "varlen_fn", lambda: spy)
    q, k, v = qkv()
    FV.torch_fa_varlen(q, k, v, torch.tensor(CU), 23, causal=True, scale=0.25)
    assert seen == {"dtype": torch.int32, "max": (23, 23), "gqa": True, "window": (-1, 0)}
    with pytest.raises(ValueError, match="no dropout"):
        FV.torch_fa_varlen(q, k, v, torch.tensor(CU), 23, causal=True, scale=0.25, dropout_p=0.1)
    assert {"varlen", "flex"} <= set(KERNELS)


def test_varlen_call_never_reads_cu_seqlens_on_the_host():
    """No per-layer host sync: the portable call must not turn ``cu_seqlens`` into Python numbers."""
    class NoHost(torch.Tensor):
        def tolist(self):
            raise AssertionError("cu_seqlens.tolist() in the varlen path")

        def item(self):
            raise AssertionError("cu_seqlens.item() in the varlen path")

    cu = torch.tensor(CU, dtype=torch.int32).as_subclass(NoHost)
    q, k, v = qkv()
    FV.varlen_call(fake_2_13, q, k, v, cu, 23, causal=True, scale=0.25)


def test_flex_document_mask_matches_per_document_attention_on_cpu():
    q, k, v = qkv()
    cu = torch.tensor(CU, dtype=torch.int32)
    assert FV.document_ids(cu, 64).tolist() == [0] * 17 + [1] * 23 + [2] + [3] * 23
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        out = FV.flex_varlen(q, k, v, cu, 23, causal=True, scale=0.25)
        leaked = FV.flex_varlen(q, k, v, torch.tensor([0, 64], dtype=torch.int32), 64, causal=True, scale=0.25)
    ref = torch_varlen(q, k, v, cu, 23, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (leaked - ref).abs().max() > 0.1  # negative control: one segment over the row leaks


# --------------------------------------------------------------------------------------------
# The spec's choice of kernel
# --------------------------------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """Pretend what is installed: ``machine(flash=..., varlen=...)``."""
    def set_(flash=False, varlen=False):
        monkeypatch.setattr(spec_mod, "flash_attn_available", lambda: flash)
        monkeypatch.setattr(spec_mod, "torch_varlen_available", lambda: varlen)
    return set_


def test_varlen_is_chosen_with_cuda_and_half_precision_when_flash_attn_is_absent(machine):
    machine(varlen=True)
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"), bf16=True)) == "varlen"
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"), fp16=True)) == "varlen"
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"))) == "torch"  # fp32
    line = spec_mod.describe(transformer_config(get_preset("tiny"), bf16=True), "local")
    assert "attention: PyTorch varlen_attn (FlashAttention-2);" in line, line


def test_flash_attn_stays_where_installed_and_cp_or_dropout_take_torch(machine):
    machine(flash=True, varlen=True)
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"), bf16=True)) == "flash"
    machine(varlen=True)
    cp = transformer_config(get_preset("tiny"), bf16=True, context_parallel_size=2)
    assert spec_mod.attention_kernel(cp) == "torch"  # the kernel with the all-gather K/V path
    drop = transformer_config(get_preset("tiny"), bf16=True, attention_dropout=0.1)
    assert spec_mod.attention_kernel(drop) == "torch"
    machine()
    assert spec_mod.attention_kernel(transformer_config(get_preset("tiny"), bf16=True)) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine")
def test_without_cuda_varlen_is_not_available():
    assert spec_mod.torch_varlen_available() is False
    assert math.isfinite(1.0)


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_core_attention_module_runs_the_kernel_on_thd(kernel, monkeypatch):
    """VarlenCoreAttention with each new kernel (varlen through a 2.13-signature stand-in, flex
    eagerly on CPU): Megatron's [t, 1, h, d] inputs in, [t, h*d] out, equal to the torch kernel."""
    from types import SimpleNamespace

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_pack.model.attention import VarlenCoreAttention

    monkeypatch.setattr(FV, "varlen_fn", lambda: fake_2_13)
    cfg = transformer_config(get_preset("tiny"))
    pgs = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    mod = VarlenCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs, kernel=kernel)
    ref_mod = VarlenCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    q, k, v = qkv(hq=4, hkv=2, d=cfg.kv_channels)
    cu = torch.tensor(CU, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=23, max_seqlen_kv=23)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mod(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None, packed_seq_params=params)
    ref = ref_mod(q, k, v, None, packed_seq_params=params)
    assert out.shape == (64, 4 * cfg.kv_channels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
