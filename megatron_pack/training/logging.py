"""Step and validation lines in Megatron-LM's format, plus TensorBoard and JSON lines.

Megatron-LM's own fields keep their spelling and number formats (``iteration N/M``,
``consumed samples``, ``elapsed time per iteration (ms)``, ``learning rate``, ``lm loss``,
``grad norm`` ...) so existing log parsers keep working; the packing figures are added as
extra ``| key: value |`` fields::

     [2026-01-01 12:00:00] iteration       10/     100 | consumed samples:          160 |
     elapsed time per iteration (ms): 812.3 | learning rate: 9.755283E-06 | global batch size:    16 |
     lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 1.234 | real tokens/s: 9876.5 |
     padding fraction: 0.0312 | samples/s: 45.67 | number of skipped iterations:   0 |
     number of nan iterations:   0 | compute imbalance: 1.004 |

(one line in the log). Only one rank prints (the last rank, Megatron's ``print_rank_last``,
which owns the loss).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import warnings


class TrainingLogger:
    def __init__(self, enabled: bool, train_iters: int, tensorboard_dir: str | None = None,
                 log_file: str | None = None, stream=None):
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.writer = None
        self.log_file = log_file if enabled else None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("--tensorboard-dir given but the tensorboard package is not installed; "
                              "pip install tensorboard (console logging continues)")
            else:
                self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def step(self, iteration: int, m: dict) -> str:
        """Log one training step; ``m`` holds the figures (see :func:`format_step`)."""
        line = format_step(iteration, self.train_iters, m)
        self.print(line)
        if self.enabled and self.writer is not None:
            for key in ("lm loss", "learning rate", "grad norm", "real tokens/s", "padding fraction", "samples/s",
                        "compute imbalance"):
                if m.get(key) is not None:
                    self.writer.add_scalar(key.replace(" ", "-").replace("/", "-per-"), m[key], iteration)
        self._json({"iteration": iteration, **m})
        return line

    def validation(self, iteration: int, loss: float, tokens: int) -> str:
        line = format_validation(f"iteration {iteration}", loss)
        bar = "-" * (len(line) + 1)
        self.print(f"{bar}\n{line}\n{bar}")
        if self.enabled and self.writer is not None:
            self.writer.add_scalar("lm-loss-validation", loss, iteration)
        self._json({"iteration": iteration, "validation lm loss": loss, "validation tokens": tokens})
        return line

    def _json(self, rec: dict) -> None:
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def format_step(iteration: int, train_iters: int, m: dict) -> str:
    """One Megatron-LM style line; ``m`` keys: consumed samples, elapsed ms, learning rate,
    global batch size, lm loss, grad norm, real tokens/s, padding fraction, samples/s,
    skipped, nan."""
    s = f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
    s += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    s += " consumed samples: {:12d} |".format(m["consumed samples"])
    s += " elapsed time per iteration (ms): {:.1f} |".format(m["elapsed ms"])
    s += " learning rate: {:.6E} |".format(m["learning rate"])
    s += " global batch size: {:5d} |".format(m["global batch size"])
    s += " lm loss: {:.6E} |".format(m["lm loss"])
    s += " loss scale: {:.1f} |".format(m.get("loss scale", 1.0))
    if m.get("grad norm") is not None:
        s += " grad norm: {:.3f} |".format(m["grad norm"])
    s += " real tokens/s: {:.1f} |".format(m["real tokens/s"])
    s += " padding fraction: {:.4f} |".format(m["padding fraction"])
    s += " samples/s: {:.2f} |".format(m["samples/s"])
    s += " number of skipped iterations: {:3d} |".format(m.get("skipped", 0))
    s += " number of nan iterations: {:3d} |".format(m.get("nan", 0))
    if m.get("compute imbalance") is not None:  # max/mean FLOPs over DP ranks (data.balance)
        s += " compute imbalance: {:.3f} |".format(m["compute imbalance"])
    return s


def format_validation(prefix: str, loss: float) -> str:
    ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    return f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "


def is_main_logger(rank: int, world_size: int) -> bool:
    """Megatron prints from the last rank (last pipeline stage holds the loss)."""
    return rank == world_size - 1 and os.environ.get("MEGATRON_PACK_QUIET", "0") != "1"
