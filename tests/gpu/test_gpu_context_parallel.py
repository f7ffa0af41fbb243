"""GPU tier, context parallelism with Transformer Engine THD attention (skipped without CUDA/TE).

* one GPU: TE honours ``cu_seqlens_q_padded`` (documents padded to 2*CP, the layout the CP
  split needs) and gives the real tokens the same output as the unpadded batch;
* two GPUs: TE CP2 (``cp_comm_type`` p2p, NCCL) on each rank's chunks, laid out by
  :func:`megatron_pack.data.context_parallel.rank_token_index` (checked against TE's own
  ``thd_get_partitioned_indices``), equals CP1 on the same batch, outputs and gradients.
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = dict(atol=2e-2, rtol=2e-2)  # bf16
HQ, HKV, D = 8, 2, 64
REAL = [17, 3, 64, 1, 40]  # documents of odd lengths, some shorter than 2*CP


def _layout(cp=2):
    from megatron_pack.data.context_parallel import document_multiple, padded_lengths

    m = document_multiple(cp)
    padded = padded_lengths(REAL, m).tolist()
    cu = torch.tensor([0] + torch.tensor(REAL).cumsum(0).tolist(), dtype=torch.int32)
    cu_pad = torch.tensor([0] + torch.tensor(padded).cumsum(0).tolist(), dtype=torch.int32)
    return cu, cu_pad, max(padded)


def _inputs(total, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(total, h, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (HQ, HKV, HKV)]


def _attention(**cp):
    te = pytest.importorskip("transformer_engine.pytorch")
    return te.DotProductAttention(HQ, D, num_gqa_groups=HKV, attn_mask_type="padding_causal", qkv_format="thd",
                                  **cp)


def _run(attn, q, k, v, cu, cu_pad, max_seqlen):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attn(q, k, v, cu_seqlens_q=cu.cuda(), cu_seqlens_kv=cu.cuda(), cu_seqlens_q_padded=cu_pad.cuda(),
               cu_seqlens_kv_padded=cu_pad.cuda(), max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    out.float().square().sum().backward()
    return out.detach().reshape(out.size(0), HQ, D), (q.grad, k.grad, v.grad)


def _real_positions(cu, cu_pad):
    return torch.cat([torch.arange(int(p), int(p) + int(b - a)) for a, b, p in zip(cu[:-1], cu[1:], cu_pad[:-1])])


def test_te_thd_honours_cu_seqlens_padded():
    cu, cu_pad, max_seqlen = _layout()
    attn = _attention()
    q, k, v = _inputs(int(cu_pad[-1]))
    real = _real_positions(cu, cu_pad).cuda()
    out_pad, _ = _run(attn, q, k, v, cu, cu_pad, max_seqlen)
    out, _ = _run(attn, q[real], k[real], v[real], cu, cu, max(REAL))
    torch.testing.assert_close(out_pad[real].float(), out.float(), **TOL)


def _cp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    import transformer_engine_torch as tex

    from megatron_pack.data.context_parallel import rank_token_index

    cu, cu_pad, max_seqlen = _layout(world)
    q, k, v = _inputs(int(cu_pad[-1]))
    full_out, full_grads = _run(_attention(), q, k, v, cu, cu_pad, max_seqlen)  # CP1 on every rank
    idx = rank_token_index(cu_pad, world, rank).cuda()
    te_idx = tex.thd_get_partitioned_indices(cu_pad.cuda(), int(cu_pad[-1]), world, rank)
    assert torch.equal(idx, te_idx.long()), (idx, te_idx)
    attn = _attention()
    group = torch.distributed.new_group(list(range(world)))
    attn.set_context_parallel_group(group, list(range(world)), torch.cuda.Stream(), "p2p")
    out, grads = _run(attn, q[idx], k[idx], v[idx], cu, cu_pad, max_seqlen)
    real = torch.isin(idx, _real_positions(cu, cu_pad).cuda())  # padding outputs are unspecified
    torch.testing.assert_close(out[real].float(), full_out[idx][real].float(), **TOL)
    for g, ref in zip(grads, full_grads):  # gradients of the real tokens' keys/values/queries
        torch.testing.assert_close(g[real].float(), ref[idx][real].float(), atol=5e-2, rtol=5e-2)
    open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="CP2 with NCCL needs 2 GPUs")
def test_te_cp2_thd_equals_cp1(tmp_path):
    pytest.importorskip("transformer_engine.pytorch")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]
