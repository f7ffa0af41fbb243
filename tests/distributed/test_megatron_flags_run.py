"""Megatron-LM flags honoured by a real run (1 rank): --train-samples sets the step count,
--init-method-std the initial weights (and so the first loss), --eval-interval/--eval-iters
when and how much is validated."""

import math

from _launch_train import BASE_ARGS, describe_failure, run_train, shared_dataset


def test_train_samples_init_std_and_eval_flags(tmp_path_factory):
    prefix = shared_dataset(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("mflags")
    args = BASE_ARGS + ["--data-path", prefix, "--global-batch-size", "4", "--train-samples", "10"]
    plain = run_train(1, args, tmp, name="plain")
    tuned = run_train(1, args + ["--init-method-std", "0.5", "--eval-interval", "1", "--eval-iters", "1"], tmp,
                      name="tuned")
    assert plain.returncodes == [0] and tuned.returncodes == [0], describe_failure(tuned)
    for res in (plain, tuned):
        assert sorted(res.steps) == [1, 2]  # 10 samples // 4 per step
        assert "; 2 steps" in res.output
        # the spec provider's fusion choice is in the header: all off on CPU
        assert "fusions: grad-accum off, rope off, bias-swiglu off, masked-softmax off" in res.output
        assert res.output.count("fusions:") == 1, res.output  # one entry in the header, not two
    # std 0.02 starts near ln(vocab); std 0.5 starts far above it
    assert abs(plain.steps[1]["lm loss"] - math.log(256)) < 0.5, plain.steps[1]["lm loss"]
    assert tuned.steps[1]["lm loss"] > plain.steps[1]["lm loss"] + 2.0, tuned.steps[1]["lm loss"]
    val = lambda res: [r for r in res.records if "validation lm loss" in r]  # noqa: E731
    assert [r["iteration"] for r in val(plain)] == [2]  # default: only at the end, whole held-out split
    assert [r["iteration"] for r in val(tuned)] == [1, 2]  # every step, one global batch each
    assert 0 < val(tuned)[-1]["validation tokens"] < val(plain)[-1]["validation tokens"]
