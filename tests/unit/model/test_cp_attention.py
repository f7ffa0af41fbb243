"""Context-parallel attention math on one process: each simulated CP rank's output equals its
share of the single-process packed attention; not reordering the gathered keys breaks it."""

from types import SimpleNamespace

import pytest
import torch

from megatron_pack.data.context_parallel import rank_token_index
from megatron_pack.model import cp_attention
from megatron_pack.model.attention import torch_varlen


def _simulate(monkeypatch, q, k, v, cu_pad, cp, reorder=True):
    """Run cp_varlen for every rank with the all-gather replaced by the concatenation of the shares."""
    idx = [rank_token_index(cu_pad, cp, r) for r in range(cp)]
    monkeypatch.setattr(
        cp_attention,
        "all_gather_with_grad",
        lambda x, group: torch.cat([full[i] for i in idx]) if (full := gathered[id(x)]) is not None else x,
    )
    outs = []
    for r in range(cp):
        ql, kl, vl = q[idx[r]], k[idx[r]], v[idx[r]]
        gathered = {id(kl): k, id(vl): v}
        group = SimpleNamespace(size=lambda: cp, rank=lambda r=r: r)
        outs.append((idx[r], cp_attention.cp_varlen(ql, kl, vl, cu_pad, group, scale=0.5, reorder=reorder)))
    return outs


@pytest.mark.parametrize("cp", [2, 3])
def test_every_rank_gets_its_share_of_the_full_attention(monkeypatch, cp):
    m = 2 * cp
    cu_pad = torch.tensor([0, m, 4 * m, 5 * m, 8 * m])  # segments of 1, 3, 1, 3 chunks-per-rank pairs
    t = int(cu_pad[-1])
    g = torch.Generator().manual_seed(cp)
    q = torch.randn(t, 4, 8, generator=g)
    k, v = torch.randn(2, t, 2, 8, generator=g)  # grouped-query: 2 KV heads
    ref = torch_varlen(q, k, v, cu_pad, int(m * 3), causal=True, scale=0.5)
    for idx, out in _simulate(monkeypatch, q, k, v, cu_pad, cp):
        torch.testing.assert_close(out, ref[idx], atol=1e-5, rtol=1e-5)
    # negative control: keys left in the ranks' local order instead of the global one
    bad = _simulate(monkeypatch, q, k, v, cu_pad, cp, reorder=False)
    assert max(float((out - ref[idx]).abs().max()) for idx, out in bad) > 1e-2
