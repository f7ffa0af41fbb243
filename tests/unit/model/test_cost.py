"""The per-sequence cost model: the analytic matmul count equals the built model's, and the
planner's timing uses the same formula."""

import pytest

from megatron_pack.model.cost import CostModel, matmul_parameters
from megatron_pack.model.presets import get_preset, padded_vocab_size


def test_matmul_parameters_llama3_8b_by_hand():
    p = get_preset("llama3-8b")
    per_layer = 4096 * (32 + 16) * 128 + 4096 * 4096 + 3 * 4096 * 14336
    assert matmul_parameters(p, 128256) == 32 * per_layer + 4096 * 128256
    # the planner's count of the built Megatron-Core model (tests/unit/planning) for vocab 128256
    assert matmul_parameters(p, padded_vocab_size(128256, 1)) == 7_504_658_432


def test_attention_dominates_one_long_document_not_many_short_ones():
    cm = CostModel.from_architecture(get_preset("llama3-8b"))
    one = cm.sequence_flops(32768, 32768 ** 2)
    many = cm.sequence_flops(32768, 64 * 512 ** 2)
    assert one / many == pytest.approx(1.56, abs=0.02)
    assert cm.attention_share(32768, 32768 ** 2) == pytest.approx(0.36, abs=0.01)


def test_cp_splits_evenly_and_keeps_ratios():
    a = CostModel.from_architecture(get_preset("tiny"), vocab_size=256)
    b = CostModel.from_architecture(get_preset("tiny"), vocab_size=256, cp=4)
    assert b.rank_flops(100, 5000) == pytest.approx(a.rank_flops(100, 5000) / 4)
    with pytest.raises(ValueError, match="context parallel"):
        CostModel(1.0, 1.0, cp=0)


def test_vocab_required_without_preset_vocab():
    with pytest.raises(ValueError, match="vocabulary size unknown"):
        matmul_parameters(get_preset("tiny"))


def test_planner_timing_uses_the_cost_model():
    from megatron_pack.planning.catalogue import get_gpu
    from megatron_pack.planning.step_time import SequenceStats, TimingConfig, estimate

    p = get_preset("llama3-8b")
    n = matmul_parameters(p, 128256)
    cfg = TimingConfig(gpu=get_gpu("a800-80gb"), num_gpus=1, pp=1, num_microbatches=1, global_batch_size=1,
                       seq_length=4096)
    est = estimate(p, n, SequenceStats(1, 4096, 4096.0 ** 2), cfg)
    cm = CostModel.from_architecture(p, matmul_params=n)
    assert est.model_flops_per_step == pytest.approx(float(cm.sequence_flops(4096, 4096 ** 2)))
