"""Step and validation lines in Megatron-LM's format, plus TensorBoard and JSON lines.

Megatron-LM's own fields keep their spelling and number formats (``iteration N/M``,
``consumed samples``, ``elapsed time per iteration (ms)``, ``learning rate``, ``lm loss``,
``grad norm`` ...) so existing log parsers keep working; the packing figures are added as
extra ``| key: value |`` fields::

     [2026-01-01 12:00:00] iteration       10/     100 | consumed samples:          160 |
     elapsed time per iteration (ms): 812.3 | learning rate: 9.755283E-06 | global batch size:    16 |
     lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 1.234 | real tokens/s: 9876.5 |
     padding fraction: 0.0312 | conversations/s: 45.67 | number of skipped iterations:   0 |
     number of nan iterations:   0 | compute imbalance: 1.004 |

(one line in the log). The same scalars go to every writer from one place (:func:`step_scalars`,
:func:`validation_scalars`): TensorBoard (``--tensorboard-dir``) and Weights & Biases
(``--wandb-project``, Megatron-LM's flags; ``WANDB_MODE=offline`` runs without a network), named
as Megatron-LM's TensorBoard names them (``lm-loss``, ``lm-loss/<source>``, ``real-tokens-per-s``,
``padding-fraction``, ``compute-imbalance``, ``lm-loss-validation`` ...).

``consumed samples`` keeps Megatron-LM's meaning: training *sequences*
(packed rows of ``--seq-length`` tokens) so far, global batch x steps. ``conversations/s``
counts the conversations (pieces, where a mode splits one) inside those sequences per second:
with packing there are several per sequence, so the two are different units on purpose. Only
one rank prints (the last rank, Megatron's ``print_rank_last``, which owns the loss).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import warnings

#: Step figures written as scalars (console key -> scalar name, Megatron-LM's TensorBoard style).
STEP_SCALARS = (
    "lm loss",
    "learning rate",
    "grad norm",
    "real tokens/s",
    "padding fraction",
    "conversations/s",
    "compute imbalance",
    "rows",
)


def scalar_name(key: str) -> str:
    return key.replace(" ", "-").replace("/", "-per-")


def step_scalars(m: dict) -> dict:
    """``{scalar name: value}`` of one training step: the figures above, and the loss per blend source."""
    out = {scalar_name(k): float(m[k]) for k in STEP_SCALARS if m.get(k) is not None}
    out.update({f"lm-loss/{name}": float(v) for name, v in (m.get("source lm loss") or {}).items()})
    return out


def validation_scalars(loss: float, by_source: dict | None = None) -> dict:
    out = {"lm-loss-validation": float(loss)}
    out.update({f"lm-loss-validation/{n}": float(v) for n, (v, _) in (by_source or {}).items()})
    return out


class TensorBoardWriter:
    """Scalars to a TensorBoard event file (torch's ``SummaryWriter``)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, max_queue=100)

    def add_scalars(self, scalars: dict, step: int) -> None:
        for name, v in scalars.items():
            self.writer.add_scalar(name, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbWriter:
    """Scalars to a Weights & Biases run (``WANDB_MODE=offline``: files only, no network)."""

    def __init__(self, project: str, name: str | None = None, save_dir: str | None = None, config: dict | None = None):
        import wandb

        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config or {})

    def add_scalars(self, scalars: dict, step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def open_writers(
    tensorboard_dir: str | None = None,
    wandb_project: str | None = None,
    wandb_exp_name: str | None = None,
    wandb_save_dir: str | None = None,
    run_config: dict | None = None,
) -> list:
    """The scalar writers a run asked for; a missing tensorboard package is a warning (console
    logging continues), as before."""
    writers = []
    if tensorboard_dir:
        try:
            writers.append(TensorBoardWriter(tensorboard_dir))
        except ImportError:
            warnings.warn(
                "--tensorboard-dir given but the tensorboard package is not installed; "
                "pip install tensorboard (console logging continues)"
            )
    if wandb_project:
        writers.append(WandbWriter(wandb_project, wandb_exp_name, wandb_save_dir, run_config))
    return writers


class TrainingLogger:
    def __init__(
        self,
        enabled: bool,
        train_iters: int,
        tensorboard_dir: str | None = None,
        log_file: str | None = None,
        stream=None,
        *,
        wandb_project: str | None = None,
        wandb_exp_name: str | None = None,
        wandb_save_dir: str | None = None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.log_file = log_file if enabled else None
        self.writers = (
            open_writers(tensorboard_dir, wandb_project, wandb_exp_name, wandb_save_dir, run_config) if enabled else []
        )

    def _scalars(self, scalars: dict, step: int) -> None:
        for w in self.writers:  # one set of scalars, every writer
            w.add_scalars(scalars, step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def step(self, iteration: int, m: dict) -> str:
        """Log one training step; ``m`` holds the figures (see :func:`format_step`)."""
        line = format_step(iteration, self.train_iters, m)
        self.print(line)
        self._scalars(step_scalars(m), iteration)
        self._json({"iteration": iteration, **m})
        return line

    def validation(self, iteration: int, loss: float, tokens: int, by_source: dict | None = None) -> str:
        """``by_source``: ``{source name: (loss, tokens)}`` of a blended held-out set."""
        line = format_validation(f"iteration {iteration}", loss)
        bar = "-" * (len(line) + 1)
        extra = "".join(
            f"\n validation loss of source {n} | lm loss value: {v:.6E} | tokens: {c} |"
            for n, (v, c) in (by_source or {}).items()
        )
        self.print(f"{bar}\n{line}{extra}\n{bar}")
        self._scalars(validation_scalars(loss, by_source), iteration)
        rec = {"iteration": iteration, "validation lm loss": loss, "validation tokens": tokens}
        if by_source:
            rec["validation source lm loss"] = {n: v for n, (v, _) in by_source.items()}
            rec["validation source tokens"] = {n: c for n, (_, c) in by_source.items()}
        self._json(rec)
        return line

    def _json(self, rec: dict) -> None:
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.close()


def format_step(iteration: int, train_iters: int, m: dict) -> str:
    """One Megatron-LM style line; ``m`` keys: consumed samples, elapsed ms, learning rate,
    global batch size, lm loss, grad norm, real tokens/s, padding fraction, conversations/s,
    skipped, nan."""
    s = f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
    s += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    s += " consumed samples: {:12d} |".format(m["consumed samples"])
    s += " elapsed time per iteration (ms): {:.1f} |".format(m["elapsed ms"])
    s += " learning rate: {:.6E} |".format(m["learning rate"])
    s += " global batch size: {:5d} |".format(m["global batch size"])
    s += " lm loss: {:.6E} |".format(m["lm loss"])
    for name, v in (m.get("source lm loss") or {}).items():  # blends: token-weighted loss per source
        s += " lm loss {}: {:.6E} |".format(name, v)
    s += " loss scale: {:.1f} |".format(m.get("loss scale", 1.0))
    if m.get("grad norm") is not None:
        s += " grad norm: {:.3f} |".format(m["grad norm"])
    s += " real tokens/s: {:.1f} |".format(m["real tokens/s"])
    s += " padding fraction: {:.4f} |".format(m["padding fraction"])
    s += " conversations/s: {:.2f} |".format(m["conversations/s"])
    s += " number of skipped iterations: {:3d} |".format(m.get("skipped", 0))
    s += " number of nan iterations: {:3d} |".format(m.get("nan", 0))
    if m.get("compute imbalance") is not None:  # max/mean FLOPs over DP ranks (data.balance)
        s += " compute imbalance: {:.3f} |".format(m["compute imbalance"])
    if m.get("rows") is not None:  # --pack-scope step: packed rows of this step
        s += " rows: {:5d} |".format(m["rows"])
    return s


def format_validation(prefix: str, loss: float) -> str:
    ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    return f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "


def is_main_logger(rank: int, world_size: int) -> bool:
    """Megatron prints from the last rank (last pipeline stage holds the loss)."""
    return rank == world_size - 1 and os.environ.get("MEGATRON_PACK_QUIET", "0") != "1"
