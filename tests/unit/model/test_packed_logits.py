"""The GPU tests' logits comparison (tests/gpu/packed_logits.py), run on CPU: it passes a correct
document mask in fp32 and bf16, and fails a leaked one, with the margins its tolerance claims."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "gpu"))
import packed_logits as P  # noqa: E402


@pytest.fixture(scope="module")
def models():
    from megatron.core.transformer.module import Float16Module

    from megatron_pack.model import build_model, get_preset, transformer_config
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed

    initialize_distributed()
    set_seed(1234)
    preset = get_preset("tiny")
    fp32 = build_model(preset, transformer_config(preset, init_method_std=0.1), vocab_size=256, backend="local")
    cfg = transformer_config(preset, bf16=True, init_method_std=0.1)
    bf16 = Float16Module(cfg, build_model(preset, cfg, vocab_size=256, backend="local"))
    yield {"fp32": fp32.eval(), "bf16": bf16.eval()}
    destroy_distributed()
    from megatron_pack.parallel import cpu_compat

    cpu_compat.disable()  # process-wide: the CPU redirection tests expect it off


def test_fp32_packed_equals_padded_and_a_leak_is_far_outside_the_bound(models):
    res = P.check_packed_equals_padded(models["fp32"], what="fp32")
    assert res["gap"] < 1e-4
    assert res["leak"] > 4 * P.LOGIT_ATOL, res  # what a whole-row leak moves: the bound's reason


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_noise_is_well_inside_the_bound(models, seed):
    res = P.check_packed_equals_padded(models["bf16"], P.make_items(seed=seed), what="bf16")
    assert res["gap"] < P.LOGIT_ATOL / 4, res
    assert res["leak"] > 4 * P.LOGIT_ATOL, res


def test_negative_control_a_leaking_mask_fails_the_comparison(models, monkeypatch):
    """A broken document mask (the packed row attends across documents) must not pass."""
    monkeypatch.setattr(P, "thd_batch", P.leaked_batch)
    with pytest.raises(AssertionError, match="logits differ by up to"):
        P.check_packed_equals_padded(models["fp32"], what="mask off")


def test_negative_control_a_control_that_cannot_fail_is_reported(models, monkeypatch):
    """If the 'leaked' batch were not leaking, the check says its own negative control passed."""
    monkeypatch.setattr(P, "leaked_batch", P.thd_batch)
    with pytest.raises(AssertionError, match="negative control passed"):
        P.check_packed_equals_padded(models["fp32"], what="no leak")


def test_logits_line_up_between_layouts():
    items = P.make_items()
    assert P.thd_batch(items)["tokens"].shape == (1, len(items) * P.SEQ)
    assert P.padded_batch(items)["tokens"].shape == (len(items), P.SEQ)
    cu = P.leaked_batch(items)["cu_seqlens"]
    assert cu[:2].tolist() == [0, len(items) * P.SEQ] and (cu[2:] == -1).all()
    with pytest.raises(ValueError, match="different shapes"):
        P.logit_gap(torch.zeros(3, 4), torch.zeros(4, 4))
