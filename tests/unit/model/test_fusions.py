"""Fusion switches chosen once by the spec provider: all off on CPU, each on where its kernel imports."""

import pytest

from megatron_pack.model import spec as spec_mod
from megatron_pack.model.presets import get_preset, transformer_config

KEYS = {"gradient_accumulation_fusion", "apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion"}


def test_all_off_without_cuda():
    f = spec_mod.choose_fusions(use_cuda=False)
    assert set(f) == KEYS == set(spec_mod.FUSION_NEEDS) and not any(f.values())
    cfg = transformer_config(get_preset("tiny"), **f)
    assert spec_mod.describe_fusions(cfg) == ("fusions: grad-accum off, rope off, bias-swiglu off, "
                                              "masked-softmax off")


@pytest.mark.parametrize("installed, expect", [
    (set(), {"bias_activation_fusion"}),
    ({"te"}, {"bias_activation_fusion", "apply_rope_fusion"}),
    ({"te", "fused_weight_gradient_mlp_cuda", "scaled_masked_softmax_cuda"}, KEYS),
])
def test_on_where_the_kernels_exist(monkeypatch, installed, expect):
    monkeypatch.setattr(spec_mod, "_importable", lambda m: m in installed)
    monkeypatch.setattr(spec_mod, "_te_fused_rope", lambda: "te" in installed)
    f = spec_mod.choose_fusions(use_cuda=True)
    assert {k for k, v in f.items() if v} == expect


def test_the_switches_reach_megatron():
    """Megatron checks them: RoPE fusion without Transformer Engine is refused, so choosing it
    where TE is missing (what the presets' hard-coded False avoided) would break the run."""
    if spec_mod._te_fused_rope():
        pytest.skip("Transformer Engine installed: the refusal cannot be shown here")
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        transformer_config(get_preset("tiny"), apply_rope_fusion=True)
    cfg = transformer_config(get_preset("tiny"), bias_activation_fusion=True)
    assert cfg.bias_activation_fusion is True
    assert "bias-swiglu on" in spec_mod.describe_fusions(cfg)
