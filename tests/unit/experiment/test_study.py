"""The study's seed aggregation (megatron_pack.experiment.study_seeds) and its report: per
setting mean / min / max / std over seeds (std as ``statistics.stdev``), speedups computed
inside each seed, verdicts "exceeds seed spread" only when the seed ranges do not overlap, and a
pre-seed ``study.json`` moved to its seed's file. Synthetic per-seed records, no model."""

import json
import re
import statistics
import sys

import pytest

from megatron_pack.experiment import study as B
from megatron_pack.experiment import study_report as R
from megatron_pack.experiment import study_seeds as S

BUCKETS = ["0", "1", "2-7", ">=128"]


def leak(contamination, d0=0.58):
    return {"leak_d0": d0, "leak_d1": 0.5, "leak_d128+": 0.2, "sink_d0": 0.34, "sink_d128+": 0.3,
            "alone_first_d128+": 0.37, "leak_overall": 0.4, "contamination_mean": contamination,
            "contamination_mean_abs": abs(contamination), "contamination_se": 0.05,
            "contamination_removed": contamination,
            "contamination_doubled": contamination, "contamination_docs": 13, "sequences": 2, "documents": 15,
            "by_bucket": {"buckets": BUCKETS, "counts": [10, 10, 50, 9], "leak": [d0, 0.5, 0.3, 0.2]}}


def row(name, loss, qa, wall, leakage=None):
    mode, _, nomask = name.partition("/")
    r = {"setting": name, "mode": mode, "document_mask": not nomask, "sequences": 24 if mode == "padding" else 3,
         "steps": 24 if mode == "padding" else 3, "wall_time": wall, "median_time": wall, "tokens_per_s": 1335 / wall,
         "real_tokens_seen": 1335, "efficiency": 0.87, "mode_dropped_samples": 0, "valid_loss": loss,
         "heldout_loss_hf": loss, "final_train_loss": 2.0, "generation": {"prompts": 24, "contained": qa, "exact": 0.0},
         "curve": [{"train_seconds": wall, "real_tokens_seen": 1335, "valid_loss": loss}]}
    if leakage:
        r["leakage"] = leakage
    return r


def state(seed, rows):
    base = {"heldout_loss_hf": 1.99, "generation": {"prompts": 24, "contained": 0.125, "exact": 0.0},
            "leakage": {"shuffled": leak(-0.9), "file order": leak(-1.0)},
            "mask_check": {"attention_max": 0.0, "contamination_max_abs": 1e-6}}
    return {"config": {"seed": seed, "data_seed": 1234, "preset": "small", "settings": [r["setting"] for r in rows]},
            "prepared": {"train_docs": 24, "heldout_docs": 16}, "base": base,
            "rows": {r["setting"]: r for r in rows}, "trained": {}}


def two_seeds():
    """padding clearly lower loss than greedy (ranges apart); greedy/nomask overlaps greedy."""
    return {
        1: state(1, [row("padding", 1.49, 0.042, 300.0), row("greedy", 1.62, 0.083, 30.0, {"shuffled": leak(-0.10)}),
                     row("greedy/nomask", 1.615, 0.125, 20.0, {"shuffled": leak(-0.20), "file order": leak(-0.23)})]),
        2: state(2, [row("padding", 1.50, 0.083, 100.0), row("greedy", 1.61, 0.125, 25.0, {"shuffled": leak(-0.09)}),
                     row("greedy/nomask", 1.625, 0.083, 20.0, {"shuffled": leak(-0.19), "file order": leak(-0.25)})]),
    }


