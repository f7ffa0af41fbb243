"""Stop after step k, resume, and steps k+1..n equal the uninterrupted run (2 ranks, gloo).

Two layouts: DP=2 with the distributed optimizer, stopped by SIGTERM mid-run (the handler
saves at the step boundary and exits 0) and resumed across an epoch boundary; PP=2 (1F1B,
4 micro-batches per step) stopped by ``--exit-interval``.
"""


from _launch_train import BASE_ARGS, describe_failure, run_train, shared_dataset, shared_run, stop_and_resume


def _same_steps(full, resumed, steps):
    for it in steps:
        a, b = full.steps[it], resumed.steps[it]
        # Same data, same state, same kernels: the figures agree to the last bit.
        assert b["lm loss"] == a["lm loss"], (it, a["lm loss"], b["lm loss"])
        assert b["grad norm"] == a["grad norm"], (it, a["grad norm"], b["grad norm"])
        assert b["learning rate"] == a["learning rate"], it
        assert b["tokens"] == a["tokens"], it
        assert b["consumed samples"] == a["consumed samples"], it  # the data position came back too


def _differs_when_shifted(full, resumed, steps):
    """Negative control: the same comparison against the neighbouring step fails, so equality
    above is not an accident of identical steps."""
    assert any(resumed.steps[it]["lm loss"] != full.steps[it - 1]["lm loss"] for it in steps)


def test_sigterm_save_and_resume_dp2_distributed_optimizer(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    full = shared_run("dp2_full", tmp_path_factory)
    assert full.returncodes == [0, 0], describe_failure(full)
    args = full.args
    tmp = tmp_path_factory.mktemp("resume_dp2")
    ck = tmp / "ck"
    killed = run_train(2, args + ["--save", str(ck)], tmp, name="killed", sigterm_after="iteration        2/")
    assert killed.returncodes == [0, 0], describe_failure(killed)  # a clean exit, not a crash
    k = max(killed.steps)
    assert 2 <= k < 8, f"SIGTERM landed too late (iteration {k})"
    assert "SIGTERM received: stopped after iteration" in killed.output
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == str(k)
    assert (ck / f"iter_{k:07d}" / "metadata.json").is_file()
    assert not list(ck.glob("*.tmp"))
    _same_steps(full, killed, range(1, k + 1))
    resumed = run_train(2, args + ["--save", str(ck), "--load", str(ck)], tmp, name="resumed")
    assert resumed.returncodes == [0, 0], describe_failure(resumed)
    assert f"at iteration {k} (epoch 0" in resumed.output
    assert sorted(resumed.steps) == list(range(k + 1, 13))
    # 8 steps per epoch: the resumed run moves on to epoch 1 (new order) like the full one
    _same_steps(full, resumed, range(k + 1, 13))
    _differs_when_shifted(full, resumed, range(k + 1, 13))
    # the end of the resumed run is the end of the uninterrupted one: same held-out loss, same
    # checkpoint position
    assert resumed.records[-1]["validation lm loss"] == full.records[-1]["validation lm loss"]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert prefix in resumed.output  # it trained on the shared dataset


def test_resume_pp2(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("resume_pp2")
    args = BASE_ARGS + ["--data-path", prefix, "--train-iters", "20", "--pipeline-model-parallel-size", "2"]
    full, first, second = stop_and_resume(2, args, tmp)
    ck = tmp / "ck"
    assert sorted(first.steps) == [1, 2, 3]
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    _same_steps(full, first, range(1, 4))
    _same_steps(full, second, range(4, 7))
    _differs_when_shifted(full, second, range(4, 7))


def test_resume_cp2_and_load_at_cp1(tmp_path_factory):
    """Context parallel 2 (2 ranks, DP 1): stopped at step 3 and resumed, steps 4..6 equal the
    uninterrupted run to the last bit. Resuming the CP2 checkpoint at CP 1 is refused (CP 2 pads
    every document to a multiple of 4, so CP 1 packs another plan and the saved position would
    point into it); with --document-padding-multiple 4 it resumes at CP 1 at the same position; its weights load in a
    single CP1 process with --pretrained-checkpoint, and the
    held-out loss there (every token scored once, so independent of how the split is packed and
    cut into CP chunks) equals the CP2 run's at that step."""
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("resume_cp2")
    args = BASE_ARGS + ["--data-path", prefix, "--train-iters", "20", "--context-parallel-size", "2",
                        "--eval-interval", "3"]
    full, first, second = stop_and_resume(2, args, tmp)
    assert "CP 2 DP 1" in full.output
    ck = tmp / "ck"
    _same_steps(full, first, range(1, 4))
    _same_steps(full, second, range(4, 7))

    valid = {r["iteration"]: r["validation lm loss"] for r in first.records if "validation lm loss" in r}
    i = args.index("--context-parallel-size")
    cp1_args = args[:i] + args[i + 2:]
    resumed = run_train(1, cp1_args + ["--load", str(ck)], tmp, name="cp1_resume")
    assert resumed.returncodes == [2], describe_failure(resumed)
    assert ("the checkpoint's packing plan pads every document to a multiple of 4 (--context-parallel-size 2), "
            "this run's to 1 (--context-parallel-size 1)") in resumed.output
    assert "--document-padding-multiple 4" in resumed.output and not resumed.steps
    # with CP 2's padding (--document-padding-multiple 4) CP 1 packs the saved plan: the resume
    # continues at step 4 and logs CP 2's steps 4..6 to fp32 noise (CP splits the attention sums)
    same_plan = run_train(1, cp1_args + ["--document-padding-multiple", "4", "--load", str(ck),
                                         "--exit-interval", "6"], tmp, name="cp1_same_plan")
    assert same_plan.returncodes == [0], describe_failure(same_plan)
    assert sorted(same_plan.steps)[:3] == [4, 5, 6], sorted(same_plan.steps)
    for it in (4, 5, 6):
        a, b = second.steps[it], same_plan.steps[it]
        assert b["consumed samples"] == a["consumed samples"] and b["tokens"] == a["tokens"], it
        assert abs(b["lm loss"] - a["lm loss"]) <= 1e-5 * abs(a["lm loss"]), (it, a["lm loss"], b["lm loss"])
    assert any(abs(same_plan.steps[it]["lm loss"] - second.steps[it - 1]["lm loss"]) > 1e-5 for it in (5, 6))
    # weights only: one step at a learning rate of 1e-12 moves no loss by 1e-5 (--lr must be > 0)
    cp1_args[cp1_args.index("--train-iters") + 1] = "1"
    cp1_args[cp1_args.index("--lr") + 1] = "1e-12"
    cp1 = run_train(1, cp1_args + ["--pretrained-checkpoint", str(ck)], tmp, name="cp1")
    assert cp1.returncodes == [0], describe_failure(cp1)
    assert "CP 1 DP 1" in cp1.output and f"initial weights from {ck}" in cp1.output
    v = [r["validation lm loss"] for r in cp1.records if "validation lm loss" in r]
    assert len(v) == 1 and abs(v[0] - valid[3]) <= 1e-5, (v, valid)
    later = [r["validation lm loss"] for r in second.records if r.get("iteration") == 6 and "validation lm loss" in r]
    assert len(later) == 1 and abs(v[0] - later[0]) > 1e-5  # negative control: the step-6 weights score otherwise
