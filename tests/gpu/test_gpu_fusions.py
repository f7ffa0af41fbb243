"""GPU tier: the fusions the spec provider turns on change no result (skipped without CUDA).

The same tiny model, same weights, packed (THD) batch, built with the chosen fusions and with
all of them off: losses and gradients agree to bf16 tolerance.
"""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def single_rank():
    from megatron_pack.parallel import destroy_distributed, initialize_distributed, set_seed

    state = initialize_distributed()
    set_seed(1234)
    yield state
    destroy_distributed()


def test_choice_on_cuda():
    from megatron_pack.model.spec import choose_fusions, te_available

    f = choose_fusions()
    assert f["bias_activation_fusion"] is True
    assert f["apply_rope_fusion"] is te_available()  # TE ships the fused (THD) RoPE


def _loss_and_grads(model, batch):
    from megatron_pack.model.packed import model_inputs

    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch, device=torch.device("cuda")))
    mask = batch["loss_mask"].cuda()
    loss = (out.float() * mask).sum() / mask.sum()
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["te", "local"])
def test_fused_equals_unfused(single_rank, backend):
    from megatron_pack.data.collate import collate_thd
    from megatron_pack.data.packed_dataset import PackedSFTDataset
    from megatron_pack.model import build_model, get_preset, transformer_config
    from megatron_pack.model.spec import choose_fusions

    if backend == "te":
        pytest.importorskip("transformer_engine")
    fusions = choose_fusions()
    fusions["gradient_accumulation_fusion"] = False  # needs Megatron DDP's main_grad buffers, not plain autograd
    preset = get_preset("tiny")
    torch.manual_seed(0)
    plain = build_model(preset, transformer_config(preset, bf16=True, init_method_std=0.1), vocab_size=256,
                        backend=backend).cuda()
    fused = build_model(preset, transformer_config(preset, bf16=True, init_method_std=0.1, **fusions),
                        vocab_size=256, backend=backend).cuda()
    fused.load_state_dict(plain.state_dict())
    # three documents in one 128-token row
    g = torch.Generator().manual_seed(1)
    lens = [40, 57, 31]
    toks = torch.randint(1, 256, (sum(lens),), generator=g)
    item = PackedSFTDataset.__new__(PackedSFTDataset)
    item.padded_length, item.pad_token_id, item.document_mask, item.cu_seqlens_len = 128, 0, True, 4
    batch = collate_thd([item.assemble(toks.numpy(), np.ones(len(toks), np.float32), np.asarray(lens))])
    a, ga = _loss_and_grads(plain, batch)
    b, gb = _loss_and_grads(fused, batch)
    assert abs(a - b) <= 2e-2 * abs(a), (a, b)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=5e-2, rtol=5e-2, msg=name)
