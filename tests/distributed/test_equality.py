"""Packed == padded, TP/PP/DP layouts == one process, and context parallel (CP) == CP 1, on
CPU with gloo (tiny model, fp32).

Three launches share one reference: a single process saves the tiny model's weights as a
Megatron dist checkpoint; 2-rank and 4-rank launches reload them resharded (TP1 -> TP2/PP2)
so every layout starts from the same numbers. Each launch runs several layouts to pay the
torch + Megatron-Core start-up once. The CP layouts (``cp1`` in the single process, ``cp2``,
``tp2spcp2``, ``pp2cp2``) run on their own data: documents of odd lengths, several shorter
than 2*CP, packed by one plan at padded lengths so every CP size sees the same sequences.
"""

import math

import pytest
from launcher import launch

pytestmark = pytest.mark.distributed

TOL = 1e-5
TWO_RANK_LAYOUTS = ["tp2", "tp2sp", "pp2", "dp2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_run")


# Context parallel layouts ride along in the same launches (one start-up each): the single
# process adds ``cp1`` (the CP reference on the CP data), 2 ranks ``cp2``, 4 ranks CP2 x TP2
# (with sequence parallel) and CP2 x PP2.
CP_LAYOUTS = {2: ["cp2"], 4: ["tp2spcp2", "pp2cp2"]}


@pytest.fixture(scope="module")
def launched_reference(sft_prefix, cp_prefix, run_dir):
    out = launch(1, ["--data", sft_prefix, "--ckpt", str(run_dir / "ckpt"), "--scenario", "reference",
                     "--layouts", "cp1", "--cp-data", cp_prefix], run_dir / "ref", timeout=480.0)
    return out[0]


@pytest.fixture(scope="module")
def reference(launched_reference):
    return launched_reference["ref"]


@pytest.fixture(scope="module")
def cp_reference(launched_reference):
    return launched_reference["cp1"]


def _layouts(nprocs, names, sft_prefix, cp_prefix, run_dir, reference):
    assert reference  # the checkpoint must exist first
    names = names + CP_LAYOUTS.get(nprocs, [])
    ranks = launch(nprocs, ["--data", sft_prefix, "--ckpt", str(run_dir / "ckpt"), "--scenario", "layouts",
                            "--layouts", ",".join(names), "--cp-data", cp_prefix], run_dir / f"w{nprocs}",
                   timeout=480.0)  # several layouts per launch on a shared 2-core machine
    return {name: [r[name] for r in ranks] for name in names}


@pytest.fixture(scope="module")
def two_ranks(sft_prefix, cp_prefix, run_dir, reference):
    return _layouts(2, TWO_RANK_LAYOUTS, sft_prefix, cp_prefix, run_dir, reference)


@pytest.fixture(scope="module")
def four_ranks(sft_prefix, cp_prefix, run_dir, reference):
    return _layouts(4, ["tp2pp2"], sft_prefix, cp_prefix, run_dir, reference)


def last_stage(ranks):
    return [r for r in ranks if r["state"]["pp_rank"] == r["state"]["pp_size"] - 1]


def assert_packed_equals_padded(ranks):
    for r in last_stage(ranks):
        c = r["check"]
        assert abs(c["loss_packed"] - c["loss_padded"]) <= TOL, c
    for r in ranks:
        c = r["check"]
        assert c["num_docs"] == 23 and c["num_packed_micro_batches"] == 6
        assert c["grad_max_abs"] > 1e-3  # gradients are really there
        assert c["grad_max_abs_diff"] <= TOL, (r["state"], c)


def test_packed_equals_padded_tp1(reference):
    assert reference["state"]["tp_size"] == reference["state"]["world_size"] == 1
    assert_packed_equals_padded([reference])


def test_reference_model_is_llama_shaped(reference):
    m = reference["model"]
    assert m["core_attention"] == "VarlenCoreAttention" and m["vocab"] == 256 and not m["tied"]
    assert math.isclose(m["inv_freq_1"], 500000.0 ** (-2 / m["head_dim"]), rel_tol=1e-6)  # RoPE theta 500000


def test_document_mask_and_rope_restart_matter(reference):
    """Negative control: without the document mask the same batch gives another loss, and one
    document repeated twice in a THD row gives identical per-token losses (RoPE restarts)."""
    c = reference["check"]
    assert abs(c["loss_no_doc_mask"] - c["loss_packed"]) > 100 * TOL
    assert reference["rope_scale"] > 1.0
    assert reference["rope_restart_diff"] <= 1e-6


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_packed_equals_padded_tp2(two_ranks, layout):
    ranks = two_ranks[layout]
    assert {r["state"]["tp_rank"] for r in ranks} == {0, 1}
    assert_packed_equals_padded(ranks)


def test_packed_equals_padded_pp2_and_tp2pp2(two_ranks, four_ranks):
    assert_packed_equals_padded(two_ranks["pp2"])
    assert_packed_equals_padded(four_ranks["tp2pp2"])


