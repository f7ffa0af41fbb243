"""Blends through the real entry point: a one-source blend trains exactly like the plain run,
a two-source blend logs (and validates) loss per source and resumes exactly (2 ranks, gloo)."""

import math

from _launch_train import BASE_ARGS, describe_failure, make_dataset, run_train, shared_dataset


def test_blend_of_one_source_equals_the_plain_run(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("blend_one")
    args = BASE_ARGS + ["--train-iters", "4"]
    plain = run_train(1, args + ["--data-path", prefix], tmp, name="plain")
    blend = run_train(1, args + ["--data-path", "1", prefix], tmp, name="blend")
    assert plain.returncodes == [0] and blend.returncodes == [0], describe_failure(blend)
    for it in range(1, 5):
        a, b = plain.steps[it], blend.steps[it]
        assert b["lm loss"] == a["lm loss"] and b["grad norm"] == a["grad norm"] and b["tokens"] == a["tokens"], it
        # the one source's loss is the whole loss (same sums, same count)
        assert math.isclose(b["source lm loss"]["sft"], b["lm loss"], rel_tol=1e-6), it
        assert "source lm loss" not in a
    assert blend.records[-1]["validation lm loss"] == plain.records[-1]["validation lm loss"]


def test_two_source_blend_logs_per_source_and_resumes_exactly(tmp_path_factory):
    a = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("blend_two")
    b = make_dataset(str(tmp / "other"), n=48, seed=5)
    args = BASE_ARGS + ["--data-path", "0.7", a, "0.3", b, "--train-iters", "6"]
    full = run_train(2, args, tmp, name="full")
    assert full.returncodes == [0, 0], describe_failure(full)
    assert "> blend (sequences per epoch 0): sft" in full.output
    assert "lm loss other:" in full.output and "validation loss of source other" in full.output
    for it, rec in full.steps.items():
        per = rec["source lm loss"]
        assert set(per) == {"sft", "other"}
        lo, hi = min(per.values()), max(per.values())
        assert lo <= rec["lm loss"] * (1 + 1e-6) and rec["lm loss"] <= hi * (1 + 1e-6), it  # a weighted mean of the two
    val = full.records[-1]
    assert set(val["validation source lm loss"]) == {"sft", "other"}
    toks = val["validation source tokens"]
    mean = sum(val["validation source lm loss"][k] * toks[k] for k in toks) / sum(toks.values())
    assert math.isclose(mean, val["validation lm loss"], rel_tol=1e-6)

    ck = tmp / "ck"
    first = run_train(2, args + ["--save", str(ck), "--exit-interval", "3"], tmp, name="first")
    second = run_train(2, args + ["--save", str(ck), "--load", str(ck)], tmp, name="second")
    assert first.returncodes == [0, 0] and second.returncodes == [0, 0], describe_failure(second)
    assert sorted(second.steps) == [4, 5, 6]
    for it in range(4, 7):
        assert second.steps[it]["lm loss"] == full.steps[it]["lm loss"], it
        assert second.steps[it]["source lm loss"] == full.steps[it]["source lm loss"], it
    # negative control: another blend cannot resume this checkpoint's data position
    other = run_train(1, BASE_ARGS + ["--data-path", "0.5", a, "0.5", b, "--train-iters", "6", "--load", str(ck)],
                      tmp, name="other")
    assert other.returncodes == [1] or other.returncodes[0] != 0
    assert "data setup differs" in other.output


def test_train_and_valid_data_paths(tmp_path_factory):
    """--train-data-path with a separate --valid-data-path blend: nothing held out of the training
    data, the held-out loss reported per validation source."""
    a = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("blend_valid")
    v1, v2 = make_dataset(str(tmp / "heldout_x"), n=12, seed=7), make_dataset(str(tmp / "heldout_y"), n=9, seed=8)
    res = run_train(1, BASE_ARGS + ["--train-data-path", a, "--valid-data-path", v1, v2, "--train-iters", "2"], tmp,
                    name="tv")
    assert res.returncodes == [0], describe_failure(res)
    assert "160 train / 21 held-out conversations" in res.output
    val = res.records[-1]
    assert set(val["validation source lm loss"]) == {"heldout_x", "heldout_y"}
    assert "source lm loss" not in res.steps[1]  # one plain training prefix: no per-source step loss


def test_per_source_loss_under_context_parallelism(tmp_path_factory):
    """CP 2 splits every document over two ranks: every local token is counted once, for one
    source, so the per-source sums add up to the step's loss and supervised tokens (which source
    a CP chunk belongs to: tests/unit/data/test_blend.py::test_token_sources_follow_rows_and_cp_chunks)."""
    a = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("blend_cp")
    b = make_dataset(str(tmp / "other"), n=48, seed=5)
    args = BASE_ARGS + ["--data-path", "0.7", a, "0.3", b, "--train-iters", "2", "--valid-fraction", "0",
                        "--context-parallel-size", "2"]
    res = run_train(2, args, tmp, name="cp2")
    assert res.returncodes == [0, 0], describe_failure(res)
    for it in (1, 2):
        rec = res.steps[it]
        loss, toks = rec["source lm loss"], rec["source tokens"]
        assert set(loss) == {"sft", "other"} and min(toks.values()) > 0
        assert sum(toks.values()) == rec["tokens"]
        mean = sum(loss[k] * toks[k] for k in toks) / rec["tokens"]
        assert math.isclose(mean, rec["lm loss"], rel_tol=1e-6), (it, mean, rec["lm loss"])
