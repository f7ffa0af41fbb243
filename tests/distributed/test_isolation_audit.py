"""``--check-isolation`` on CPU with gloo: passes on TP2, TP2+SP, PP2, PP4, CP2, DP2, TP2xPP2 and
CP2xTP2+SP with the tiny architecture (4 layers so PP4 has a layer per stage), and catches,
naming the place:

- the Megatron-Bridge #2952 bug: one middle pipeline stage (PP4, stage 2) ignores a document
  boundary -> perturbation and backward fail at stage 2, layer 3;
- context parallel attention that ignores the padded per-document boundaries -> stage 0, layer 1;
- RoPE positions that do not restart per document -> the reference check, stage 0, layer 1.

The same PP4 layout unpatched passes with every difference exactly zero (the control that must
pass); ``--no-document-mask`` reports the effect by configuration, exit 0; and two training steps
after ``--check-isolation warn`` are bit-identical to two steps without it.

Two launches (2 and 4 ranks), each running its cases in one process per rank (one start-up).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from launcher import launch

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_isolation_worker.py")
TWO = ("tp2:tp2,tp2sp:tp2sp:mbs1,pp2:pp2,cp2:cp2,dp2:dp2,cp_pad:cp2:cp_pad,positions:pp2:positions,"
       "nomask:dp2:nomask,built:dp2:padding,train:pp2:train,train_warn:pp2:train_warn")
FOUR = "pp4:pp4,tp2pp2:tp2pp2,tp2spcp2:tp2spcp2,bridge:pp4:bridge"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """48 conversations of 8..60 tokens (bfd rows of 128 hold 3-9 of them) and a 4-layer tiny Llama."""
    from megatron_pack.files.indexed import SFTDatasetWriter

    root = tmp_path_factory.mktemp("isolation")
    rng = np.random.default_rng(3)
    with SFTDatasetWriter(str(root / "sft")) as w:
        for _ in range(48):
            n = int(rng.integers(8, 61))
            p = max(1, n // 4)
            w.add(rng.integers(1, 256, n).tolist(), [0] * p + [1] * (n - p), [0, p])
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
           "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "hidden_act": "silu"}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def _run(setup, nprocs, cases):
    out = setup / f"w{nprocs}"
    ranks = launch(nprocs, ["--data", str(setup / "sft"), "--model", str(setup / "config.json"), "--cases", cases],
                   out, timeout=600.0, worker=WORKER)
    return ranks, out


@pytest.fixture(scope="module")
def two(setup):
    return _run(setup, 2, TWO)


@pytest.fixture(scope="module")
def four(setup):
    return _run(setup, 4, FOUR)


def _check(report, name):
    return next(c for c in report["checks"] if c["check"] == name)


def assert_isolated(ranks, name):
    for r in ranks:
        res = r[name]
        rep = res["report"]
        assert res["rc"] == 0 and res["exit_reason"] == "isolation_only", res
        assert rep["isolated"] and not rep["leak"] and rep["deterministic"], rep
        assert rep["rows"]["min_docs"] >= 3
        assert all(c["passed"] for c in rep["checks"])
        assert _check(rep, "perturbation")["max_diff"] == 0.0 and _check(rep, "backward")["max_diff"] == 0.0
        assert _check(rep, "reference")["max_diff"] <= 1e-4
        assert res["iteration"] == 0  # no step taken


@pytest.mark.parametrize("name", ["tp2", "tp2sp", "pp2", "cp2", "dp2", "built"])
def test_isolated_on_two_rank_layouts(two, name):
    """``built``: --pack-mode padding has no row of 3 documents; the audit builds its rows."""
    assert_isolated(two[0], name)
    assert two[0][0][name]["report"]["rows"]["origin"].startswith("built") == (name == "built")


def test_isolated_on_pp4_tp2pp2_and_cp2_tp2_sp(four):
    """PP4 unpatched is also the control that must pass: every difference exactly zero."""
    assert_isolated(four[0], "pp4")
    assert_isolated(four[0], "tp2pp2")
    assert_isolated(four[0], "tp2spcp2")  # CP 2 x TP 2 with sequence parallel: the TE #1930 neighbourhood
    assert four[0][0]["tp2spcp2"]["report"]["rows"]["straddling"] > 0
    rep = four[0][0]["pp4"]["report"]
    assert rep["layout"]["pp"] == 4 and rep["layout"]["layers_per_stage"] == [1]


def test_layouts_split_documents_and_stages(two):
    cp = two[0][0]["cp2"]["report"]
    assert cp["layout"]["cp"] == 2 and cp["rows"]["straddling"] > 0  # documents over both CP ranks
    sp = two[0][0]["tp2sp"]["report"]
    assert sp["layout"]["sequence_parallel"] and sp["rows"]["straddling"] > 0
    dp = two[0][0]["dp2"]["report"]
    assert dp["layout"]["dp"] == 2 and dp["rows"]["documents"] >= 2 * 2 * 3  # 2 DP ranks x 2 rows x 3+ documents


def test_bridge_bug_in_one_middle_stage_is_caught_there(four):
    """Megatron-Bridge #2952: stage 2 of 4 attends across the first document boundary."""
    for r in four[0]:
        res = r["bridge"]
        assert res["rc"] == 1 and "pipeline stage 2, layer 3 of 4" in res["message"], res
        rep = res["report"]
        assert rep["leak"]
        for name in ("perturbation", "backward"):
            c = _check(rep, name)
            assert not c["passed"] and c["stage"] == 2 and c["layer"] == 3, c
        assert _check(rep, "perturbation")["max_diff"] > 1e-3


def test_cp_padded_boundaries_ignored_is_caught(two):
    res = two[0][0]["cp_pad"]
    assert res["rc"] == 1
    c = _check(res["report"], "perturbation")
    assert not c["passed"] and c["stage"] == 0 and c["layer"] == 1, c


def test_positions_not_restarting_are_caught_by_the_reference(two):
    res = two[0][0]["positions"]
    assert res["rc"] == 1 and "positions do not restart" in res["message"], res
    rep = res["report"]
    assert _check(rep, "perturbation")["passed"] and _check(rep, "backward")["passed"]  # no document sees another
    c = _check(rep, "reference")
    assert not c["passed"] and c["stage"] == 0 and c["layer"] == 1 and "RoPE" in c["detail"], c


def test_no_document_mask_reports_the_effect_not_a_failure(two):
    res = two[0][0]["nomask"]
    rep = res["report"]
    assert res["rc"] == 0 and rep["by_configuration"] and not rep["leak"] and not rep["isolated"]
    assert _check(rep, "perturbation")["max_diff"] > 1e-3 and _check(rep, "perturbation")["mean_diff"] > 0


def test_training_after_the_audit_is_bit_identical(two):
    for r in two[0]:
        plain, audited = r["train"], r["train_warn"]
        assert audited["report"]["isolated"] and plain["report"] is None
        assert plain["history"] == audited["history"]  # loss and grad norm of both steps, exactly
        assert plain["data_position"] == audited["data_position"] and plain["iteration"] == 2


def test_report_json_written_beside_the_log(two):
    path = two[1] / "pp2" / "isolation_audit.json"
    rep = json.loads(path.read_text())
    assert rep["isolated"] and {c["check"] for c in rep["checks"]} == {"perturbation", "backward", "reference"}
