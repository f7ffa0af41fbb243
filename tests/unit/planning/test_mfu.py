"""MFU from real tokens: a hand-computed case, the causal half counted once (the transformers
comparison used to halve it a second time), and the catalogue's device-name lookup."""

from types import SimpleNamespace

import pytest

from megatron_pack.model.cost import CostModel
from megatron_pack.planning.catalogue import gpu_from_device_name
from megatron_pack.planning.mfu import flops_per_real_token, mfu

# L=2 layers, h=8, a=2 heads of d=4, g=2 groups, FFN 16, vocabulary 10
ARCH = SimpleNamespace(name="hand", num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                       kv_channels=4, ffn_hidden_size=16, vocab_size=10)


def test_hand_computed_mfu():
    # N_matmul = L * (h*(a+2g)*d + a*d*h + 3*h*f) + h*V = 2 * (192 + 64 + 384) + 80 = 1360
    # linear: 6 * 1360 = 8160 per token; attention: 6 * L * a * d = 96 per unit of sum s^2
    # documents of 2 and 4 tokens: sum s^2 = 20 over 6 tokens -> 96 * 20 / 6 = 320 per token
    cost = CostModel.from_architecture(ARCH)
    assert (cost.linear_flops_per_token, cost.attention_flops_per_sq) == (8160.0, 96.0)
    per_token = flops_per_real_token(cost, [2, 4])
    assert per_token == pytest.approx(8480.0)
    assert mfu(1000.0, per_token, 1e7) == pytest.approx(0.848)
    # negative control: the old double halving (attention / 2 once more) gives 8320 -> 0.832
    assert mfu(1000.0, cost.linear_flops_per_token + 320 / 2, 1e7) != pytest.approx(0.848)


def test_causal_attention_counted_once_against_a_direct_count():
    """A direct count of one causal document of s tokens, per layer forward: QK^T and AV over
    the lower half, 2 * (2 * s^2/2 * a * d) = 2 s^2 a d; x3 for forward + backward."""
    cost = CostModel.from_architecture(ARCH)
    s = 64
    direct = 3 * ARCH.num_layers * 2 * s * s * ARCH.num_attention_heads * ARCH.kv_channels
    assert (flops_per_real_token(cost, [s]) - cost.linear_flops_per_token) * s == pytest.approx(direct)


def test_bad_inputs():
    cost = CostModel.from_architecture(ARCH)
    with pytest.raises(ValueError, match="no real tokens"):
        flops_per_real_token(cost, [])
    with pytest.raises(ValueError, match="peak FLOP/s"):
        mfu(1.0, 1.0, 0.0)


def test_device_names_map_to_the_catalogue():
    assert gpu_from_device_name("NVIDIA H200").name == "H200"
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3").name == "H100-80GB"
    assert gpu_from_device_name("NVIDIA A100-SXM4-80GB").peak_flops == 312e12
    assert gpu_from_device_name("NVIDIA GeForce RTX 4090") is None
