"""GPU tier: the fast packed-attention paths equal the PyTorch reference (skipped without CUDA).

* PyTorch's ``varlen_attn`` and ``flex_attention`` (document block mask), flash-attn
  ``flash_attn_varlen_func`` (local layers) and Transformer Engine THD attention against a
  float64 dense block-diagonal causal reference, GQA included, with gradients; the PyTorch
  kernels also with the document mask off (one segment over the row), which must fail it;
* the whole tiny GPTModel: packed (THD) == padded on each backend, TE layers == local layers,
  compared on every real token's logits (``packed_logits``: a tolerance that a document-mask
  leak exceeds ~17x, and the leaked row as negative control that must fail the comparison).
"""

import math

import packed_logits as P
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def reference(q, k, v, cu):
    t, hq, d = q.shape
    rep = hq // k.size(1)
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    doc = torch.zeros(t, dtype=torch.long, device=q.device)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc[a:b] = i
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def qkv(t, hq, hkv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(t, h, d, device="cuda", generator=g, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


CU = [0, 17, 100, 101, 164, 256]


def check_against_reference(fn, hq=8, hkv=2, d=64):
    cu = torch.tensor(CU, dtype=torch.int32, device="cuda")
    q, k, v = qkv(CU[-1], hq, hkv, d)
    out = fn(q, k, v, cu, max(b - a for a, b in zip(CU, CU[1:])))
    ref = reference(q, k, v, cu)
    torch.testing.assert_close(out.float().reshape(ref.shape), ref.float(), **BF16_TOL)
    w = torch.randn(ref.shape, device="cuda", dtype=torch.float64)
    g = torch.autograd.grad((out.double().reshape(ref.shape) * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_flash_varlen_matches_reference():
    pytest.importorskip("flash_attn")
    from megatron_pack.model.attention import flash_varlen

    check_against_reference(lambda q, k, v, cu, m: flash_varlen(q, k, v, cu, m, causal=True, scale=64 ** -0.5))


def _fails_reference(fn):
    """Negative control: ``fn`` given one segment over the whole row (no document mask)."""
    cu = torch.tensor(CU, dtype=torch.int32, device="cuda")
    q, k, v = qkv(CU[-1], 8, 2, 64, seed=1)
    with torch.no_grad():
        out = fn(q, k, v, torch.tensor([0, CU[-1]], dtype=torch.int32, device="cuda"), CU[-1])
        gap = float((out.float().reshape(q.shape) - reference(q, k, v, cu).float()).abs().max())
    assert gap > 10 * BF16_TOL["atol"], f"negative control: the unmasked row is within {gap:.4f} of the reference"


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_pytorch_fused_kernels_match_reference(kernel):
    from megatron_pack.model import fused_varlen as FV

    if FV.varlen_fn() is None and kernel == "varlen":
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    fn = FV.torch_fa_varlen if kernel == "varlen" else FV.flex_varlen
    run = lambda q, k, v, cu, m: fn(q, k, v, cu, m, causal=True, scale=64 ** -0.5)  # noqa: E731
    check_against_reference(run)
    _fails_reference(run)


def test_varlen_runs_without_a_host_sync():
    """The varlen path never waits on the GPU: under ``set_sync_debug_mode("error")`` a host
    sync (``cu_seqlens.tolist()``, ``.item()``) would raise."""
    from megatron_pack.model import fused_varlen as FV

    if FV.varlen_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    cu = torch.tensor(CU, dtype=torch.int32, device="cuda")
    q, k, v = qkv(CU[-1], 8, 2, 64)
    FV.torch_fa_varlen(q, k, v, cu, 83, causal=True, scale=0.125)  # warm-up: first call may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = FV.torch_fa_varlen(q, k, v, cu, 83, causal=True, scale=0.125)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == q.shape


def test_torch_varlen_on_cuda_matches_reference():
    from megatron_pack.model.attention import torch_varlen

    check_against_reference(lambda q, k, v, cu, m: torch_varlen(q, k, v, cu, m, causal=True, scale=64 ** -0.5))


@pytest.fixture(scope="module")
def single_rank():
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed

    state = initialize_distributed()
    set_seed(1234)
    assert state.backend == "nccl" and state.device.type == "cuda"
    yield state
    destroy_distributed()


@pytest.mark.parametrize("head_dim", [64, 128])  # tiny-like and Llama-3 8B/70B heads
def test_te_thd_attention_matches_reference(single_rank, head_dim):
    pytest.importorskip("transformer_engine")
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_pack.model import transformer_config
    from megatron_pack.model.presets import LlamaPreset

    preset = LlamaPreset("gqa", num_layers=1, hidden_size=8 * head_dim, ffn_hidden_size=1024,
                         num_attention_heads=8, num_query_groups=2, vocab_size=256)
    attn = TEDotProductAttention(transformer_config(preset, bf16=True), 1, AttnMaskType.causal, "self")

    def run(q, k, v, cu, m):
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)
        return attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)

    check_against_reference(run, d=head_dim)


def _packed_and_padded_loss(model, lengths=P.LENGTHS):
    from megatron_pack.model.packed import model_inputs

    items = P.make_items(lengths, S=P.SEQ)
    losses = []
    for batch in (P.thd_batch(items), P.padded_batch(items)):
        out = model(**model_inputs(batch, device=torch.device("cuda")))
        mask = batch["loss_mask"].cuda()
        losses.append(float((out.float() * mask).sum() / mask.sum()))
    return losses


@pytest.mark.parametrize("kernel", ["varlen", "flex", "torch"])
def test_model_packed_equals_padded_per_local_kernel(single_rank, kernel, monkeypatch):
    """Local layers with each PyTorch kernel: packed == padded on every real token's logits, and
    the leaked row (mask off) fails the same comparison (``check_packed_equals_padded``)."""
    from megatron_pack.model import build_model, get_preset, spec, transformer_config
    from megatron_pack.model import fused_varlen as FV

    if kernel == "varlen" and FV.varlen_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    monkeypatch.setattr(spec, "attention_kernel", lambda config: kernel)
    preset = get_preset("tiny")
    model = build_model(preset, transformer_config(preset, bf16=True, init_method_std=0.1), vocab_size=256,
                        backend="local").eval()
    ca = model.decoder.layers[0].self_attention.core_attention
    assert ca.kernel == kernel
    gaps = P.check_packed_equals_padded(model, device=torch.device("cuda"), what=f"local/{kernel}")
    print(kernel, gaps)


@pytest.mark.parametrize("backend", ["te", "local"])
def test_model_packed_equals_padded(single_rank, backend):
    from megatron_pack.model import build_model, get_preset, transformer_config
    from megatron_pack.model.spec import resolve_backend

    if backend == "te":
        pytest.importorskip("transformer_engine")
    preset = get_preset("tiny")
    cfg = transformer_config(preset, bf16=True, init_method_std=0.1)
    model = build_model(preset, cfg, vocab_size=256, backend=backend).eval()
    assert resolve_backend(backend) == backend
    gaps = P.check_packed_equals_padded(model, device=torch.device("cuda"), what=backend)
    print(backend, gaps)


def test_model_packed_equals_padded_fp32_local_exact(single_rank):
    """fp32 with TF32 off: the local path on CUDA meets the CPU tolerance."""
    from megatron_pack.model import build_model, get_preset, transformer_config

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        preset = get_preset("tiny")
        model = build_model(preset, transformer_config(preset, init_method_std=0.1), vocab_size=256, backend="local")
        with torch.no_grad():
            packed, padded = _packed_and_padded_loss(model)
        assert abs(packed - padded) <= 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_te_layers_equal_local_layers(single_rank):
    """Same weights in both specs (local norms map onto TE's fused norm+linear) give the same loss."""
    pytest.importorskip("transformer_engine")
    from megatron_pack.model import build_model, get_preset, transformer_config

    preset = get_preset("tiny")
    cfg = transformer_config(preset, bf16=True, init_method_std=0.1)
    local = build_model(preset, cfg, vocab_size=256, backend="local")
    te = build_model(preset, cfg, vocab_size=256, backend="te")
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    sd = {}
    for name, tensor in local.state_dict().items():
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        sd[name] = tensor
    missing, unexpected = te.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    items, cuda = P.make_items(), torch.device("cuda")
    with torch.no_grad():
        a = P.doc_logits(local.eval(), P.thd_batch(items), items, cuda)
        b = P.doc_logits(te.eval(), P.thd_batch(items), items, cuda)
        leaked = P.doc_logits(te, P.leaked_batch(items), items, cuda)
    P.assert_logits_match(b, a, what="te vs local")
    assert P.logit_gap(leaked, a) > P.LOGIT_ATOL, "negative control: TE with the mask off must not match"


def test_packed_forward_of_the_model_has_no_host_sync(single_rank, monkeypatch):
    """Local layers, bf16, PyTorch's varlen kernel: a packed forward issues no synchronizing CUDA
    call (the batch's ``PackedSeqParams`` built before, as the training loop does once per
    micro-batch). Each sync is reported with the line that made it."""
    import warnings

    from megatron_pack.model import build_model, get_preset, spec, transformer_config
    from megatron_pack.model import fused_varlen as FV
    from megatron_pack.model.packed import model_inputs

    if FV.varlen_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    monkeypatch.setattr(spec, "attention_kernel", lambda config: "varlen")
    preset = get_preset("tiny")
    model = build_model(preset, transformer_config(preset, bf16=True, init_method_std=0.1), vocab_size=256,
                        backend="local").eval()
    items = P.make_items()
    kw = model_inputs({k: v for k, v in P.thd_batch(items).items() if k != "labels"}, device=torch.device("cuda"))
    with torch.no_grad():
        model(**kw)  # warm-up: caches (RoPE frequencies), kernel loading
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                model(**kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
    assert not syncs, f"{len(syncs)} host syncs in one packed forward: {sorted(set(syncs))}"
