"""Step timings that load on shared cores cannot tilt, and a check that says when it did anyway.

One run per mode, one after the other, times each mode in its own stretch of wall time: when
other work takes the cores during padding's run and not during bfd's, the speedup reads 20x
against an ideal of 1.8x. So the timing here is done in **rounds**: every round trains each
setting for a few steps, the settings in turn, so a burst of load hits every setting of that
round; a setting's step time is the **best** of its per-round medians (load only ever slows a
step down, so the fastest round is the closest to the machine's own speed)::

    round 1:  padding ▮▮▮▮  bfd ▮▮▮▮          median per setting and round
    round 2:  padding ▮▮▮▮  bfd ▮▮▮▮    ──▶   best (min) over the rounds
    round 3:  padding ▮▮▮▮  bfd ▮▮▮▮

Even so a table can be disturbed (load that lasted exactly one setting's turn in every round),
so :func:`mark_disturbed` flags any speedup above ``tolerance`` x its ideal (the ratio of
sequences, what packing can buy when a packed row costs what a padded one does) and says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np

#: A speedup this far above its ideal is not a property of packing: the cores were shared.
DISTURBED_TOLERANCE = 1.3


def round_config(base, setting, steps: int):
    """``base`` trained for ``steps`` timed steps (+1 warm-up) under ``setting``: no log file, no
    checkpoints, one held-out batch (train() always scores at the end)."""
    from megatron_pack.experiment.compare import setting_config

    cfg = setting_config(base, setting, log_file=None, eval_interval=None)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, train_iters=steps + 1, train_epochs=None, train_samples=None,
                                       eval_iters=1),
        logging=dataclasses.replace(cfg.logging, log_interval=10 ** 9, tensorboard_dir=None, wandb_project=None,
                                    wandb_exp_name=None, wandb_save_dir=None))


def interleaved_step_seconds(base, settings, rounds: int = 3, steps: int = 4, quiet: bool = True) -> dict:
    """``{setting name: [median step seconds of each round]}``, the settings interleaved per round
    (the first step of each short run, which pays for warm-up, left out)."""
    from megatron_pack.experiment.compare import one_process_group
    from megatron_pack.training import loop

    out = {s.name: [] for s in settings}
    with one_process_group(base):
        for _ in range(rounds):
            for s in settings:
                with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                    hist = loop.train(round_config(base, s, steps))["history"]
                timed = hist[1:] or hist
                out[s.name].append(float(np.median([h["seconds"] for h in timed])))
    return out


def mark_disturbed(rows: list, tolerance: float = DISTURBED_TOLERANCE, spread: dict | None = None,
                   baseline: str = "padding") -> list:
    """Set ``row["disturbed"]`` to the reason (a sentence) where ``speedup > tolerance * ideal``,
    else None; returns the reasons. ``rows`` carry ``mode``, ``speedup`` and ``ideal_speedup``;
    ``spread`` (``{mode: [step seconds, ...]}``, e.g. per round) adds the timings behind it."""
    reasons = []
    base = spread.get(baseline) if spread else None
    for r in rows:
        ideal, got = r["ideal_speedup"], r["speedup"]
        if not (np.isfinite(got) and np.isfinite(ideal) and got > tolerance * ideal * (1 + 1e-12)):
            r["disturbed"] = None
            continue
        why = (f"{r['mode']}: speedup {got:.2f}x is {got / ideal:.1f}x its ideal {ideal:.2f}x (more than "
               f"{tolerance:g}x): a padded row cannot cost that much more than a packed one, so other work "
               "shared the cores while the modes were timed")
        mine = spread.get(r["mode"]) if spread else None
        if base and mine:
            why += (f" ({baseline} steps {min(base) * 1e3:.0f}-{max(base) * 1e3:.0f} ms, {r['mode']} "
                    f"{min(mine) * 1e3:.0f}-{max(mine) * 1e3:.0f} ms over the timings)")
        r["disturbed"] = why + "; re-run on idle cores"
        reasons.append(r["disturbed"])
    return reasons