def comparison(agg, a, b, metric):
    return next(c for c in agg["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric))


def test_spread_matches_statistics_and_one_value_has_none():
    v = [1.61, 1.62, 1.645]
    s = S.spread(v)
    assert s["n"] == 3 and s["min"] == 1.61 and s["max"] == 1.645
    assert s["mean"] == pytest.approx(statistics.fmean(v)) and s["std"] == pytest.approx(statistics.stdev(v))
    one = S.spread([1.61, None, float("nan")])  # missing values do not count as seeds
    assert one == {"n": 1, "mean": 1.61, "min": 1.61, "max": 1.61, "std": 0.0, "values": [1.61]}
    assert S.spread([None]) is None


def test_aggregate_means_ranges_and_within_seed_speedups():
    agg = S.aggregate(two_seeds())
    assert agg["seeds"] == [1, 2]
    g = agg["settings"]["greedy"]["metrics"]
    assert g["heldout_loss_hf"]["mean"] == pytest.approx(1.615) and g["heldout_loss_hf"]["std"] > 0
    assert g["qa_contained"]["values"] == [0.083, 0.125]
    # speedup over padding inside each seed (300/30 and 100/25), not the ratio of means (200/27.5)
    assert g["time_speedup"]["values"] == pytest.approx([10.0, 4.0])
    assert agg["settings"]["greedy"]["by_seed"]["time_speedup"] == pytest.approx({1: 10.0, 2: 4.0})
    lk = agg["settings"]["greedy/nomask"]["leakage"]
    assert lk["shuffled"]["contamination_mean"]["values"] == [-0.20, -0.19]
    assert lk["file order"]["by_bucket"]["leak"][0]["mean"] == pytest.approx(0.58)


def test_verdicts_follow_range_overlap():
    agg = S.aggregate(two_seeds())
    assert comparison(agg, "greedy", "padding", "heldout_loss_hf")["verdict"] == "exceeds seed spread"
    assert comparison(agg, "greedy", "padding", "heldout_loss_hf")["diff_mean"] == pytest.approx(0.12)
    assert comparison(agg, "greedy/nomask", "greedy", "heldout_loss_hf")["verdict"] == "within noise"
    assert comparison(agg, "greedy/nomask", "greedy", "qa_contained")["verdict"] == "within noise"
    # the base model is exact (no training noise): two seeds against it are enough
    assert comparison(agg, "greedy [shuffled]", "base [shuffled]", "contamination_mean")["verdict"] == \
        "exceeds seed spread"
    assert comparison(agg, "greedy/nomask [shuffled]", "greedy [shuffled]", "contamination_mean")["verdict"] == \
        "exceeds seed spread"


def test_negative_controls_one_seed_and_identical_seeds():
    one = S.aggregate({1: two_seeds()[1]})
    assert {c["verdict"] for c in one["comparisons"] if not c["b"].startswith("base")} == {"one seed only"}
    assert one["settings"]["greedy"]["metrics"]["heldout_loss_hf"]["std"] == 0.0
    same = S.aggregate({1: two_seeds()[1], 7: state(7, list(two_seeds()[1]["rows"].values()))})
    sp = same["settings"]["greedy"]["metrics"]["heldout_loss_hf"]
    assert sp["n"] == 2 and sp["std"] == 0.0 and sp["min"] == sp["max"]
    # equal values overlap: identical seeds of two equal settings are never "exceeds"
    assert S.verdict(sp, sp) == "within noise"
    assert S.verdict(S.spread([1.0, 1.1]), S.spread([1.2])) == "one seed only"
    assert S.verdict(S.spread([1.0, 1.1]), S.spread([1.2]), exact_b=True) == "exceeds seed spread"


def test_report_writes_aggregate_and_figures(tmp_path):
    for seed, st in two_seeds().items():
        (tmp_path / f"study_seed{seed}.json").write_text(json.dumps(st))
    (tmp_path / "study_seedX.json").write_text("{}")  # not a seed file: ignored
    md = R.report_dir(str(tmp_path))
    agg = json.loads((tmp_path / "study.json").read_text())
    assert agg["seeds"] == [1, 2] and agg["per_seed_files"] == ["study_seed1.json", "study_seed2.json"]
    assert "1.6150 [1.6100, 1.6200]" in md  # greedy held-out loss: mean [min, max]
    assert "exceeds seed spread" in md and "within noise" in md
    assert re.search(r"\| greedy +\| +10\.00x \| +4\.00x \|", md)  # wall-clock speedup per seed
    for png in ("loss_vs_time.png", "study_quality.png", "study_leakage.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_legacy_state_moves_to_its_seed_file(tmp_path):
    legacy = two_seeds()[1]
    legacy["config"] = {"seed": 1234, "preset": "small"}
    (tmp_path / "study.json").write_text(json.dumps(legacy))
    B.migrate_legacy(str(tmp_path))
    assert not (tmp_path / "study.json").exists()
    moved = json.loads((tmp_path / "study_seed1234.json").read_text())
    assert moved["rows"] == legacy["rows"] and moved["config"]["data_seed"] == 1234
    # an aggregate study.json (has "seeds") is left alone
    (tmp_path / "study.json").write_text(json.dumps({"seeds": [1234], "rows": {}}))
    B.migrate_legacy(str(tmp_path))
    assert (tmp_path / "study.json").exists()


def test_report_cli_refuses_a_directory_without_seed_files(tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, "-m", "megatron_pack.experiment", "--report-only", "--output-dir",
                        str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and f"{tmp_path}: no study_seed*.json" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_paper_padding_baseline_and_new_knobs_are_compared(tmp_path):
    """A study run with the paper code's padding (pad to the longest) takes it as the baseline of
    speedups and quality pairs; per-step packing is compared with it and each ``+sample`` setting
    with its token-weighted twin. Control: with no padding setting there is no speedup."""
    def seed(k, loss):
        rows = [row("padding:pad_to=longest", 1.50 + k, 0.1, 200.0), row("bfd@step", 1.50 + k, 0.1, 100.0),
                row("bfd", loss + k, 0.1, 40.0), row("bfd+sample", loss + 0.1 + k, 0.1, 40.0)]
        return state(k, rows)

    agg = S.aggregate({1: seed(1, 1.6), 2: seed(2, 1.6)})
    assert agg["baseline"] == "padding:pad_to=longest"
    assert agg["settings"]["bfd@step"]["by_seed"]["time_speedup"] == pytest.approx({1: 2.0, 2: 2.0})
    pairs = {(c["a"], c["b"]) for c in agg["comparisons"]}
    assert {("bfd@step", "padding:pad_to=longest"), ("bfd+sample", "bfd")} <= pairs
    assert comparison(agg, "bfd@step", "padding:pad_to=longest", "heldout_loss_hf")["diff_mean"] == 0
    assert "speedup over padding:pad_to=longest" in R.write_report({1: seed(1, 1.6)}, str(tmp_path))
    no_pad = S.aggregate({1: state(1, [row("bfd", 1.6, 0.1, 40.0), row("bfd+sample", 1.7, 0.1, 40.0)])})
    assert no_pad["settings"]["bfd"]["by_seed"]["time_speedup"] == {1: None}
    assert {(c["a"], c["b"]) for c in no_pad["comparisons"]} == {("bfd+sample", "bfd")}
