"""RoPE on THD rows without a host sync equals Megatron-Core's per-segment RoPE (and reads no
``cu_seqlens`` on the host); positions that do not restart per segment (negative control) differ."""

from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_pack.model import thd_rope

CU = [0, 17, 40, 41, 64]
ONE_RANK = SimpleNamespace(size=lambda: 1, rank=lambda: 0)


class NoHost(torch.Tensor):
    def tolist(self):
        raise AssertionError("cu_seqlens.tolist(): a host sync per layer on a GPU")

    def __bool__(self):
        raise AssertionError("a tensor read on the host: a host sync per layer on a GPU")


@pytest.fixture(scope="module")
def original():
    thd_rope.install()
    return thd_rope._ORIGINAL


@pytest.mark.parametrize("interleaved", [False, True])
def test_equals_megatron_per_segment_rope_without_host_reads(original, interleaved):
    g = torch.Generator().manual_seed(0)
    long_freqs = torch.randn(64, 1, 1, 16, generator=g)  # any angles: [positions, 1, 1, d]
    freqs = long_freqs[:23]  # positions 0 .. max_seqlen - 1
    t = torch.randn(CU[-1], 4, 16, generator=g)
    cu = torch.tensor(CU, dtype=torch.int32)
    ref = original(t, cu, freqs, rotary_interleaved=interleaved, mscale=1.3, cp_group=ONE_RANK)
    out = thd_rope.apply_rotary_pos_emb_thd(t, cu.as_subclass(NoHost), freqs, rotary_interleaved=interleaved,
                                            mscale=1.3, cp_group=ONE_RANK)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), ref, atol=1e-6, rtol=1e-6)
    # negative control: one segment over the row (positions 0..63 do not restart) must differ
    flat = rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), long_freqs, rotary_interleaved=interleaved,
                                                 mscale=1.3).squeeze(1)
    assert (flat - ref).abs().max() > 0.1


def test_installed_where_megatron_looks_it_up_and_cp_keeps_megatron(original, monkeypatch):
    assert rope_utils._apply_rotary_pos_emb_thd is thd_rope.apply_rotary_pos_emb_thd
    calls = []
    monkeypatch.setattr(thd_rope, "_ORIGINAL", lambda *a, **kw: calls.append(kw["cp_group"].size()) or a[0])
    t, freqs = torch.randn(8, 2, 4), torch.zeros(4, 1, 1, 4)
    thd_rope.apply_rotary_pos_emb_thd(t, torch.tensor([0, 8]), freqs, cp_group=SimpleNamespace(size=lambda: 2))
    thd_rope.apply_rotary_pos_emb_thd(t, torch.tensor([0, 8]), torch.zeros(8, 1, 1, 4), cp_group=ONE_RANK)
    assert calls == [2, 1]  # CP, and freqs as long as the row (Megatron's "offsets" case)


def test_positions_restart_per_segment():
    pos = thd_rope.positions_in_segments(torch.tensor([0, 3, 5, 9], dtype=torch.int32), 9)
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_installed_release_matches_what_the_wrapper_was_written_for():
    thd_rope.check_rope_utils(rope_utils)  # the installed Megatron-Core: no error


@pytest.mark.parametrize("change", ["renamed", "new parameter"])
def test_a_changed_private_rope_function_is_refused_naming_the_release(change):
    def thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
            cp_group=None, offsets=None):
        return t

    fake = SimpleNamespace(_apply_rotary_pos_emb_bshd=rope_utils._apply_rotary_pos_emb_bshd)
    if change == "new parameter":
        fake._apply_rotary_pos_emb_thd = thd
    with pytest.raises(RuntimeError, match=r"megatron-core .*rope_utils\._apply_rotary_pos_emb_thd .*update"):
        thd_rope.check_rope_utils(fake)
