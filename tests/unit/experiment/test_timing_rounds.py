"""Timing rounds interleave the modes; a speedup far above its ideal is marked disturbed, with why."""

import pytest

from megatron_pack.demo import add_speedups, format_results, summarize_run
from megatron_pack.experiment import timing_rounds as timing
from megatron_pack.experiment.settings import expand_settings


def _row(mode, sequences, steps, step_s, rounds=()):
    run = {"mode": mode, "setting": mode, "sequences": sequences, "steps": steps, "wall_time": steps * step_s,
           "step_s": step_s, "median_time": steps * step_s, "real_tokens_seen": 1000, "final_train_loss": 2.0,
           "valid_loss": 2.1, "padding_fraction": 0.1}
    return summarize_run(run, list(rounds))


def test_the_issue_table_is_marked_disturbed_with_the_reason():
    # the reported quickstart: padding's median 4,576 ms against ~410 ms for its first steps
    rows = [_row("padding", 456, 57, 4.576), _row("greedy", 270, 34, 0.43), _row("random", 253, 32, 0.43),
            _row("bfd", 252, 32, 0.45)]
    add_speedups(rows)
    assert rows[1]["speedup"] == pytest.approx(4.576 * 57 / (0.43 * 34))
    reasons = timing.mark_disturbed(rows, spread={"padding": [4.576, 0.41], "greedy": [0.43]})
    assert [r["mode"] for r in rows if r["disturbed"]] == ["greedy", "random", "bfd"] and len(reasons) == 3
    g = rows[1]
    assert g["disturbed"].startswith(f"greedy: speedup {g['speedup']:.2f}x is {g['speedup'] / g['ideal_speedup']:.1f}x "
                                     f"its ideal {g['ideal_speedup']:.2f}x (more than 1.3x)")
    assert "padding steps 410-4576 ms" in g["disturbed"] and "shared the cores" in g["disturbed"]
    assert rows[0]["disturbed"] is None
    table = format_results(rows)
    assert table.count("(disturbed)") == 3 and f"{g['speedup']:.2f}x (disturbed)" in table


def test_an_undisturbed_table_is_not_marked():
    """Negative control: speedups at or a little above their ideals (a padded row's tail costs
    something) are results, up to and including 1.3x the ideal."""
    at_the_line = 0.41 * 57 / (32 * 1.3 * 456 / 252)  # bfd's step time for a speedup of exactly 1.3x ideal
    rows = [_row("padding", 456, 57, 0.41), _row("greedy", 270, 34, 0.42), _row("bfd", 252, 32, at_the_line)]
    add_speedups(rows)
    assert rows[2]["speedup"] == pytest.approx(1.3 * rows[2]["ideal_speedup"])
    assert timing.mark_disturbed(rows) == []
    assert all(r["disturbed"] is None for r in rows) and "(disturbed)" not in format_results(rows)
    rows[2]["speedup"] *= 1.01  # just over the line: marked
    assert len(timing.mark_disturbed(rows)) == 1 and rows[2]["disturbed"].startswith("bfd:")


def test_best_of_the_run_and_the_rounds_sets_every_timing_column():
    r = _row("padding", 100, 10, 0.9, rounds=[0.5, 0.7])
    assert r["step_s"] == 0.5 and r["epoch_time"] == pytest.approx(5.0) and r["run_step_s"] == 0.9
    assert r["tokens_per_s"] == pytest.approx(1000 / 5.0) and r["round_step_s"] == [0.5, 0.7]
    assert _row("bfd", 50, 5, 0.3, rounds=[0.6])["step_s"] == 0.3  # a slow round never wins


def test_rounds_interleave_the_settings_and_drop_the_warm_up_step(monkeypatch):
    from megatron_pack.config.spec import DataArgs, TrainArgs, TrainConfig
    from megatron_pack.training import loop

    calls = []
    fake_seconds = {"padding": [9.0, 0.4, 0.5, 0.6], "bfd": [9.0, 0.2, 0.3, 0.1]}

    def fake_train(cfg):
        mode = cfg.data.packing.pack_mode
        calls.append((mode, cfg.train.train_iters, cfg.train.eval_iters, cfg.logging.log_file))
        return {"history": [{"seconds": s} for s in fake_seconds[mode]]}

    monkeypatch.setattr(loop, "train", fake_train)
    base = TrainConfig(data=DataArgs(data_path="sft"), train=TrainArgs(train_epochs=1.0))
    out = timing.interleaved_step_seconds(base, expand_settings(["padding", "bfd"], [True]), rounds=2,
                                          steps=3)
    assert [c[0] for c in calls] == ["padding", "bfd", "padding", "bfd"]  # in turn, round by round
    assert all(c[1:] == (4, 1, None) for c in calls)  # 3 timed steps + 1 warm-up, one held-out batch, no log
    assert out == {"padding": [0.5, 0.5], "bfd": [0.2, 0.2]}  # the 9 s warm-up step left out
