"""VarlenCoreAttention and its kernels against a dense masked reference (CPU, fp32/fp64)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_pack.model import get_preset, transformer_config
from megatron_pack.model.attention import VarlenCoreAttention, torch_dense, torch_varlen


def reference_attention(q, k, v, cu_seqlens, causal=True):
    """Dense [t, t] block-diagonal (causal) mask, softmax in float64: the slow obvious answer."""
    t, hq, d = q.shape
    rep = hq // k.size(1)
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    doc = torch.zeros(t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        doc[a:b] = i
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def rand_qkv(t, hq, hkv, d, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=g, requires_grad=requires_grad) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("bounds", [[0, 5, 12, 13, 20], [0, 4, 8, 12, 16], [0, 3, 3, 9], [0, 11]])
def test_varlen_matches_dense_reference(hq, hkv, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = rand_qkv(bounds[-1], hq, hkv, 8, requires_grad=True)
    out = torch_varlen(q, k, v, cu, max(b - a for a, b in zip(bounds, bounds[1:])), causal=True, scale=8 ** -0.5)
    ref = reference_attention(q, k, v, cu)
    assert out.shape == (bounds[-1], hq, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(), (q, k, v))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_no_attention_across_documents():
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    q, k, v = rand_qkv(10, 4, 2, 8)
    out = torch_varlen(q, k, v, cu, 6, causal=True, scale=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[6:] += 5.0  # change only the second document's keys and values
    v2[6:] -= 3.0
    out2 = torch_varlen(q, k2, v2, cu, 6, causal=True, scale=0.3)
    assert torch.equal(out[:6], out2[:6])
    assert not torch.allclose(out[6:], out2[6:])
    # the first token of each document only sees itself: its output is its own value (GQA group)
    torch.testing.assert_close(out[6], v[6].repeat_interleave(2, 0))


def test_never_builds_a_dense_mask(monkeypatch):
    """Each SDPA call sees at most max_seqlen keys, never the whole packed row."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((tuple(k.shape), kw.get("attn_mask")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cu = torch.tensor([0, 7, 10, 17, 64], dtype=torch.int32)
    q, k, v = rand_qkv(64, 4, 2, 8)
    torch_varlen(q, k, v, cu, 47, causal=True, scale=0.3)
    assert seen and all(mask is None for _, mask in seen)
    assert max(shape[2] for shape, _ in seen) == 47  # key length of the longest document
    assert sum(shape[0] for shape, _ in seen) == 4  # all 4 documents, equal lengths batched (7, 3, 7, 47)
    assert len(seen) == 3


def test_bad_cu_seqlens():
    q, k, v = rand_qkv(10, 2, 2, 4)
    with pytest.raises(ValueError, match="do not tile"):
        torch_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 5, causal=True, scale=0.5)
    with pytest.raises(ValueError, match="do not tile"):
        torch_varlen(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, causal=True, scale=0.5)


def test_dense_causal_and_megatron_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(9, 2, 4, 8, generator=g) for _ in range(3))  # [s, b, h, d]
    out = torch_dense(q, k, v, causal=True, scale=8 ** -0.5)
    for b in range(2):
        ref = reference_attention(q[:, b], k[:, b], v[:, b], torch.tensor([0, 9]))
        torch.testing.assert_close(out[:, b], ref, atol=1e-5, rtol=1e-5)
    # Megatron masks say True = masked: hide keys 5.. from row 1 only
    mask = torch.zeros(2, 1, 9, 9, dtype=torch.bool)
    mask[1, :, :, 5:] = True
    masked = torch_dense(q, k, v, causal=True, scale=8 ** -0.5, attention_mask=mask)
    torch.testing.assert_close(masked[:, 0], out[:, 0])
    torch.testing.assert_close(masked[:5, 1], out[:5, 1])
    # queries 5.. of row 1 see exactly keys 0..4 (all earlier than them)
    scores = torch.einsum("qhd,khd->hqk", q[5:, 1], k[:5, 1]) * 8 ** -0.5
    ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[:5, 1])
    torch.testing.assert_close(masked[5:, 1], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[5:, 1], out[5:, 1])


def _module(tp_size=1, **kw):
    cfg = transformer_config(get_preset("tiny"), **kw)
    pgs = SimpleNamespace(tp=SimpleNamespace(size=lambda: tp_size))
    return VarlenCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs), cfg


@pytest.mark.parametrize("tp_size", [1, 2])
def test_module_thd_shapes_and_values(tp_size):
    mod, cfg = _module(tp_size)
    hq, hkv, d = 4 // tp_size, 2 // tp_size, cfg.kv_channels  # tiny: 4 heads, 2 groups per full model
    assert (mod.num_heads_per_partition, mod.num_groups_per_partition) == (hq, hkv)
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)
    q, k, v = rand_qkv(16, hq, hkv, d, seed=tp_size)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    ref = reference_attention(q, k, v, cu).reshape(16, -1)
    for shape in ("thd", "t1hd"):  # Megatron squeezes to [t, h, d]; accept the unsqueezed form too
        args = (q, k, v) if shape == "thd" else (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        out = mod(*args, None, packed_seq_params=params)
        assert out.shape == (16, hq * d)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_module_sbhd_is_causal_per_row():
    mod, cfg = _module()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 3, 4, cfg.kv_channels, generator=g)
    k, v = torch.randn(2, 6, 3, 2, cfg.kv_channels, generator=g)
    out = mod(q, k, v, None)
    assert out.shape == (6, 3, 4 * cfg.kv_channels)
    for b in range(3):
        ref = reference_attention(q[:, b], k[:, b], v[:, b], torch.tensor([0, 6])).reshape(6, -1)
        torch.testing.assert_close(out[:, b], ref, atol=1e-5, rtol=1e-5)


def test_module_rejects_what_it_cannot_do():
    mod, cfg = _module()
    q = torch.randn(4, 4, cfg.kv_channels)
    with pytest.raises(ValueError, match="qkv_format"):
        mod(q, q[:, :2], q[:, :2], None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    with pytest.raises(ValueError, match="attention_bias"):
        mod(q, q[:, :2], q[:, :2], None, attention_bias=torch.zeros(1))
    cp_cfg = transformer_config(get_preset("tiny"), context_parallel_size=2)
    with pytest.raises(ValueError, match="--context-parallel-size 2: the local backend's 'flash' kernel"):
        VarlenCoreAttention(cp_cfg, 1, AttnMaskType.causal, "self", kernel="flash",
                            pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    cfg = transformer_config(get_preset("tiny"))
    with pytest.raises(ValueError, match="unknown attention kernel"):
        VarlenCoreAttention(cfg, 1, AttnMaskType.causal, "self", kernel="xformers",
                            pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