def test_every_pipeline_stage_needs_cu_seqlens(two_ranks, four_ranks, reference):
    """Dropping packed_seq_params after the first stage (Megatron-LM's intermediate-stage bug)
    changes the loss; passing them everywhere reproduces the single-process packed loss."""
    for ranks in (two_ranks["pp2"], four_ranks["tp2pp2"]):
        for r in last_stage(ranks):
            c = r["check"]
            assert abs(c["loss_packed"] - reference["check"]["loss_packed"]) <= TOL
            assert abs(c["loss_pp_dropped"] - c["loss_packed"]) > 100 * TOL


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS + ["tp2pp2"])
def test_layout_matches_single_process_over_3_steps(layout, reference, two_ranks, four_ranks):
    ranks = (four_ranks if layout == "tp2pp2" else two_ranks)[layout]
    ref = reference["train"]
    assert len(ref) == 3 and ref[0]["loss"] != ref[1]["loss"]
    for r in last_stage(ranks):
        losses = [s["loss"] for s in r["train"]]
        assert all(abs(a - b["loss"]) <= TOL for a, b in zip(losses, ref)), (layout, losses, ref)
    for r in ranks:  # the clipped grad norm is a global reduction over TP, PP and DP: all ranks agree
        norms = [s["grad_norm"] for s in r["train"]]
        assert all(math.isclose(a, b["grad_norm"], rel_tol=TOL) for a, b in zip(norms, ref)), (layout, norms)


def test_parallel_state_grid(two_ranks, four_ranks):
    tp2 = [r["state"] for r in two_ranks["tp2"]]
    assert [(s["tp_rank"], s["dp_size"], s["backend"], s["device"]) for s in tp2] == [(0, 1, "gloo", "cpu"),
                                                                                      (1, 1, "gloo", "cpu")]
    assert [(s["pp_rank"], s["pp_size"]) for s in (r["state"] for r in two_ranks["pp2"])] == [(0, 2), (1, 2)]
    assert [(s["dp_rank"], s["dp_size"]) for s in (r["state"] for r in two_ranks["dp2"])] == [(0, 2), (1, 2)]
    grid = [(s["tp_rank"], s["pp_rank"]) for s in (r["state"] for r in four_ranks["tp2pp2"])]
    assert grid == [(0, 0), (1, 0), (0, 1), (1, 1)]  # Megatron's order: tp fastest, then pp


# ---------------------------------------------------------------- context parallelism


def test_cp_data_has_short_odd_documents(cp_reference):
    lengths = cp_reference["cp"]["doc_lengths"]
    assert sum(n < 4 for n in lengths) >= 3 and sum(n % 2 for n in lengths) >= 20
    assert cp_reference["cp"]["num_micro_batches"] >= 3


@pytest.mark.parametrize("mask", ["on", "off"])
def test_cp2_equals_cp1_loss_and_gradients(two_ranks, cp_reference, mask):
    ref = cp_reference["cp"]
    assert ref[f"grad_max_abs_{mask}"] > 1e-3
    ranks = two_ranks["cp2"]
    assert sorted(r["state"]["cp_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        c = r["cp"]
        assert abs(c[f"loss_{mask}"] - ref[f"loss_{mask}"]) <= TOL, (c, ref)
        assert c[f"grad_max_abs_diff_{mask}"] <= TOL, c
    assert abs(ref["loss_on"] - ref["loss_off"]) > 100 * TOL  # the mask really changes the batch


def test_cp2_sample_weighting_equals_cp1(two_ranks, cp_reference):
    """--loss-weighting sample: each sample's tokens are counted over the CP group."""
    ref = cp_reference["cp"]
    assert abs(ref["loss_sample"] - ref["loss_on"]) > 100 * TOL  # a different objective than token weighting
    for r in two_ranks["cp2"]:
        assert abs(r["cp"]["loss_sample"] - ref["loss_sample"]) <= TOL, (r["cp"]["loss_sample"], ref["loss_sample"])


def test_cp_negative_control_chunks_not_reordered(two_ranks, cp_reference):
    """Keys used in the ranks' storage order (chunk r, chunk 2CP-1-r per rank) instead of the
    global order: the equality check above would catch it."""
    for r in two_ranks["cp2"]:
        assert abs(r["cp"]["loss_not_reordered"] - cp_reference["cp"]["loss_on"]) > 100 * TOL


@pytest.mark.parametrize("layout", ["cp2", "tp2spcp2", "pp2cp2"])
def test_cp_layout_matches_single_process_over_3_steps(layout, cp_reference, two_ranks, four_ranks):
    ranks = (two_ranks if layout == "cp2" else four_ranks)[layout]
    ref = cp_reference["train"]
    assert len(ref) == 3 and ref[0]["loss"] != ref[1]["loss"]
    assert all(r["state"]["cp_size"] == 2 for r in ranks)
    for r in last_stage(ranks):
        losses = [s["loss"] for s in r["train"]]
        assert all(abs(a - b["loss"]) <= TOL for a, b in zip(losses, ref)), (layout, losses, ref)
        assert abs(r["cp"]["loss_on"] - cp_reference["cp"]["loss_on"]) <= TOL
    for r in ranks:
        norms = [s["grad_norm"] for s in r["train"]]
        assert all(math.isclose(a, b["grad_norm"], rel_tol=TOL) for a, b in zip(norms, ref)), (layout, norms)
