"""megatron_pack.experiment.hf_baseline (benchmarks/bench_train_vs_hf.py's baseline): its check of
TRL's padding-free batches (a flattened row with restarting ``position_ids``, no attention mask)
passes for transformers' SDPA path on CPU (called as SFTTrainer calls the model) and fails a batch
whose attention crosses documents."""

import pytest
import torch

from megatron_pack.experiment import hf_baseline as B

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=300,
        initializer_range=0.1,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).float().eval()  # SDPA: transformers' default


def flat_batch(lengths):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[pos == 0] = -100  # what TRL's collator does: no label predicts across a boundary
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def test_padding_free_batch_equals_padded_rows_with_sdpa(model):
    res = B.padding_free_check(model, flat_batch([17, 40, 9, 30]))
    assert res["correct"], res
    assert abs(res["packed"] - res["padded"]) < 1e-5 * res["padded"]


def test_negative_control_an_all_ones_attention_mask_leaks_and_fails_the_check(model):
    """With an attention mask, transformers no longer reads the document boundaries from
    ``position_ids`` (TRL's reason for dropping the mask): attention crosses documents."""
    batch = flat_batch([17, 40, 9, 30])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    res = B.padding_free_check(model, batch)
    assert not res["correct"], res
    assert abs(res["packed"] - res["padded"]) > 1e-3 * res["padded"]


def test_without_use_cache_false_transformers_does_not_see_the_documents(model):
    """Why the check calls the model as SFTTrainer does (``use_cache=False``): a plain call
    builds a KV cache, and transformers then skips reading packing from ``position_ids``."""
    batch = flat_batch([17, 40, 9, 30])
    with torch.no_grad():
        plain = float(model(**batch).loss)
    res = B.padding_free_check(model, batch)
    assert res["correct"] and abs(plain - res["padded"]) > 1e-3 * res["padded"], (plain, res)


def test_conversations_are_learnable_and_masked():
    convs = B.conversations(50, 512, 1000, seed=0)
    lens = [len(c["input_ids"]) for c in convs]
    assert min(lens) >= 24 and max(lens) <= 512
    for c in convs:
        assert len(c["loss_mask"]) == len(c["input_ids"]) and c["turn_starts"][0] == 0
        assert 0 < sum(c["loss_mask"]) < len(c["input_ids"])  # prompts untrained, answers trained
        assert c["loss_mask"][c["turn_starts"][-1]] == 0
